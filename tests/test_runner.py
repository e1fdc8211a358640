"""The sequential runner on tiny random models of several architectures."""
import pytest
import torch

import compress
from compress.collect import collect_stats, input_groups
from compress.capture import capture_inputs
from compress.errors import CompressError
from compress.models import block_linears, find_blocks, get_weight
from helpers import is_nm


def calib_ids(vocab, n=8, seq=32, seed=0):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_qkv_share_one_statistics_object(tiny_llama):
    _, blocks = find_blocks(tiny_llama)
    inputs = capture_inputs(tiny_llama, blocks, calib_ids(300), 4, "cpu", "cpu").block(0)
    stats = collect_stats(blocks[0], block_linears(blocks[0]), inputs, True, "cpu")
    assert input_groups(stats) == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                   ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert stats["self_attn.q_proj"].n == 8 * 32
    # X^T X of q_proj's input equals the one computed by hand from a hook.
    seen = []
    h = blocks[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, 64)))
    for inp in inputs:
        blocks[0](inp.hidden, *inp.args, **inp.kwargs)
    h.remove()
    X = torch.cat(seen)
    assert torch.allclose(stats["self_attn.q_proj"].xtx, X.T @ X, rtol=1e-4, atol=1e-3)


def test_end_to_end_wanda_2of4(tiny_llama):
    before = snapshot(tiny_llama)
    ids = calib_ids(300)
    model, report = compress.run(tiny_llama, [compress.Wanda(pattern="2:4")], calib=ids, batch_size=3,
                                 compute_dtype="float32")
    rows = report["layers"]
    assert len(rows) == 2 * 7 and report["summary"]["sparsity"] == 0.5
    for name, m in model.named_modules():
        if name.startswith("model.layers") and isinstance(m, torch.nn.Linear):
            assert is_nm(m.weight, 2, 4), name
    # Embeddings, norms and lm_head are untouched.
    after = model.state_dict()
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(after[k], before[k])
    # Block 1 was calibrated on the *compressed* block 0's outputs: recompute its
    # input norms on the final model and redo Wanda by hand on the dense weight.
    seen = []
    q = model.model.layers[1].self_attn.q_proj
    h = q.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        model(ids, use_cache=False)
    h.remove()
    norm = torch.cat(seen).square().sum(0).sqrt()
    W = before["model.layers.1.self_attn.q_proj.weight"]
    score = (W.abs() * norm).reshape(W.shape[0], -1, 4)
    keep = torch.zeros_like(score, dtype=torch.bool).scatter_(2, score.topk(2, dim=2).indices, True)
    assert torch.equal(q.weight != 0, keep.reshape(W.shape))


def test_bf16_forwards_keep_fp32_weights_exact(tiny_llama):
    """Calibration forwards in bf16 must not round the model's own weights: norms stay
    bit-identical and the pruned weights are the fp32 values, masked."""
    before = snapshot(tiny_llama)
    _, report = compress.run(tiny_llama, [compress.Magnitude(sparsity=0.5), compress.Wanda(sparsity=0.5)],
                             calib=calib_ids(300), compute_dtype="bfloat16")
    assert report["compute_dtype"] == "bfloat16"
    after = tiny_llama.state_dict()
    for k, v in before.items():
        assert after[k].dtype == torch.float32
        if "proj" in k:
            kept = after[k] != 0
            assert torch.equal(after[k][kept], v[kept]), k
        else:
            assert torch.equal(after[k], v), k


def test_true_sequential_recollects_between_groups(tiny_llama):
    from transformers import LlamaForCausalLM

    twin = LlamaForCausalLM(tiny_llama.config).eval()
    twin.load_state_dict(tiny_llama.state_dict())
    ids = calib_ids(300)
    _, plain = compress.run(tiny_llama, [compress.Wanda(sparsity=0.5)], calib=ids)
    _, seq = compress.run(twin, [compress.Wanda(sparsity=0.5)], calib=ids, true_sequential=True)
    a, b = tiny_llama.model.layers[0], twin.model.layers[0]
    assert torch.equal(a.self_attn.q_proj.weight, b.self_attn.q_proj.weight)  # same input
    assert not torch.equal(a.mlp.down_proj.weight != 0, b.mlp.down_proj.weight != 0)
    assert seq["true_sequential"] and seq["summary"]["sparsity"] == 0.5


def test_sparsegpt_reports_relative_error(tiny_llama):
    _, report = compress.run(tiny_llama, [compress.SparseGPT(sparsity=0.5)], calib=calib_ids(300))
    errs = [r["rel_error"] for r in report["layers"]]
    assert all(0 < e < 1 for e in errs)
    assert all(r["percdamp"] == 0.01 for r in report["layers"])


GEMMA2_WINDOW = 8


