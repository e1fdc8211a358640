"""CUDA checks of the kernels: every fast path against its meaning
(compress/kernels/reference.py) at Llama-3-8B layer shapes, in fp16 and bf16.

    python -m pytest -m cuda                              # on a GPU (benchmarks/gpu_check.sh)
    COMPRESS_REHEARSE_CUDA=1 python -m pytest -m cuda     # rehearsal on a CPU

Without a GPU every test here skips. The rehearsal runs them on the CPU at small stand-in
shapes, Triton in its interpreter, so that this file is debugged before GPU time is spent
on it; only the sparse tensor-core tests skip there (torch's semi-structured sparse
tensors need CUDA). Whole models on the GPU: test_cuda_models.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_kernels import _saved_24w4, armor_module, bf16_dot, rel, tol  # noqa: F401  (bf16_dot: a fixture)
from torch.sparse import to_sparse_semi_structured

import compress
from compress.deploy import bind
from compress.fp_formats import FPSpec
from compress.kernels import reference as R
from compress.masks import nm_mask
from compress.nn import FPLinear, SparseQuantLinear, module_for
from compress.nn.sparse_linear import SparseLinear
from compress.quantize import QuantSpec, rtn

pytestmark = pytest.mark.cuda

# Llama-3-8B's linears (out x in): q/o_proj, gate/up_proj, down_proj. A rehearsal runs
# small stand-ins of the same kinds (square, N > K, K > N), in whole groups of 128.
SHAPES = {"4096x4096": (4096, 4096), "14336x4096": (14336, 4096), "4096x14336": (4096, 14336)}
SMALL = {"4096x4096": (64, 128), "14336x4096": (192, 128), "4096x14336": (64, 384)}
# Decode (M <= 16: a split-K GEMV) and prefill (128-row tiles). Each (M path, split-K or
# not, dtype, format) is one more Triton compile, ~1-2 s on a cold cache: M = 16 is left to
# the CPU tests (test_kernels) and to ARMOR and SparseLinear here, which compile nothing.
MS = (1, 128)
ARMOR_MS = (1, 16, 128)
DTYPES = pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
SPARSE_TYPE = torch.sparse.SparseSemiStructuredTensor


def shape_of(name: str, rehearsal: bool) -> tuple[int, int]:
    return (SMALL if rehearsal else SHAPES)[name]


def randn(*shape, device, dtype=torch.float32, seed=0) -> torch.Tensor:
    """Fresh N(0, 1) values drawn on `device` (never zeros: a kernel that reads nothing fails)."""
    return torch.randn(*shape, device=device, generator=torch.Generator(device).manual_seed(seed)).to(dtype)


def poison(shape, dtype, device) -> None:
    """Fill a block the size of the coming output with NaN and free it: the caching
    allocator hands that block to the kernel's torch.empty, so a tile the kernel never
    writes shows as NaN (rel() refuses it) rather than as stale memory, which could hold
    the right answer from an earlier call."""
    torch.full(shape, float("nan"), dtype=dtype, device=device)


def quant_module(N, K, bits, sym, sparse, device, seed=0):
    """A QuantLinear (SparseQuantLinear with `sparse`: exact 2:4) of a random weight,
    group 128, quantized on `device` (fast at 14336 x 4096, unlike the CPU)."""
    W = randn(N, K, device=device, seed=seed)
    keep = nm_mask(W.abs(), 2, 4) if sparse else None
    res = rtn(W if keep is None else W * keep, keep, QuantSpec(bits, 128, sym))
    res.sparse24 = sparse
    return module_for(res).to(device)


def fp_module(N, K, fmt, device, seed=0) -> FPLinear:
    """An FPLinear (nvfp4 / mxfp4 / fp8) of a random weight, quantized on `device`."""
    return module_for(rtn(randn(N, K, device=device, seed=seed), None, FPSpec(fmt))).to(device)


def reference_y(m, x, bias, full: bool) -> torch.Tensor:
    """y [M, N] of the module's storage: reference.py's own op when `full` (it loops over
    columns on the CPU: seconds at 4096 x 4096, a minute at K = 14336), else a float64
    matmul with the module's effective weight (reference.py agrees with it: test_kernels)."""
    if not full:
        return x.double() @ m.effective_weight().double().T + bias.double()
    xc, bc, b = x.cpu().float(), bias.cpu(), m.spec.bits
    if isinstance(m, FPLinear):
        return R.fp_matmul(xc, m.qweight, m.scales, m.global_scale, m.fmt, bc)
    if isinstance(m, SparseQuantLinear):
        return R.sparse24_quant_matmul(xc, m.qweight, m.pattern, m.scales, m.qzeros, b, 128, bc)
    return R.quant_matmul(xc, m.qweight, m.scales, m.qzeros, b, 128, bc)


