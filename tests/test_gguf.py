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
from compress.export.gguf import ARCHS, gguf_tensors

gguf = pytest.importorskip("gguf")

# model_type -> extra config (head_dim 64: the attention width equals the hidden size).
KINDS = {"llama": {}, "mistral": {"sliding_window": None}, "qwen2": {}, "qwen3": {}}


def tiny(model_type: str, vocab: int, tied: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab, hidden_size=256, intermediate_size=512,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                               max_position_embeddings=256, tie_word_embeddings=tied, **KINDS[model_type])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg).eval()


def ids(vocab: int, n: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(0))


def test_every_tested_architecture_is_in_the_table():
    assert set(KINDS) == set(ARCHS)


@pytest.mark.parametrize("model_type", list(KINDS))
def test_names_shapes_and_metadata_read_back(model_type, tiny_tokenizer, tmp_path):
    model = tiny(model_type, len(tiny_tokenizer), tied=model_type == "qwen3")
    ref = gguf_tensors(model)
    out = export(model, tiny_tokenizer, str(tmp_path / "g"), ExportConfig(format="gguf", gguf_type="F16"))
    r = gguf.GGUFReader(str(out / "model.gguf"))
    arch = ARCHS[model_type]
    assert r.fields["general.architecture"].contents() == arch
    got = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in r.tensors}   # GGUF lists ne[0] first
    assert got == {k: tuple(v.shape) for k, v in ref.items()}
    assert ("output.weight" in got) is (model_type != "qwen3")                   # a tied head is not written
    assert {"blk.1.attn_q.weight", "blk.1.ffn_down.weight", "token_embd.weight"} <= set(got)
    assert ("blk.0.attn_q.bias" in got) is (model_type == "qwen2")
    assert ("blk.0.attn_q_norm.weight" in got) is (model_type == "qwen3")
    f = {k: r.fields[f"{arch}.{k}"].contents() for k in ("block_count", "attention.head_count_kv", "rope.freq_base")}
    assert f == {"block_count": 2, "attention.head_count_kv": 2, "rope.freq_base": 10000.0}


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
    gemma = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model(
        "gemma", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16))
    with pytest.raises(CompressError, match="supports model_type .* 'gemma'"):
        export(gemma, None, str(tmp_path / "h"), ExportConfig(format="gguf"))
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


@pytest.mark.parametrize("model_type", list(KINDS))
def test_llama_cpp_logits_match_transformers(model_type, tiny_tokenizer, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (benchmarks/setup_llamacpp.sh)")
    model = tiny(model_type, len(tiny_tokenizer))
    x = ids(len(tiny_tokenizer))
    with torch.no_grad():
        dense = model(x).logits.numpy()
    out = export(model, tiny_tokenizer, str(tmp_path / "f16"), ExportConfig(format="gguf", gguf_type="F16"))
    assert np.abs(llama_cpp_logits(out / "model.gguf", x) - dense).max() < 5e-3        # fp16 rounding
    compress.run(model, [{"quant": {"format": "gguf-q4_k"}}], calib=x)
    with torch.no_grad():
        ours = model(x).logits.numpy()
    out = export(model, tiny_tokenizer, str(tmp_path / "q"), ExportConfig(format="gguf", gguf_type="Q8_0"))
    # llama.cpp reads our Q4_K weights; it rounds activations to 8 bits for its Q4_K dot products.
    err = np.abs(llama_cpp_logits(out / "model.gguf", x) - ours).max()
    assert err < np.abs(ours - dense).max()