def _tiny(arch):
    import transformers as tf
    common = dict(vocab_size=128, num_hidden_layers=2, num_attention_heads=4)
    cfg = {
        "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128),
        "opt": lambda: tf.OPTConfig(hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, **common),
        "qwen2": lambda: tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_key_value_heads=2, **common),
        "mistral": lambda: tf.MistralConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=2,
                                            sliding_window=GEMMA2_WINDOW, **common),   # every layer slides
        "gemma": lambda: tf.GemmaConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=2, head_dim=16, **common),
        # A window of 8 tokens, shorter than the 16 calibration tokens, so sliding layer 0 and
        # full layer 1 really see different masks (the default window, 4096, never bites);
        # Mistral's layers all slide, with the same window.
        "gemma2": lambda: tf.Gemma2Config(hidden_size=64, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                                          sliding_window=GEMMA2_WINDOW, **common),
    }[arch]()
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("arch", ["gpt2", "opt", "qwen2", "mistral", "gemma", "gemma2"])
def test_architectures_2of4_along_input(arch):
    model = _tiny(arch)
    ids = calib_ids(128, n=4, seq=16)
    with torch.no_grad():
        dense_logits = model(ids).logits
    _, report = compress.run(model, [compress.SparseGPT(pattern="2:4")], calib=ids, batch_size=2)
    prefix, blocks = find_blocks(model)
    assert len(report["layers"]) == sum(len(block_linears(b)) for b in blocks)
    for b in blocks:
        for name, m in block_linears(b).items():
            assert is_nm(get_weight(m), 2, 4), f"{arch} {name}"  # [out, in]: groups along the input
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and not torch.allclose(logits, dense_logits)


def _gemma2_twin(model, **changes):
    """The same weights under another attention config."""
    import copy

    import transformers as tf
    cfg = copy.deepcopy(model.config)
    for k, v in changes.items():
        setattr(cfg, k, v)
    twin = tf.AutoModelForCausalLM.from_config(cfg).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def test_gemma2_sliding_and_full_layers_calibrate_on_their_own_masks():
    """Gemma 2 alternates sliding (layer 0) and full (layer 1) attention. The runner must
    give layer 0 the 8-token window and layer 1 the plain causal mask. An o_proj's inputs
    are its layer's attention outputs, so it compresses differently when its layer's mask
    differs, while q/k/v (inputs: the layer's hidden states) come out the same:
      - against a twin whose window (4096) covers all 16 tokens, layer 0 differs;
      - against a twin whose layer 1 slides too, layer 0 is the same and layer 1 differs."""
    model = _tiny("gemma2")
    wide = _gemma2_twin(model, sliding_window=4096)
    both = _gemma2_twin(model, layer_types=["sliding_attention", "sliding_attention"])
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    ids = calib_ids(128, n=4, seq=16)
    _, blocks = find_blocks(model)
    kw = capture_inputs(model, blocks, ids, 2, "cpu", "cpu").kwargs
    q, k = torch.arange(16)[:, None], torch.arange(16)[None, :]
    allowed = [kw[i][0]["attention_mask"][0, 0] == 0 for i in (0, 1)]        # additive masks [q, k], eager attention
    assert torch.equal(allowed[0], (k <= q) & (k > q - GEMMA2_WINDOW))       # query 15 sees keys 8..15 only
    assert torch.equal(allowed[1], k <= q)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, wide(ids).logits)      # the window changes the forward
    for m in (model, wide, both):
        compress.run(m, [compress.SparseGPT(pattern="2:4")], calib=ids, batch_size=2)

    def same(x, y, layer, proj):
        return torch.equal(getattr(x.model.layers[layer].self_attn, proj).weight,
                           getattr(y.model.layers[layer].self_attn, proj).weight)
    qkv = ("q_proj", "k_proj", "v_proj")
    assert all(same(model, wide, 0, p) for p in qkv) and not same(model, wide, 0, "o_proj")
    assert all(same(model, both, 0, p) for p in (*qkv, "o_proj"))
    assert all(same(model, both, 1, p) for p in qkv) and not same(model, both, 1, "o_proj")


def test_nm_on_indivisible_layer_is_refused_before_work(tiny_llama):
    import transformers as tf
    cfg = tf.LlamaConfig(hidden_size=66, intermediate_size=128, num_hidden_layers=1, num_attention_heads=3,
                         num_key_value_heads=3, vocab_size=64)
    model = tf.LlamaForCausalLM(cfg).eval()
    from compress.runner import preflight
    with pytest.raises(CompressError, match=r"model.layers.0.self_attn.q_proj has input size 66"):
        preflight(model, [compress.Wanda(pattern="2:4")])


def test_targets_matching_nothing(tiny_llama):
    from compress.runner import preflight
    with pytest.raises(CompressError, match="wanda.targets"):
        preflight(tiny_llama, [compress.Wanda(targets=["nothing_here"])])


