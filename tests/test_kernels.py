"""Kernels (compress/kernels) against their plain-torch meaning (reference.py).

On CPU the Triton kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1)
at small sizes. The checks that need a GPU (the sparse tensor cores, Llama-3-8B shapes)
are in test_cuda_kernels.py, run by `pytest -m cuda`.
"""
from __future__ import annotations

import pytest
import torch
from archs import tiny
from transformers import AutoConfig, AutoModelForCausalLM

import compress
from compress.deploy import REFERENCE, bind, choose, deploy, sparse24_candidates
from compress.fp_formats import E2M1_CODES, E4M3_CODES, FPSpec
from compress.kernels import reference as R
from compress.masks import nm_mask
from compress.nn import ArmorLinear, FPLinear, GQSALinear, QuantLinear, SparseQuantLinear, module_for
from compress.nn.armor_linear import ArmorResult
from compress.packing import pack_bits
from compress.quantize import QuantSpec, rtn

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all()
    return float((a.float() - b.float()).norm() / b.float().norm())


def tol(dtype) -> float:
    """fp32 multiplies in ieee fp32; fp16 / bf16 round the rebuilt weight tile and the output
    (bf16 to 8 mantissa bits: about 4e-3 relative), hence 1e-2."""
    return 1e-3 if dtype == torch.float32 else 1e-2


def quant_module(N, K, bits, group, sym, sparse=False, seed=0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g)
    keep = nm_mask(W.abs(), 2, 4) if sparse else None
    res = rtn(W if keep is None else W * keep, keep, QuantSpec(bits, group, sym))
    res.sparse24 = sparse
    return module_for(res)


def fp_module(N, K, fmt, seed=0) -> FPLinear:
    """An FPLinear (nvfp4 / mxfp4 / fp8) of a random [N, K] weight, with a bias."""
    g = torch.Generator().manual_seed(seed)
    return module_for(rtn(torch.randn(N, K, generator=g), None, FPSpec(fmt)), torch.randn(N, generator=g))


def armor_module(N, K, b, seed=0) -> ArmorLinear:
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(N, K, generator=g)
    keep = nm_mask(S.abs(), 2, 4)
    A = torch.eye(b) + 0.1 * torch.randn(N // b, b, b, generator=g)
    B = torch.eye(b) + 0.1 * torch.randn(K // b, b, b, generator=g)
    return module_for(ArmorResult(A.half(), B.half(), (S * keep).half().float(), keep))


# ----------------------------------------------------------------------------- reference

def test_reference_quant_matmul_by_hand():
    # One output row, 8 inputs in 2 groups of 4, 4-bit asymmetric.
    codes = torch.tensor([[0, 1, 2, 3, 8, 9, 10, 15]], dtype=torch.uint8)
    scales = torch.tensor([[0.5, 2.0]], dtype=torch.float16)
    qzeros = pack_bits(torch.tensor([[1, 8]]), 4)                     # z = 1, then 8
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0]])
    # W = [(0-1)/2, 0, 1/2, 1, 0, 2, 4, 14]; y = -0.5 + 0 + 0.5 + 1 + 0 + 14 = 15
    y = R.quant_matmul(x, pack_bits(codes, 4), scales, qzeros, bits=4, group_size=4)
    assert y.item() == 15.0


def test_reference_sparse24_quant_matmul_by_hand():
    # 8 inputs: group 0 keeps slots (1, 3) -> index 4; group 1 keeps (0, 2) -> index 1.
    kept = torch.tensor([[9, 10, 11, 6]], dtype=torch.uint8)          # symmetric: z = 8
    pattern = pack_bits(torch.tensor([[4, 1]]), 3)
    scales = torch.tensor([[1.0]], dtype=torch.float16)
    x = torch.arange(1.0, 9.0)[None]                                  # [1, 2, ..., 8]
    # W = [0, 1, 0, 2, 3, 0, -2, 0]; y = 2 + 8 + 15 - 14 = 11
    y = R.sparse24_quant_matmul(x, pack_bits(kept, 4), pattern, scales, None, bits=4, group_size=None)
    assert y.item() == 11.0


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("sym", [False, True])
def test_reference_equals_the_modules(sparse, sym):
    m = quant_module(24, 96, 4, 32, sym, sparse)
    assert isinstance(m, SparseQuantLinear) == sparse
    x = torch.randn(5, 96)
    op = (lambda: R.sparse24_quant_matmul(x, m.qweight, m.pattern, m.scales, m.qzeros, 4, 32)) if sparse else \
        (lambda: R.quant_matmul(x, m.qweight, m.scales, m.qzeros, 4, 32))
    assert rel(op(), m(x)) < 1e-6