# int4 g128 asymmetric (the common W4A16) at every shape, dense and 2:4; int8 symmetric at one.
KERNEL_CASES = [pytest.param(s, 4, False, sparse, id=f"{'2:4-' if sparse else ''}w4-{s}")
                for sparse in (False, True) for s in SHAPES] + [pytest.param("4096x4096", 8, True, False, id="w8sym")]


@DTYPES
@pytest.mark.parametrize("shape,bits,sym,sparse", KERNEL_CASES)
def test_triton_matches_reference_at_llama_shapes(shape, bits, sym, sparse, dtype, cuda_device, rehearsal, bf16_dot):
    """quant_matmul (QuantLinear) and sparse24_quant_matmul (SparseQuantLinear) at every M of MS."""
    from compress.kernels.quant_matmul import quant_matmul
    from compress.kernels.sparse_quant_matmul import sparse24_quant_matmul
    N, K = shape_of(shape, rehearsal)
    m = quant_module(N, K, bits, sym, sparse, cuda_device)
    x = randn(sum(MS), K, device=cuda_device, dtype=dtype, seed=1)
    bias = randn(N, device=cuda_device, dtype=dtype, seed=2)
    want = reference_y(m, x, bias, full=shape == "4096x4096").to(cuda_device)
    if sparse:
        check_each_m(lambda xm: sparse24_quant_matmul(xm, m.qweight, m.pattern, m.scales, m.qzeros, bits, 128, bias),
                     x, want, dtype, shape)
    else:
        check_each_m(lambda xm: quant_matmul(xm, m.qweight, m.scales, m.qzeros, bits, 128, bias), x, want, dtype, shape)


def check_each_m(call, x, want, dtype, what) -> None:
    """call(rows of x) against the same rows of want [sum(MS), N], for each M of MS, with
    the output's block poisoned first."""
    start, N = 0, want.shape[1]
    for M in MS:
        rows = slice(start, start + M)
        start += M
        poison((M, N), dtype, x.device)
        got = call(x[rows])
        assert got.dtype == dtype and got.shape == (M, N)
        err = rel(got, want[rows])
        assert err < tol(dtype), (what, M, err)


# NVFP4 (groups of 16: a K-step of 16) at every shape in fp16 and at one in bf16; MXFP4
# and FP8 at one, one dtype each: 8 compiles (format x dtype x M path), not 12.
FP16, BF16 = torch.float16, torch.bfloat16
FP_CASES = [pytest.param("nvfp4", s, FP16, id=f"nvfp4-{s}-fp16") for s in SHAPES] + \
    [pytest.param(fmt, "4096x4096", dt, id=f"{fmt}-4096x4096-{n}")
     for fmt, dt, n in (("nvfp4", BF16, "bf16"), ("mxfp4", FP16, "fp16"), ("fp8", BF16, "bf16"))]


@pytest.mark.parametrize("fmt,shape,dtype", FP_CASES)
def test_triton_fp_matches_reference_at_llama_shapes(fmt, shape, dtype, cuda_device, rehearsal, bf16_dot):
    """fp_matmul (FPLinear: NVFP4 / MXFP4 / FP8) at every M of MS."""
    from compress.kernels.fp_matmul import fp_matmul
    N, K = shape_of(shape, rehearsal)
    m = fp_module(N, K, fmt, cuda_device)
    x = randn(sum(MS), K, device=cuda_device, dtype=dtype, seed=1)
    bias = randn(N, device=cuda_device, dtype=dtype, seed=2)
    want = reference_y(m, x, bias, full=shape == "4096x4096").to(cuda_device)
    check_each_m(lambda xm: fp_matmul(xm, m.qweight, m.scales, m.global_scale, fmt, bias), x, want, dtype,
                 (fmt, shape))


@DTYPES
def test_armor_fast_path_at_llama_shape(dtype, cuda_device, rehearsal):
    """bind(.., "armor-bmm") compresses the 2:4 core for the sparse tensor cores on CUDA."""
    N, K = shape_of("4096x4096", rehearsal)
    m = armor_module(N, K, 32).to(cuda_device)
    kernel = bind(m, "armor-bmm", dtype)
    assert kernel == m.kernel == ("armor-bmm" if rehearsal else "armor-bmm+2:4")   # a CPU core stays dense
    assert isinstance(m.prepared_core, SPARSE_TYPE) != rehearsal
    x = randn(sum(ARMOR_MS), K, device=cuda_device, dtype=dtype, seed=3)
    want = R.armor_matmul(x.cpu().float(), m.A, m.core(), m.B)        # A S B formed densely, fp32
    start = 0
    for M in ARMOR_MS:
        got = m(x[start:start + M])
        assert got.dtype == dtype and got.shape == (M, N)
        err = rel(got.cpu(), want[start:start + M])
        start += M
        assert err < tol(dtype), (M, err)