def test_targets_and_ignore(tiny_llama):
    _, report = compress.run(tiny_llama, [{"magnitude": {"sparsity": 0.5, "targets": ["mlp"], "ignore": ["down_proj"]}}],
                             calib=calib_ids(300))
    assert sorted({r["layer"].split(".")[-1] for r in report["layers"]}) == ["gate_proj", "up_proj"]
    assert (tiny_llama.model.layers[0].self_attn.q_proj.weight != 0).all()


def test_python_api_with_calib_config(tiny_llama, tiny_tokenizer):
    from calib import CalibConfig
    cfg = CalibConfig(source="self", nsamples=4, seqlen=16, seed=0)
    with pytest.raises(CompressError, match="calib: a CalibConfig needs tokenizer"):
        compress.run(tiny_llama, [compress.Wanda(sparsity=0.5, pattern="2:4")], calib=cfg)
    _, report = compress.run(tiny_llama, [compress.Wanda(sparsity=0.5, pattern="2:4")], calib=cfg,
                             tokenizer=tiny_tokenizer)
    assert report["calibration"] == {"nsamples": 4, "seqlen": 16} and report["summary"]["sparsity"] == 0.5


def test_segments_keep_recipe_order():
    from compress.block import segments
    from compress.passes.base import make_config

    sweep = [make_config(n, a) for n, a in [("wanda", {}), ("perp", {"mode": "reconstruct", "train": ["masklora"]}),
                                            ("quant", {"method": "rtn"})]]
    assert [[c.name for c in s] for s in segments(sweep)] == [["wanda", "perp"], ["quant"]]
    sweep = [make_config("perp", {"mode": "reconstruct", "train": ["masklora"]}), make_config("gqsa", {})]
    assert [[c.name for c in s] for s in segments(sweep)] == [["perp"], ["gqsa"]]   # gqsa: one-shot, then BQPO


def test_a_packed_weight_that_is_not_the_propagated_one_is_refused():
    from torch import nn

    from compress.block import finish_linear
    from compress.passes.base import Layer
    from compress.quantize import QuantSpec, rtn

    W = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    layer = Layer("model.layers.0.mlp.up_proj", W.clone(), W.clone(), None)
    layer.packed = rtn(W, None, QuantSpec(4, 32))
    layer.W.copy_(layer.packed.dequantize())
    lin = nn.Linear(32, 4, bias=False)
    assert finish_linear(layer, lin, W.clone(), [])["shape"] == [4, 32]   # consistent: accepted
    layer.W[0, 0] += 1.0   # a later change the packed codes do not carry
    with pytest.raises(RuntimeError, match="up_proj: the packed weight differs"):
        finish_linear(layer, lin, W.clone(), [])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_activation_names_the_first_layer_that_reads_it(tiny_llama, bad):
    """A NaN / inf reaching a linear's input stops the sweep there, naming the layer, before
    any statistic from it is used: here the first block's attention norm emits it."""
    _, blocks = find_blocks(tiny_llama)
    with torch.no_grad():
        blocks[1].post_attention_layernorm.weight[3] = bad
    with pytest.raises(FloatingPointError, match=r"non-finite activations at the input of model\.layers\.1\.mlp\.gate_proj"):
        compress.run(tiny_llama, [{"wanda": {"sparsity": 0.5}}], calib=calib_ids(300), batch_size=4)


def test_the_statistics_forward_stops_at_the_last_linear_s_input_after_the_first_batch(tiny_llama):
    """Batch 0 runs the whole block (to learn the order of its linears); later batches stop
    at down_proj's input: down_proj itself runs once, yet its statistics cover every batch."""
    _, blocks = find_blocks(tiny_llama)
    inputs = capture_inputs(tiny_llama, blocks, calib_ids(300, n=12), 4, "cpu", "cpu").block(0)   # 3 batches
    down, seen, ran = blocks[0].mlp.down_proj, [], []
    h1 = down.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    stats = collect_stats(blocks[0], block_linears(blocks[0]), inputs, True, "cpu")
    h2 = down.register_forward_hook(lambda m, a, o: ran.append(1))
    h1.remove()
    assert len(seen) == 3 and stats["mlp.down_proj"].n == 12 * 32
    X = torch.cat(seen)
    assert torch.allclose(stats["mlp.down_proj"].xtx, X.T @ X, rtol=1e-4, atol=1e-3)
    collect_stats(blocks[0], block_linears(blocks[0]), inputs, False, "cpu")
    assert len(ran) == 1                                  # the first batch only
    outs = []
    collect_stats(blocks[0], block_linears(blocks[0]), inputs, False, "cpu", outputs=outs)
    h2.remove()
    assert len(ran) == 4 and len(outs) == 3               # outputs wanted: every batch runs whole
