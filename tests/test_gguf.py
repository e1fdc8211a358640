"""GGUF export across architectures (compress/export/gguf.py): names, shapes and metadata
read back with gguf.GGUFReader, GGMLLinear blocks written unchanged, and, where
llama-cpp-python is installed (benchmarks/setup_llamacpp.sh, .ci/run), llama.cpp's
logits against transformers'."""
import numpy as np
import pytest
import torch

import compress
from compress.errors import CompressError
from compress.export import ExportConfig, export
from compress.export.gguf import gguf_tensors
from compress.export.gguf_arch import ARCHS

gguf = pytest.importorskip("gguf")

MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 256}
SWA = {"sliding_window": 8, "query_pre_attn_scalar": 64}      # windows shorter than the prompts
# model_type -> extra config (head_dim 64: the attention width equals the hidden size).
KINDS = {
    "llama": {}, "mistral": {"sliding_window": None}, "qwen2": {}, "qwen3": {}, "phi3": {}, "olmo2": {},
    "gemma": {}, "gemma2": SWA,
    "gemma3_text": {**SWA, "layer_types": ["sliding_attention", "full_attention"],
                    "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
    "qwen2_moe": {**MOE, "num_experts": 4, "shared_expert_intermediate_size": 256},
    "qwen3_moe": {**MOE, "num_experts": 4, "norm_topk_prob": True},
    "olmoe": {**MOE, "num_experts": 4, "num_key_value_heads": 4},     # llama.cpp's OLMoE has no GQA
}
MOES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
# Names each kind must have beyond the common ones (its own norms, fused or stacked layers).
OWN = {"qwen2": {"blk.0.attn_q.bias"}, "qwen3": {"blk.0.attn_q_norm.weight"}, "olmo2": {"blk.0.post_ffw_norm.weight"},
       "phi3": {"blk.0.attn_qkv.weight"}, "gemma2": {"blk.0.post_attention_norm.weight"},
       "gemma3_text": {"blk.0.attn_k_norm.weight", "blk.0.post_ffw_norm.weight"},
       "qwen2_moe": {"blk.0.ffn_gate_inp_shexp.weight", "blk.0.ffn_down_shexp.weight", "blk.0.attn_q.bias"},
       "olmoe": {"blk.0.attn_q_norm.weight"}}


def tiny(model_type: str, vocab: int, tied: bool = None):
    from transformers import AutoConfig, AutoModelForCausalLM
    base = dict(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, max_position_embeddings=256, pad_token_id=0,
                tie_word_embeddings=model_type.startswith("gemma") if tied is None else tied)
    cfg = AutoConfig.for_model(model_type, **{**base, **KINDS[model_type]})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():   # norms away from 1 (Gemma's away from 0), so a norm read wrongly shows
            for n, t in model.named_parameters():
                if n.endswith("norm.weight"):
                    t.add_(torch.rand_like(t) * 0.5)
        return model


def ids(vocab: int, n: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(0))


def test_every_tested_architecture_is_in_the_table():
    assert set(KINDS) == set(ARCHS)


def ffn(model_type: str) -> str:
    return "ffn_down_exps" if model_type in MOES else "ffn_down"


@pytest.mark.parametrize("model_type", list(KINDS))
def test_names_shapes_and_metadata_read_back(model_type, tiny_tokenizer, tmp_path):
    tied = model_type in ("qwen3", "gemma", "gemma2", "gemma3_text")
    model = tiny(model_type, len(tiny_tokenizer), tied=tied)
    ref = gguf_tensors(model)
    out = export(model, tiny_tokenizer, str(tmp_path / "g"), ExportConfig(format="gguf", gguf_type="F16"))
    r = gguf.GGUFReader(str(out / "model.gguf"))
    arch = ARCHS[model_type].name
    assert r.fields["general.architecture"].contents() == arch
    got = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in r.tensors}   # GGUF lists ne[0] first
    assert got == {k: tuple(v.shape) for k, v in ref.items()}
    assert ("output.weight" in got) is not tied                                  # a tied head is not written
    assert {f"blk.1.{ffn(model_type)}.weight", "token_embd.weight", "output_norm.weight"} | OWN.get(model_type, set()) \
        <= set(got)
    assert ("blk.0.attn_q.bias" in got) is (model_type in ("qwen2", "qwen2_moe"))
    f = {k: r.fields[f"{arch}.{k}"].contents() for k in ("block_count", "attention.head_count_kv", "attention.key_length")}
    assert f == {"block_count": 2, "attention.head_count_kv": model.config.num_key_value_heads,
                 "attention.key_length": 64}
    if model_type in MOES:
        assert got["blk.1.ffn_down_exps.weight"] == (4, 256, 512 if model_type in ("mixtral", "olmoe") else 256)
        assert r.fields[f"{arch}.expert_count"].contents() == 4
    norm = next(t for t in r.tensors if t.name == "output_norm.weight")
    shift = 1.0 if model_type.startswith("gemma") else 0.0                       # Gemma's x * (1 + w)
    assert np.allclose(np.asarray(norm.data), model.model.norm.weight.detach().numpy() + shift)