def exact_24(N, K, dtype, device, seed=0) -> torch.Tensor:
    W = randn(N, K, device=device, seed=seed)
    return (W * nm_mask(W.abs(), 2, 4)).to(dtype)


def skip_in_rehearsal(rehearsal: bool) -> None:
    if rehearsal:
        pytest.skip("torch's to_sparse_semi_structured needs CUDA: nothing of this runs on a CPU")


def cutlass_refuses(dtype, device) -> str:
    """torch's refusal of a CUTLASS 2:4 matmul on this GPU ('' if it runs): its CUTLASS
    kernels are built for compute capability 8.x (Ampere) only, so Hopper refuses them."""
    if torch.cuda.get_device_capability(device)[0] == 8:
        return ""
    try:
        Ws = to_sparse_semi_structured(exact_24(64, 64, dtype, device))
        F.linear(randn(16, 64, device=device, dtype=dtype), Ws)
    except RuntimeError as e:
        if "compute capability" in str(e):
            return str(e).strip().splitlines()[-1]
        raise
    return ""


@DTYPES
@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
def test_sparse_linear_matches_dense_linear(backend, dtype, cuda_device, rehearsal, monkeypatch):
    """SparseLinear on either backend of torch's semi-structured sparse tensors
    (to_sparse_semi_structured picks CUTLASS when _FORCE_CUTLASS is set; monkeypatch puts
    the flag back) gives dense F.linear's y for the same exact 2:4 weight, M = 1 to 2048."""
    skip_in_rehearsal(rehearsal)
    monkeypatch.setattr(SPARSE_TYPE, "_FORCE_CUTLASS", backend == "cutlass")
    if backend == "cutlass" and (why := cutlass_refuses(dtype, cuda_device)):
        pytest.skip(f"torch's CUTLASS 2:4 kernels do not run on this GPU (cuSPARSELt does): {why}")
    cls = {"cusparselt": torch.sparse.SparseSemiStructuredTensorCUSPARSELT,
           "cutlass": torch.sparse.SparseSemiStructuredTensorCUTLASS}[backend]
    for s, (N, K) in enumerate(SHAPES.values()):
        W = exact_24(N, K, dtype, cuda_device, seed=s)
        lin = torch.nn.Linear(K, N, bias=False, device=cuda_device, dtype=dtype)
        lin.weight.data.copy_(W)
        sl = SparseLinear(lin)
        assert isinstance(sl.weight, cls) and sl.kernel == f"{backend}-2:4", (type(sl.weight), sl.kernel)
        for M in (1, 16, 128, 2048):
            x = randn(M, K, device=cuda_device, dtype=dtype, seed=M)
            got, dense = sl(x), F.linear(x, W)
            want = x.double() @ W.double().T
            assert got.dtype == dtype and got.shape == (M, N)
            err = rel(got, want)
            assert err < tol(dtype) and rel(got, dense) < tol(dtype), (N, K, M, err, rel(dense, want))


@DTYPES
def test_sparse24_tensor_cores_match_reference(dtype, cuda_device, rehearsal):
    """With a bias, against reference.sparse24_matmul (moved from test_kernels)."""
    skip_in_rehearsal(rehearsal)
    W = exact_24(256, 512, dtype, cuda_device)
    lin = torch.nn.Linear(512, 256, bias=True, device=cuda_device, dtype=dtype)
    lin.weight.data.copy_(W)
    sl = SparseLinear(lin)
    for M in (1, 16, 128):
        x = randn(M, 512, device=cuda_device, dtype=dtype, seed=M)
        want = R.sparse24_matmul(x.float().cpu(), W.float().cpu(), lin.bias.float().cpu())
        assert rel(sl(x).cpu(), want) < tol(dtype)


def test_deploy_on_cuda_swaps_in_fast_modules(tiny_llama, tmp_path, cuda_device, rehearsal):
    """compress.load(device=) binds the Triton 2:4 kernel on CUDA (moved from test_kernels;
    a rehearsal loads on the CPU, where the reference stays)."""
    out, ids = _saved_24w4(tiny_llama, tmp_path)
    plain, _ = compress.load(str(out))
    model, _ = compress.load(str(out), device=cuda_device)
    want = "reference" if rehearsal else "triton-2:4+wNa16"
    assert {m.kernel for m in model.modules() if isinstance(m, SparseQuantLinear)} == {want}
    with torch.no_grad():
        assert rel(model(ids.to(cuda_device)).logits.float().cpu(), plain(ids).logits) < 2e-2