def test_reference_fp_matmul_by_hand():
    # NVFP4, one row of 16 inputs (one group): codes 1 (0.5), 9 (-0.5), 7 (6), 15 (-6), then 0;
    # scale S = E4M3 0x40 (2.0) over g = 4: effective scale 0.5.
    codes = torch.tensor([1, 9, 7, 15] + [0] * 12, dtype=torch.uint8)
    qweight = (codes[0::2] | (codes[1::2] << 4))[None]               # even column in the low nibble
    scales = torch.tensor([[0x40]], dtype=torch.uint8)
    x = torch.tensor([[1.0, 0.0, 2.0, 1.0] + [1.0] * 12])
    # W = [0.25, -0.25, 3, -3, 0, ...]; y = 0.25 + 6 - 3 = 3.25
    assert R.fp_matmul(x, qweight, scales, torch.tensor([4.0]), "nvfp4").item() == 3.25


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "fp8"])
def test_reference_fp_matmul_equals_the_module(fmt):
    m = fp_module(24, 96, fmt)
    x = torch.randn(5, 96)
    assert m.kernel == REFERENCE
    assert rel(R.fp_matmul(x, m.qweight, m.scales, m.global_scale, fmt, m.bias), m(x)) < 1e-6


def test_reference_armor_equals_the_module():
    m = armor_module(32, 64, 8)
    x = torch.randn(3, 64)
    assert rel(R.armor_matmul(x, m.A, m.core(), m.B), m(x)) < 1e-5


def test_reference_sparse24_rejects_a_dense_weight():
    W = torch.randn(8, 16)
    with pytest.raises(ValueError, match="not 2:4"):
        R.sparse24_matmul(torch.randn(2, 16), W)
    W24 = W * nm_mask(W.abs(), 2, 4)
    assert torch.equal(R.sparse24_matmul(torch.eye(16), W24), W24.T)


# ----------------------------------------------------------------------------- Triton

def _need_triton():
    pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[dev]')")


CASES = [(4, 64, False), (4, 64, True), (4, None, False), (8, 32, False), (4, 48, True), (2, 16, False)]


def _triton_vs_reference(m, x, bias):
    """(Triton, reference) y for the module's storage: the 2:4 kernel for a SparseQuantLinear,
    the FP kernel for an FPLinear."""
    from compress.kernels.fp_matmul import fp_matmul
    from compress.kernels.quant_matmul import quant_matmul
    from compress.kernels.sparse_quant_matmul import sparse24_quant_matmul
    b, g = m.spec.bits, m.spec.group_size
    xc, bc = x.cpu(), None if bias is None else bias.cpu()
    if isinstance(m, FPLinear):
        return (fp_matmul(x, m.qweight, m.scales, m.global_scale, m.fmt, bias),
                R.fp_matmul(xc, m.qweight, m.scales, m.global_scale, m.fmt, bc))
    if isinstance(m, SparseQuantLinear):
        return (sparse24_quant_matmul(x, m.qweight, m.pattern, m.scales, m.qzeros, b, g, bias),
                R.sparse24_quant_matmul(xc, m.qweight, m.pattern, m.scales, m.qzeros, b, g, bc))
    return (quant_matmul(x, m.qweight, m.scales, m.qzeros, b, g, bias),
            R.quant_matmul(xc, m.qweight, m.scales, m.qzeros, b, g, bc))