def test_gguf_quant_layers_are_written_as_their_own_blocks(tiny_tokenizer, tmp_path):
    model = tiny("qwen3", len(tiny_tokenizer))
    compress.run(model, [{"quant": {"method": "rtn", "format": "gguf-q4_k", "targets": ["mlp"]}},
                         {"quant": {"method": "rtn", "format": "gguf-q6_k", "targets": ["self_attn"]}}], calib=ids(len(tiny_tokenizer)))
    blocks = model.model.layers[1].mlp.down_proj.blocks
    out = export(model, tiny_tokenizer, str(tmp_path / "g"), ExportConfig(format="gguf", gguf_type="Q8_0"))
    r = gguf.GGUFReader(str(out / "model.gguf"))
    T = gguf.GGMLQuantizationType
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.1.ffn_down.weight"] == T.Q4_K and types["blk.0.attn_v.weight"] == T.Q6_K
    assert types["token_embd.weight"] == T.Q8_0 and types["blk.0.attn_norm.weight"] == T.F32
    t = next(t for t in r.tensors if t.name == "blk.1.ffn_down.weight")
    assert np.array_equal(np.asarray(t.data).reshape(blocks.shape), blocks.numpy())     # the bytes, unchanged


def test_other_architectures_and_unnamed_tensors_are_refused(tiny_tokenizer, tmp_path):
    import transformers as tf
    falcon = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model(
        "starcoder2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1))
    with pytest.raises(CompressError, match="supports model_type .* 'starcoder2'"):
        export(falcon, None, str(tmp_path / "h"), ExportConfig(format="gguf"))
    for mt, field, change in (("gemma2", "query_pre_attn_scalar", 256), ("qwen3_moe", "norm_topk_prob", False),
                              ("llama", "hidden_act", "gelu")):
        m = tiny(mt, 64)
        setattr(m.config, field, change)           # a model llama.cpp's graph would compute differently
        with pytest.raises(CompressError, match=f"{mt} with {field}="):
            export(m, None, str(tmp_path / mt), ExportConfig(format="gguf"))
        assert not (tmp_path / mt).exists()
    model = tiny("llama", len(tiny_tokenizer))
    model.model.layers[0].register_buffer("extra", torch.zeros(3))
    with pytest.raises(CompressError, match="no llama.cpp name .*layers.0.extra"):
        export(model, tiny_tokenizer, str(tmp_path / "x"), ExportConfig(format="gguf"))
    assert not (tmp_path / "x").exists()


def llama_cpp_logits(path, tokens: torch.Tensor) -> np.ndarray:
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_ctx=64, n_batch=64, n_ubatch=64, logits_all=True, verbose=False)
    out = []
    for w in tokens.tolist():
        llm.reset()
        llm.eval(w)
        out.append(np.array(llm.scores[:len(w)], dtype=np.float32))   # a copy: scores is llama's own buffer
    return np.stack(out)


def settled(model, x: torch.Tensor, margin: float = 2e-3) -> np.ndarray:
    """[n, seq] mask of the positions whose top-k routing, in every block, is decided by
    more than `margin` in probability: elsewhere an fp16 rounding may pick another
    expert, in llama.cpp as in transformers (all positions, for a dense model)."""
    k, gaps, hooks = getattr(model.config, "num_experts_per_tok", None), [], []

    def hook(mod, args, _):
        p = torch.softmax(args[0].reshape(-1, args[0].shape[-1]).float() @ mod.weight.float().T, -1)
        top = p.topk(k + 1, dim=-1).values
        gaps.append((top[:, k - 1] - top[:, k]).reshape(x.shape))

    if k:
        hooks = [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return (torch.stack(gaps).min(0).values > margin).numpy() if gaps else np.ones(tuple(x.shape), bool)


def off_by(path, model, x, ref: np.ndarray, margin: float = 2e-3, least: float = 0.75) -> float:
    """The largest |llama.cpp - ref| logit over the settled positions (at least `least` of them)."""
    keep = settled(model, x, margin)
    assert keep.mean() >= least
    return float(np.abs(llama_cpp_logits(path, x) - ref)[keep].max())


@pytest.mark.parametrize("model_type", list(KINDS))
def test_llama_cpp_logits_match_transformers(model_type, tiny_tokenizer, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (benchmarks/setup_llamacpp.sh)")
    model = tiny(model_type, len(tiny_tokenizer))
    x = ids(len(tiny_tokenizer))
    with torch.no_grad():
        dense = model(x).logits.numpy()
    out = export(model, tiny_tokenizer, str(tmp_path / "f16"), ExportConfig(format="gguf", gguf_type="F16"))
    assert off_by(out / "model.gguf", model, x, dense) < 5e-3        # fp16 rounding
    compress.run(model, [{"quant": {"format": "gguf-q4_k"}}], calib=x)
    with torch.no_grad():
        ours = model(x).logits.numpy()
    out = export(model, tiny_tokenizer, str(tmp_path / "q"), ExportConfig(format="gguf", gguf_type="F16"))
    # llama.cpp reads our Q4_K weights; it rounds activations to 8 bits for its Q4_K dot
    # products, which moves a router's input further than fp16 does: a wider margin.
    assert off_by(out / "model.gguf", model, x, ours, margin=1e-2, least=0.5) < np.abs(ours - dense).max()
