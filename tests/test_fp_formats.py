"""Floating-point group formats (compress/fp_formats.py): NVFP4, MXFP4, FP8 as grids of
the quant pass, their runtime module (FPLinear), and their compressed-tensors export,
read back by the compressed-tensors library."""
import json

import pytest
import torch

import compress
from compress.errors import CompressError
from compress.fp_formats import E2M1_CODES, FPSpec, e2m1_codes, e2m1_round, e4m3, e8m0_exponent
from compress.nn import FPLinear, module_for
from compress.nn.fp_linear import pack_fp4, unpack_fp4
from compress.passes.base import make_config
from compress.passes.quant import gptq
from compress.quantize import rtn
from helpers import correlated_inputs, is_nm, output_error

FORMATS = ("nvfp4", "mxfp4", "fp8")


def test_e2m1_rounds_to_nearest_ties_to_even_and_saturates():
    x = torch.tensor([0.24, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 2.6, 3.5, 5.0, 5.1, 9.0, -0.75, -4.9])
    want = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 3.0, 4.0, 4.0, 6.0, 6.0, -1.0, -4.0])
    codes = e2m1_codes(x)
    assert torch.equal(E2M1_CODES[codes.long()], want)
    assert codes[-1] == 8 + 6 and codes[3] == 2            # sign bit 8; 1.0 is magnitude index 2
    padded = torch.cat([x, torch.zeros(5000)])             # past _ONE_OP: seven compares, not bucketize
    assert torch.equal(e2m1_codes(padded)[:len(x)], codes)


def test_e2m1_one_column_path_equals_the_whole_matrix_path_at_every_midpoint():
    """Both ways of rounding (one bucketize for a GPTQ column, seven compares for a whole
    matrix) agree on every midpoint, its fp32 neighbours and a sweep, with either sign."""
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    near = torch.cat([mids, torch.nextafter(mids, torch.tensor(9.0)), torch.nextafter(mids, torch.tensor(0.0))])
    x = torch.cat([near, -near, torch.linspace(-8, 8, 20001)])
    whole = e2m1_codes(x)
    assert x.numel() > 4096
    assert torch.equal(torch.cat([e2m1_codes(c) for c in x.split(1000)]), whole)


def test_e2m1_round_is_the_code_table_of_e2m1_codes_on_both_paths():
    """The values-only rounding (GPTQ's column loop, the clip search) is the slow twin's
    table lookup of the codes, at every midpoint and its neighbours, a sweep, inf and nan
    (a scale of 0), on the one-column path and the whole-matrix path; zero has code 0."""
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 2.0, 4.0, 6.0])
    near = torch.cat([mids, torch.nextafter(mids, torch.tensor(9.0)), torch.nextafter(mids, torch.tensor(0.0))])
    x = torch.cat([near, -near, torch.linspace(-8, 8, 20001), torch.tensor([float("inf"), -float("inf")])])
    want = E2M1_CODES[e2m1_codes(x).long()]
    assert x.numel() > 4096 and torch.equal(e2m1_round(x), want)
    assert torch.equal(torch.cat([e2m1_round(c) for c in x.split(1000)]), want)
    nan = torch.tensor([float("nan")])
    assert e2m1_round(nan).abs().item() == 6.0 and e2m1_round(nan.expand(5000)).abs().max().item() == 6.0
    assert e2m1_codes(torch.tensor([-0.25, -0.1, -0.26])).tolist() == [0.0, 0.0, 9.0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_snap_equals_dequantize_of_quantize_and_gptq_equals_its_slow_twin(fmt):
    """FPSpec.snap is dequantize(quantize()) to the bit, scales of 0 included; GPTQ that
    rounds columns with it (and reads the codes off afterwards) gives the codes and
    weights of GPTQ through quantize / dequantize, dense and with 2:4 zeros."""
    spec = FPSpec(fmt, clip_search=True)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 6, 32, generator=g) * 2
    s = torch.rand(64, 6, 1, generator=g) * 0.5
    s[0, 0], w[1, 1] = 0.0, 0.0
    assert torch.equal(spec.snap(w, s), spec.dequantize(spec.quantize(w, s, 0), s, 0))
    col = w[:, 0, 0].contiguous()                             # one GPTQ column: the bucketize path
    assert torch.equal(spec.snap(col, s[:, 0, 0]), spec.dequantize(spec.quantize(col, s[:, 0, 0], 0), s[:, 0, 0], 0))

    class Slow(FPSpec):   # GPTQ falls back to codes per column (no clip search: it would call snap)
        snap = None
    X = correlated_inputs(512, 64)
    H = X.T @ X / 512
    W = torch.randn(48, 64, generator=g)
    for keep in (torch.ones_like(W, dtype=torch.bool), (torch.arange(64) % 4 < 2).expand(48, 64)):
        # gptq edits H in place: each call gets its own copy
        fast = gptq(W * keep, H.clone(), keep, FPSpec(fmt), act_order=True, static_groups=True)
        slow = gptq(W * keep, H.clone(), keep, Slow(fmt), act_order=True, static_groups=True)
        assert torch.equal(fast.codes, slow.codes) and torch.equal(fast.dequantize(), slow.dequantize())