@pytest.mark.parametrize("bits,group,sym", CASES)
@pytest.mark.parametrize("M", [1, 5, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_quant_matmul_matches_reference(bits, group, sym, M, dtype):
    _need_triton()
    m = quant_module(40, 192, bits, group, sym).to(DEV)
    got, want = _triton_vs_reference(m, torch.randn(M, 192).to(DEV, dtype), torch.randn(40).to(DEV, dtype))
    assert got.dtype == dtype and got.shape == (M, 40)
    assert rel(got.cpu(), want) < tol(dtype)


@pytest.mark.parametrize("bits,group,sym", CASES)
@pytest.mark.parametrize("M", [1, 5, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_sparse24_quant_matmul_matches_reference(bits, group, sym, M, dtype):
    _need_triton()
    m = quant_module(40, 192, bits, group, sym, sparse=True).to(DEV)   # 48 patterns: some straddle words
    got, want = _triton_vs_reference(m, torch.randn(2, M, 192).to(DEV, dtype), None)
    assert got.shape == (2, M, 40)
    assert rel(got.cpu(), want) < tol(dtype)


@pytest.fixture
def bf16_dot(monkeypatch):
    """Triton's interpreter keeps bf16 as its uint16 bits, and its tl.dot multiplies those
    bits (bf16 is unsupported there: triton-lang/triton#11584). Under the interpreter, bf16
    operands of tl.dot become fp32 first, as a GPU's bf16 MMA computes (exact products,
    fp32 sums); the rest of the kernels' bf16 path (loads, casts, stores) runs as it is."""
    if CUDA:
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as I

    dot = I.InterpreterBuilder.create_dot

    def fp32(h):                                # bf16 is the top half of an fp32
        if h.dtype != tl.bfloat16:
            return h
        return I.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, *rest):
        return dot(self, fp32(a), fp32(b), *rest)

    monkeypatch.setattr(I.InterpreterBuilder, "create_dot", create_dot)


# K = 100: the last group is short (100 = 3 * 32 + 4, or 64 + 36), so the last K-step is
# partly outside K, and the codes of a row end in the middle of a word.
@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (8, 32, True), (2, 64, False)])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("M", [1, 37])
def test_triton_short_last_group_matches_reference(bits, group, sym, sparse, M, monkeypatch):
    _need_triton()
    import compress.deploy as D
    m = quant_module(40, 100, bits, group, sym, sparse).to(DEV)
    assert m.scales.shape[1] == -(-100 // group)
    monkeypatch.setattr(D, "triton_available", lambda device: True)
    assert choose(m, torch.device("cuda")) != REFERENCE            # deploy gives such a layer the kernel
    got, want = _triton_vs_reference(m, torch.randn(M, 100).to(DEV, torch.float16), None)
    assert got.shape == (M, 40)
    assert rel(got.cpu(), want) < tol(torch.float16)


# Off every tile of gemm.launch_shape: decode tiles are 16 x 32 (BM x BN), prefill 64 x 128
# (M <= 64) or 128 x 128; the K-step is 32 for groups of 32, and K = 100 ends mid-step.
@pytest.mark.parametrize("M,N", [(1, 136), (13, 40), (70, 136), (130, 40)])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_odd_shapes_and_bf16_match_reference(M, N, sparse, dtype, bf16_dot):
    _need_triton()
    from compress.kernels.gemm import launch_shape
    K = 100
    cfg = launch_shape(M, N, K, 32, torch.device(DEV))
    assert M % cfg["BM"] and N % cfg["BN"] and K % cfg["BK"]
    m = quant_module(N, K, 4, 32, False, sparse).to(DEV)
    x = torch.randn(2, M, K).to(DEV, dtype)
    got, want = _triton_vs_reference(m, x, torch.randn(N).to(DEV, dtype))
    assert got.dtype == dtype and got.shape == (2, M, N)
    assert rel(got.cpu(), want) < tol(dtype)


def test_launch_shapes():
    _need_triton()
    from compress.kernels.gemm import DECODE, PREFILL, launch_shape, step_for
    cpu = torch.device("cpu")                        # a CPU "device" counts as 1 multiprocessor
    one = launch_shape(1, 4096, 4096, 128, cpu)     # decode: 16 rows; enough column tiles: no split
    assert one["BM"] == 16 and one["BN"] == DECODE["BN"] and one["SPLIT_K"] == 1
    assert one["BK"] == DECODE["BK"] and one["num_warps"] == DECODE["num_warps"] and "per_sm" not in one
    few = launch_shape(1, DECODE["BN"], 4096, 128, cpu)          # one column tile: split K over the programs
    assert few["SPLIT_K"] == min(DECODE["per_sm"], 4096 // few["BK"])
    assert launch_shape(2048, 4096, 4096, 128, cpu) == {**PREFILL, "BK": step_for(128, PREFILL["BK"]), "SPLIT_K": 1}
    assert launch_shape(2048, 4096, 4096, 48, cpu)["BK"] == 16     # a K-step never crosses a group
    tuned = {"BN": 64, "BK": 64, "per_sm": 8, "num_warps": 2, "num_stages": 3}
    assert launch_shape(1, 64, 4096, 128, cpu, tuned) == {"BM": 16, "BN": 64, "BK": 64, "SPLIT_K": 8,
                                                          "num_warps": 2, "num_stages": 3}
    assert step_for(48, 128) == 16 and step_for(128, 64) == 64
    with pytest.raises(ValueError, match="multiple of 16"):
        step_for(40, 64)


# ----------------------------------------------------------------------------- FPLinear: NVFP4 / MXFP4 / FP8

FP_FORMATS = ["nvfp4", "mxfp4", "fp8"]
FINITE_E4M3 = [c for c in range(256) if c not in (0x7F, 0xFF)]        # the 254 finite float8_e4m3fn codes


def _pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def _rebuilt(qweight, scales, global_scale, fmt, K) -> torch.Tensor:
    """W_hat [N, K] as the Triton kernel rebuilds it in registers: y = I W_hat^T in fp32
    (ieee), one product per output, so y holds each weight exactly."""
    from compress.kernels.fp_matmul import fp_matmul
    gs = None if global_scale is None else global_scale.to(DEV)
    return fp_matmul(torch.eye(K, device=DEV), qweight.to(DEV), scales.to(DEV), gs, fmt).T.cpu()


def test_triton_fp_decodes_every_code_exactly():
    """tiles.minifloat's arithmetic against compress.fp_formats' tables, bit for bit
    (up to the sign of zero, which no matmul shows): E2M1 codes 0..15 under NVFP4 scales
    of every finite E4M3 code (over a global scale of 3), every finite E4M3 code as an
    fp8 weight, and MXFP4's scale
    2^(e - 127) for every stored exponent (0: a zero scale)."""
    _need_triton()
    e2m1 = torch.arange(16, dtype=torch.uint8).expand(254, 16)              # [254, 16]: every code per row
    s_codes = torch.tensor(FINITE_E4M3, dtype=torch.uint8)[:, None]         # row n's scale: code n
    got = _rebuilt(_pack_fp4(e2m1), s_codes, torch.tensor([3.0]), "nvfp4", 16)      # S / g: an IEEE division
    assert torch.equal(got, E2M1_CODES[None, :] * (E4M3_CODES[s_codes.long()] / 3.0))
    fp8 = torch.tensor(FINITE_E4M3 + [0, 0], dtype=torch.uint8).reshape(16, 16)
    assert torch.equal(_rebuilt(fp8, torch.ones(16, 1), None, "fp8", 16), E4M3_CODES[fp8.long()])
    e = torch.arange(255, dtype=torch.uint8)[:, None]                       # stored exponents 0..254
    pm1 = torch.tensor([2, 10], dtype=torch.uint8).repeat(255, 16)          # E2M1 +1, -1
    want = torch.where(e > 0, torch.ldexp(torch.ones(255, 1), e.long() - 127), 0.0) * torch.tensor([1.0, -1.0] * 16)
    assert torch.equal(_rebuilt(_pack_fp4(pm1), e, None, "mxfp4", 32), want)


@pytest.mark.parametrize("fmt", FP_FORMATS)
@pytest.mark.parametrize("M", [1, 5, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_fp_matmul_matches_reference(fmt, M, dtype):
    _need_triton()
    m = fp_module(40, 192, fmt).to(DEV)
    got, want = _triton_vs_reference(m, torch.randn(M, 192).to(DEV, dtype), m.bias.to(dtype))
    assert got.dtype == dtype and got.shape == (M, 40)
    assert rel(got.cpu(), want) < tol(dtype)


# K = 100: NVFP4's last group of 16 and MXFP4's of 32 are short (4 inputs), and the last
# K-step (16, 32; fp8: 128 or 64) is partly outside K. N and M are off every tile.
@pytest.mark.parametrize("fmt", FP_FORMATS)
@pytest.mark.parametrize("M,N", [(1, 136), (13, 40), (70, 136), (130, 40)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_fp_odd_shapes_and_bf16_match_reference(fmt, M, N, dtype, bf16_dot):
    _need_triton()
    from compress.kernels.gemm import launch_shape
    K = 100
    m = fp_module(N, K, fmt).to(DEV)
    cfg = launch_shape(M, N, K, m.spec.group_size, torch.device(DEV))
    assert M % cfg["BM"] and N % cfg["BN"] and K % cfg["BK"]
    x = torch.randn(2, M, K).to(DEV, dtype)
    got, want = _triton_vs_reference(m, x, m.bias.to(dtype))
    assert got.dtype == dtype and got.shape == (2, M, N)
    assert rel(got.cpu(), want) < tol(dtype)


def test_fp_matmul_refuses_storage_it_cannot_read():
    _need_triton()
    from compress.kernels.fp_matmul import fp_matmul
    m = fp_module(8, 32, "nvfp4")
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="global scale"):
        fp_matmul(x, m.qweight, m.scales, None, "nvfp4")
    with pytest.raises(ValueError, match="does not hold 64 inputs"):
        fp_matmul(torch.randn(2, 64), m.qweight, m.scales, m.global_scale, "nvfp4")
    with pytest.raises(ValueError, match="unknown format"):
        fp_matmul(x, m.qweight, m.scales, m.global_scale, "fp4")


def test_triton_fp_kernel_in_a_whole_model(tiny_llama, monkeypatch):
    """A tiny LLaMA whose block linears are FPLinear (the three formats in turn), deployed:
    every one gets "triton-fp" and the model gives the reference logits."""
    _need_triton()
    import compress.deploy as D
    names = [n for n, m in tiny_llama.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    for i, name in enumerate(names):
        lin = tiny_llama.get_submodule(name)
        res = rtn(lin.weight.detach().float(), None, FPSpec(FP_FORMATS[i % 3]))
        tiny_llama.set_submodule(name, module_for(res, lin.bias))
    ids = torch.randint(0, tiny_llama.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tiny_llama(ids).logits
        monkeypatch.setattr(D, "triton_available", lambda device: True)
        chosen = deploy(tiny_llama, DEV, torch.float32)
        got = tiny_llama(ids.to(DEV)).logits
    assert len(chosen) == len(names) == 14 and set(chosen.values()) == {"triton-fp"}
    assert {m.fmt for m in tiny_llama.modules() if isinstance(m, FPLinear)} == set(FP_FORMATS)
    assert rel(got.cpu(), want) < 1e-3


# ----------------------------------------------------------------------------- ArmorLinear fast path

def test_armor_fast_path_matches_reference():
    from compress.kernels.armor import armor_matmul
    m = armor_module(64, 128, 16)
    x = torch.randn(2, 7, 128)
    want = R.armor_matmul(x, m.A, m.core(), m.B)
    assert m.prepared_core is None and "prepared_core" not in m.state_dict()
    assert bind(m, "armor-bmm", torch.float32) == "armor-bmm"          # a CPU core stays dense
    assert m.prepared_core.dtype == torch.float32 and torch.equal(m.prepared_core, m.core())
    assert rel(armor_matmul(x, m.A, m.prepared_core, m.B), want) < 1e-5
    assert m.impl is not None and rel(m(x), want) < 1e-5               # forward runs the bound kernel
    assert bind(m, REFERENCE) == REFERENCE and m.impl is None
    with pytest.raises(ValueError, match="unknown kernel"):
        bind(m, "armor-fast")


# ----------------------------------------------------------------------------- choice and deploy

def test_choose_by_device(monkeypatch):
    import compress.deploy as D
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    q, s = quant_module(16, 64, 4, 32, False), quant_module(16, 64, 4, 32, False, sparse=True)
    g_idx = QuantLinear(64, 16, 4, 32, False, g_idx=True)
    gqsa = GQSALinear(64, 16, 4, 16, False, 2)
    a = armor_module(16, 64, 8)
    fp = [fp_module(16, 64, fmt) for fmt in ("nvfp4", "mxfp4", "fp8")]
    assert {choose(m, cpu) for m in (q, s, g_idx, gqsa, a, *fp)} == {REFERENCE}
    monkeypatch.setattr(D, "triton_available", lambda device: device.type == "cuda")
    assert [choose(m, cuda) for m in (q, s, g_idx, gqsa, a, *fp)] == \
        ["triton-wNa16", "triton-2:4+wNa16", REFERENCE, REFERENCE, "armor-bmm"] + ["triton-fp"] * 3
    assert {choose(m, cpu) for m in fp} == {REFERENCE}
    assert choose(QuantLinear(64, 16, 3, 32, False), cuda) == REFERENCE       # 3-bit codes straddle words
    assert choose(QuantLinear(72, 16, 4, 24, False), cuda) == REFERENCE       # no K-step divides 24


def _saved_24w4(tiny_llama, tmp_path):
    ids = torch.randint(0, tiny_llama.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    model, report = compress.run(tiny_llama, [{"sparsegpt": {"pattern": "2:4"}},
                                              {"quant": {"bits": 4, "group_size": 32}}], calib=ids)
    return compress.save(str(tmp_path / "out"), model, report=report), ids[:2, :16]


def test_load_on_cpu_runs_the_reference_and_generates(tiny_llama, tmp_path):
    out, ids = _saved_24w4(tiny_llama, tmp_path)
    plain, _ = compress.load(str(out))
    model, _ = compress.load(str(out), device="cpu")
    kernels = {n: m.kernel for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(kernels) == 14 and set(kernels.values()) == {REFERENCE}
    want = plain.generate(ids, max_new_tokens=6, do_sample=False)
    got = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert got.shape == (2, 22) and torch.equal(got, want)


def test_triton_kernels_in_a_whole_model(tiny_llama, tmp_path):
    """Every SparseQuantLinear switched to the Triton kernel gives the reference logits."""
    _need_triton()
    out, ids = _saved_24w4(tiny_llama, tmp_path)
    model, _ = compress.load(str(out))
    model.to(DEV)
    with torch.no_grad():
        want = model(ids.to(DEV)).logits
        for m in model.modules():
            if isinstance(m, SparseQuantLinear):
                bind(m, "triton-2:4+wNa16")
        got = model(ids.to(DEV)).logits
    assert rel(got.cpu(), want.cpu()) < 1e-3


def test_deploy_keeps_24_linears_dense_on_cpu(tiny_llama):
    with torch.no_grad():
        for name, m in tiny_llama.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in name:
                m.weight.mul_(nm_mask(m.weight.abs(), 2, 4))
    assert deploy(tiny_llama, "cpu") == {}                  # no sparse tensor cores: plain nn.Linear stays
    from compress.nn.sparse_linear import SparseLinear
    assert not any(isinstance(m, SparseLinear) for m in tiny_llama.modules())


def _prune_24(model) -> torch.nn.Module:
    """Every nn.Linear of the model (lm_head too) made exact 2:4, in fp16."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(nm_mask(m.weight.abs(), 2, 4))
    return model.half()


def _layout_24(lin) -> bool:
    """What deploy's check accepts on CUDA (fp16 / bf16, 64-multiple shape, exact 2:4), on any device."""
    from compress.kernels.sparse24 import why_not_layout
    return why_not_layout(lin.weight) is None


@pytest.mark.parametrize("arch,prefix,n", [("llama", "model.layers.", 14), ("bloom", "transformer.h.", 8)])
def test_sparse24_candidates_are_the_decoder_linears(arch, prefix, n):
    """Bloom's blocks are transformer.h.N: a '.layers.' rule never found them."""
    if arch == "llama":
        model = tiny("llama", num_hidden_layers=2, num_key_value_heads=4)    # k/v 64 wide: 64-multiples
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("bloom", vocab_size=128, hidden_size=64,
                                                                      n_layer=2, n_head=4))
    _prune_24(model)
    names = sparse24_candidates(model, accepts=_layout_24)
    assert len(names) == n and all(k.startswith(prefix) for k in names)
    assert _layout_24(model.lm_head) and "lm_head" not in names         # outside the blocks: stays dense
    first = model.get_submodule(names[0])
    first.weight.data.fill_(1.0)                                        # dense again: not a candidate
    assert sparse24_candidates(model, accepts=_layout_24) == names[1:]


def test_sparse24_candidates_without_linears_or_blocks():
    gpt2 = _prune_24(tiny("gpt2", n_layer=2))
    assert sparse24_candidates(gpt2, accepts=lambda lin: True) == []     # Conv1D: SparseLinear takes nn.Linear
    flat = _prune_24(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)))
    assert sparse24_candidates(flat, accepts=_layout_24) == []           # no block list: nothing is guessed
    holder = torch.nn.Module()                                          # a bare list of blocks (benchmarks)
    holder.blocks = torch.nn.ModuleList(flat)
    assert sparse24_candidates(holder, accepts=_layout_24) == ["blocks.0", "blocks.1"]
