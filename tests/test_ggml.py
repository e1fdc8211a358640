"""llama.cpp's block grids (compress.ggml, compress.ggml_blocks): formats by hand, our
bytes read back by gguf.quants to exactly our weights, GPTQ on the grids, fallbacks,
GGMLLinear save / load."""
import pytest
import torch

import compress
from compress.errors import CompressError
from compress.ggml import FORMATS, ZERO_EXACT, GGMLSpec, format_for
from compress.ggml_blocks import BYTES, dequantize, pack, row_bytes, unpack
from compress.nn.ggml_linear import GGMLLinear
from compress.passes.base import Layer, make_config, pass_fn
from compress.quantize import rtn
from helpers import check_reload_packed, correlated_inputs, stats_of

gguf = pytest.importorskip("gguf")


def weights(out=8, d_in=512, sparse=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, d_in, generator=g) * torch.rand(1, d_in, generator=g)
    if sparse:
        W = W * (torch.rand(out, d_in, generator=g) > 0.5)
    return W


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("search", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_our_bytes_read_back_by_gguf_quants_to_our_weights(fmt, search, sparse):
    W = weights(sparse=sparse)
    res = rtn(W, W != 0 if sparse else None, GGMLSpec(fmt, search))
    ours = res.dequantize()
    blocks = pack(fmt, res.codes, res.raw)
    assert blocks.shape == (8, 512 // FORMATS[fmt][0] * BYTES[fmt]) == (8, row_bytes(fmt, 512))
    ref = gguf.quants.dequantize(blocks.numpy(), getattr(gguf.GGMLQuantizationType, fmt.upper()))
    assert torch.equal(torch.from_numpy(ref), ours)                  # bit for bit
    assert torch.equal(dequantize(blocks, fmt, 512), ours)
    u, _, _ = unpack(blocks, fmt, 512)
    assert torch.equal(u, res.codes)
    rel = float(((ours - W) ** 2).sum() / (W ** 2).sum())
    assert rel < {4: 0.02, 5: 0.005, 6: 0.001, 8: 1e-4}[FORMATS[fmt][2]]
    if sparse and fmt in ZERO_EXACT:
        assert bool((ours[W == 0] == 0).all())                      # pruned weights stay exactly 0


def test_q4_0_block_by_hand():
    x = torch.tensor([-4.0, 3.5, 1.0, 0.26] + [0.0] * 28)            # extreme -4 -> d = -4 / -8 = 0.5
    res = rtn(x[None], None, GGMLSpec("q4_0", clip_search=False))
    assert float(res.scale[0, 0]) == 0.5 and float(res.zero[0, 0]) == 8
    assert res.codes[0, :5].tolist() == [0, 15, 10, 9, 8]            # round(x / 0.5) + 8, clamped to 15
    assert res.dequantize()[0, :5].tolist() == [-4.0, 3.5, 1.0, 0.5, 0.0]
    b = pack("q4_0", res.codes, res.raw)[0]
    assert b[:2].view(torch.float16).item() == 0.5 and b[2].item() == 0 | 8 << 4   # u[0] | u[16] << 4


def test_q8_0_is_absmax_over_127_and_q6_k_sub_scales_are_int8():
    x = torch.linspace(-2, 1, 32)[None]
    res = rtn(x, None, GGMLSpec("q8_0", clip_search=False))
    assert float(res.scale[0, 0]) == float(torch.tensor(2 / 127).half())
    res = rtn(weights(2, 256), None, GGMLSpec("q6_k"))
    sc, d = res.raw["sc"], res.raw["d"]                               # [2, 1, 16], [2, 1]
    assert sc.abs().max() <= 128 and torch.equal(sc, sc.round())
    assert torch.equal(res.scale, (d[..., None] * sc).reshape(2, 16))


def test_k_quant_zero_exact_layout_on_pruned_blocks():
    """A Q4_K block holding pruned weights stores dmin = 8 d and m = sc, so code 8 is 0."""
    W = weights(4, 512)
    W[:, :256] *= torch.rand(4, 256, generator=torch.Generator().manual_seed(1)) > 0.5   # block 0 sparse
    res = rtn(W, W != 0, GGMLSpec("q4_k"))
    r = res.raw
    assert torch.equal(r["dmin"][:, 0], 8 * r["d"][:, 0]) and torch.equal(r["m"][:, 0], r["sc"][:, 0])
    assert not torch.equal(r["m"][:, 1], r["sc"][:, 1])              # the dense block keeps its mins
    assert bool((res.dequantize()[W == 0] == 0).all())


def test_search_lowers_the_error_of_k_quants():
    W = weights(16, 1024)
    err = {s: float(((rtn(W, None, GGMLSpec("q4_k", s)).dequantize() - W) ** 2).sum()) for s in (False, True)}
    assert err[True] < 0.9 * err[False]


def test_fallbacks_are_llama_cpp_s():
    assert format_for("q4_k", 576) == "q5_0" and format_for("q5_k", 576) == "q5_1"
    assert format_for("q6_k", 576) == "q8_0" and format_for("q4_k", 1536) == "q4_k"
    assert format_for("q4_k", 48) is None and format_for("q4_0", 40) is None


def quant_layer(W, stats, **args):
    cfg = make_config("quant", args)
    layer = Layer("model.layers.0.mlp.down_proj", W.clone(), W.clone(), stats)
    pass_fn(cfg)(layer, cfg)
    return layer


@pytest.mark.parametrize("fmt", ["q4_0", "q4_k", "q6_k"])
def test_gptq_on_the_grid_beats_rtn_on_it_and_stays_on_it(fmt):
    X = correlated_inputs(1024, 512, seed=0)
    W = weights(32, 512)
    st = stats_of(X)
    err = {}
    for method in ("rtn", "gptq"):
        layer = quant_layer(W, st, method=method, format=f"gguf-{fmt}")
        res = layer.packed
        assert torch.equal(layer.W, res.dequantize())
        D = (layer.W - W).double()
        err[method] = float(((D @ (X.T @ X).double()) * D).sum())
        blocks = pack(fmt, res.codes, res.raw)
        ref = gguf.quants.dequantize(blocks.numpy(), getattr(gguf.GGMLQuantizationType, fmt.upper()))
        assert torch.equal(torch.from_numpy(ref), layer.W)           # GPTQ's codes are the file's
    assert err["gptq"] < 0.8 * err["rtn"]


@pytest.mark.parametrize("fmt", ["q4_0", "q4_k", "q6_k", "q8_0"])
def test_the_fit_minimizes_the_error_it_is_given_weights_for(fmt):
    """The search picks each block's scale by the least squares it is handed: weighted by
    input importances, the importance-weighted error is below that of ggml's own weights."""
    W = weights(16, 512)
    imp = torch.exp(2 * torch.randn(1, 512, generator=torch.Generator().manual_seed(3)))   # [1, in]
    spec = GGMLSpec(fmt)
    Wg, Kg = W.reshape(16, -1, spec.group_size), torch.ones(16, 512 // spec.group_size, spec.group_size, dtype=bool)
    err = {}
    for name, arg in (("ggml", None), ("imp", imp.reshape(1, -1, spec.group_size))):
        s, z, _ = spec.fit_raw(Wg, Kg, arg)
        u = spec.quantize(Wg, s[..., None], z[..., None])
        err[name] = float((imp * (spec.dequantize(u, s[..., None], z[..., None]).reshape(W.shape) - W) ** 2).sum())
    assert err["imp"] < 0.8 * err["ggml"]


@pytest.mark.parametrize("fmt", ["q4_0", "q4_k"])
def test_hessian_fit_lowers_gptq_s_output_error(fmt):
    X = correlated_inputs(1024, 512, seed=0)
    W, st = weights(32, 512), stats_of(X)
    err = {}
    for hf in (False, True):
        D = (quant_layer(W, st, method="gptq", format=f"gguf-{fmt}", hessian_fit=hf).W - W).double()
        err[hf] = float(((D @ (X.T @ X).double()) * D).sum())
    assert err[True] < 0.95 * err[False]     # 0.89 (q4_0) and 0.78 (q4_k) measured


def test_pruned_weights_stay_zero_through_gptq_on_q4_k():
    X = correlated_inputs(1024, 256, seed=1)
    W = weights(16, 256)
    W[:, ::2] = 0                                                      # 50 %, every other input
    layer = quant_layer(W, stats_of(X), method="gptq", format="gguf-q4_k")
    assert bool((layer.W[:, ::2] == 0).all())


def test_rows_that_are_not_super_blocks_fall_back_and_say_so():
    layer = quant_layer(weights(8, 576), None, method="rtn", format="gguf-q4_k")
    assert layer.packed.spec.fmt == "q5_0" and "fallback" in layer.info["format"]
    with pytest.raises(CompressError, match=r"quant.format: .*down_proj has 48 inputs"):
        quant_layer(weights(8, 48), None, method="rtn", format="gguf-q4_k")
    W = weights(8, 256, sparse=True)
    assert "no exact 0" in quant_layer(W, None, method="rtn", format="gguf-q4_1").info["zeros"]


@pytest.mark.parametrize("args, field", [
    ({"format": "gguf-q3_k"}, "quant.format"), ({"format": "gguf-q4_k", "bits": 3}, "quant.bits"),
    ({"format": "gguf-q4_k", "group_size": 32}, "quant.group_size"),
    ({"format": "gguf-q4_k", "static_groups": False}, "quant.static_groups")])
def test_bad_format_arguments_name_the_field(args, field):
    with pytest.raises(CompressError, match=field):
        make_config("quant", args).validate()


def test_ggml_linear_run_save_load_identical_logits(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    model, _ = compress.run(model, [{"quant": {"format": "gguf-q4_k"}}], calib=ids)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, GGMLLinear)}
    assert len(packed) == 14 and {m.fmt for m in packed.values()} == {"q4_k"}
    assert packed["model.layers.0.mlp.down_proj"].bits_per_weight() == 144 * 8 / 256    # 4.5
    with torch.no_grad():
        logits = model(ids).logits
    check_reload_packed(compress.save(str(tmp_path / "out"), model), ids, logits, packed)