def test_nvfp4_scale_of_a_known_group():
    """Tensor max 6 gives the global scale g = 448 * 6 / 6 = 448. A group with max 3:
    S = e4m3(3 / 6 * 448) = 224 exactly, scale 224 / 448 = 0.5. A group with max 1.3:
    1.3 / 6 * 448 = 97.07, and E4M3 steps by 8 between 64 and 128, so S = 96."""
    W = torch.zeros(3, 16)
    W[0, 0], W[1, 5], W[2, 9] = 6.0, -3.0, 1.3
    scale, zero, raw = FPSpec("nvfp4").fit_raw(W[:, None, :], torch.ones_like(W[:, None, :], dtype=torch.bool))
    assert float(raw["global_scale"]) == 448.0 and torch.equal(zero, torch.zeros(3, 1))
    assert torch.equal(scale[:, 0], torch.tensor([448.0, 224.0, 96.0]) / 448)    # fp32 divisions
    assert float(e4m3(torch.tensor(97.07))) == 96.0
    res = rtn(W, None, FPSpec("nvfp4"))
    assert res.dequantize()[1, 5] == -3.0 and res.dequantize()[2, 9] == pytest.approx(1.3, abs=0.11)


def test_mxfp4_shared_exponent():
    """e = floor(log2 max) - 2, one up when the maximum's mantissa is 1.75 or more."""
    amax = torch.tensor([1.0, 1.74, 1.76, 6.0, 7.5, 0.3])
    assert e8m0_exponent(amax).tolist() == [-2, -2, -1, 0, 1, -4]
    scale, _, raw = FPSpec("mxfp4").fit_raw(amax[:, None, None].expand(6, 1, 32).clone(),
                                            torch.ones(6, 1, 32, dtype=torch.bool))
    assert raw is None and scale[:, 0].tolist() == [0.25, 0.25, 0.5, 1.0, 2.0, 1 / 16]
    # 1.74 / 0.25 = 6.96 saturates to 6 (1.5); 1.76 / 0.5 = 3.52 rounds to 4 (2.0)
    res = rtn(amax[:, None].expand(6, 32).contiguous(), None, FPSpec("mxfp4"))
    assert res.dequantize()[:3, 0].tolist() == [1.0, 1.5, 2.0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_gptq_beats_rtn_on_correlated_inputs(fmt):
    X = correlated_inputs(1024, 128)
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    spec = FPSpec(fmt)
    H = X.T @ X / X.shape[0]
    g = gptq(W, H, torch.ones_like(W, dtype=torch.bool), spec, act_order=True, static_groups=True)
    r = rtn(W, None, spec)
    assert output_error(W, g.dequantize(), X) < 0.7 * output_error(W, r.dequantize(), X)


@pytest.mark.parametrize("fmt", FORMATS)
def test_module_stores_exactly_what_the_grid_computed(fmt):
    W = torch.randn(48, 96, generator=torch.Generator().manual_seed(2))
    W[:, ::4] = 0                                             # pruned weights stay zero
    res = rtn(W, W != 0, FPSpec(fmt, clip_search=True))
    m = module_for(res)
    assert isinstance(m, FPLinear) and torch.equal(m.effective_weight(), res.dequantize())
    assert torch.equal(m.codes(), res.codes) and (m.effective_weight()[:, ::4] == 0).all()
    bits = {"nvfp4": 4 + 8 / 16 + 32 / (48 * 96), "mxfp4": 4 + 8 / 32, "fp8": 8 + 32 / 96}[fmt]
    assert m.bits_per_weight() == pytest.approx(bits)


def test_fp4_pack_round_trip():
    codes = torch.randint(0, 16, (5, 34), dtype=torch.uint8)
    packed = pack_fp4(codes)
    assert packed.shape == (5, 17) and packed[0, 0] == codes[0, 0] | (codes[0, 1] << 4)
    assert torch.equal(unpack_fp4(packed), codes)


def _ids():
    return torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fmt", FORMATS)
def test_run_save_load_and_24_stays_exact(fmt, tiny_llama, tmp_path):
    model, report = compress.run(tiny_llama, [compress.SparseGPT(pattern="2:4"), compress.Quant(format=fmt)],
                                 calib=_ids())
    mods = {n: m for n, m in model.named_modules() if isinstance(m, FPLinear)}
    assert len(mods) == 14 and all(is_nm(m.effective_weight(), 2, 4) for m in mods.values())
    ids = _ids()[:2]
    with torch.no_grad():
        logits = model(ids).logits
    loaded, _ = compress.load(str(compress.save(str(tmp_path / "out"), model, report=report)))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
    assert {type(m).__name__ for n, m in loaded.named_modules() if n in mods} == {"FPLinear"}


def test_nvfp4_layers_fused_at_serving_share_one_global_scale(tiny_llama):
    """vLLM loads q/k/v (and gate/up) as one layer with one global scale: theirs is the
    same, from the largest |w| of the group; o_proj and down_proj keep their own."""
    compress.run(tiny_llama, [compress.Quant(format="nvfp4", method="rtn")], calib=_ids())
    layer = tiny_llama.model.layers[1]
    a, m = layer.self_attn, layer.mlp
    gs = {n: float(getattr(x, n).global_scale) for x in (a, m) for n in dir(x) if n.endswith("_proj")}
    assert gs["q_proj"] == gs["k_proj"] == gs["v_proj"] and gs["gate_proj"] == gs["up_proj"]
    dense = {n: float(getattr(x, n).effective_weight().abs().max()) for x in (a, m) for n in dir(x) if n.endswith("_proj")}
    assert gs["o_proj"] != gs["q_proj"] and gs["down_proj"] != gs["up_proj"]
    assert gs["q_proj"] == pytest.approx(448 * 6 / max(dense[n] for n in ("q_proj", "k_proj", "v_proj")), rel=1e-6)


@pytest.mark.parametrize("args,match", [
    ({"format": "nvfp4", "group_size": 32}, r"quant\.group_size: format nvfp4 fixes groups of 16; expected 16"),
    ({"format": "mxfp4", "group_size": 16}, r"quant\.group_size: format mxfp4 fixes groups of 32; expected 32"),
    ({"format": "fp8", "group_size": 64}, r"quant\.group_size: format fp8 fixes groups of channel"),
    ({"format": "nvfp4", "symmetric": False}, r"quant\.symmetric: format nvfp4 is symmetric"),
    ({"format": "fp8", "bits": 6}, r"quant\.bits: format fp8 has 8-bit elements"),
    ({"format": "nvfp4", "bits": 8}, r"quant\.bits: format nvfp4 has 4-bit elements"),
    ({"format": "gguf-q4_0", "symmetric": True}, r"quant\.symmetric: format gguf-q4_0 sets the grid"),
    ({"format": "fp4"}, r"quant\.format: expected int, one of nvfp4, mxfp4, fp8"),
])
def test_bad_format_arguments(args, match):
    with pytest.raises(CompressError, match=match):
        make_config("quant", args)
    make_config("quant", {"format": "nvfp4", "group_size": 16, "symmetric": True})   # the format's own: fine


def test_a_layer_that_is_not_whole_groups_is_refused_before_any_work():
    with pytest.raises(CompressError, match=r"quant\.format: l has 40 inputs, not whole groups of 32 \(mxfp4\)"):
        make_config("quant", {"format": "mxfp4"}).check_layer("l", 8, 40)


# ----------------------------------------------------------------------------- compressed-tensors

def _read_back(folder) -> dict:
    """{module.weight: fp32 [out, in]} that the compressed-tensors library's own
    compressors decompress from the checkpoint, per quantized module (fp32 throughout;
    the library's default bf16 would round)."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from safetensors.torch import load_file

    assert ct.__version__ >= "0.20"
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=group["targets"], weights=QuantizationArgs(**group["weights"]),
                                format=group["format"])
    compressor = BaseCompressor.get_value_from_registry(group["format"])
    sd, out = load_file(str(folder / "model.safetensors")), {}
    for key in [k for k in sd if k.endswith("weight_scale")]:
        m = key[:-len(".weight_scale")]
        t = {p: sd[f"{m}.{p}"] for p in compressor.compression_param_names(scheme)}
        if "weight_packed" in t:     # the library's unpacking and scale decoding, its dequantize in fp32
            q = unpack_fp4_from_uint8(t["weight_packed"], t["weight_packed"].shape[0], 2 * t["weight_packed"].shape[1],
                                      dtype=torch.float32)
            s = compressor._decompress_scale(t["weight_scale"], torch.float32)
            out[f"{m}.weight"] = dequantize(q, s, args=scheme.weights, global_scale=t.get("weight_global_scale"),
                                            dtype=torch.float32)
        else:
            out[f"{m}.weight"] = compressor.decompress({k: v.float() if k == "weight_scale" else v
                                                        for k, v in t.items()}, scheme)["weight"].float()
    return out


@pytest.mark.parametrize("fmt,ct_format", [("nvfp4", "nvfp4-pack-quantized"), ("mxfp4", "mxfp4-pack-quantized"),
                                           ("fp8", "float-quantized")])
def test_compressed_tensors_read_back_is_exact(fmt, ct_format, tiny_llama, tiny_tokenizer, tmp_path):
    from compress.export import ExportConfig, export
    compress.run(tiny_llama, [compress.SparseGPT(pattern="2:4"), compress.Quant(format=fmt, method="rtn")],
                 calib=_ids())
    want = {f"{n}.weight": m.effective_weight() for n, m in tiny_llama.named_modules() if isinstance(m, FPLinear)}
    out = export(tiny_llama, tiny_tokenizer, str(tmp_path / "ct"), ExportConfig(format="compressed-tensors"))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == ct_format and qc["config_groups"]["group_0"]["weights"]["type"] == "float"
    assert qc["sparsity_config"]["sparsity_structure"] == "2:4"
    got = _read_back(out)
    assert set(got) == set(want) and len(want) == 14
    for k, W in want.items():
        assert torch.equal(got[k], W), k                     # element by element, bit for bit
        assert is_nm(got[k], 2, 4), k
