"""The loop the Triton weight-only kernels share: y [M, N] = x [M, K] W_hat^T, with each
[BK, BN] tile of W_hat^T rebuilt in registers by a tile function and fed to tl.dot.

    dense codes (QuantLinear):            tiles.dequant_tile    FORMAT "int"
    2:4 kept codes (SparseQuantLinear):   tiles.sparse_tile     FORMAT "int", SPARSE
    NVFP4 / MXFP4 / FP8 (FPLinear):       tiles.fp_tile         FORMAT "nvfp4" | "mxfp4" | "fp8"

Every program computes a [BM, BN] tile of y and walks K in steps of BK. A K-step never
crosses a quantization group (BK divides g), so a step's scale and zero point are one
[BN] vector (fp8's one scale per row puts no bound on BK). Two launch shapes share the
kernel:

- decode, M <= 16 (GEMV): one 16-row tile, narrow BN and split-K, so that enough
  programs stream the weight at once to saturate memory bandwidth; partial sums meet
  in an fp32 buffer through atomic adds. The padded rows cost tensor-core time that a
  memory-bound GEMV has to spare.
- prefill, M > 16 (GEMM): 64- or 128-row tiles, so each rebuilt weight tile is reused
  by many tokens.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from compress.kernels.tiles import dequant_tile, fp_tile, sparse_tile


@triton.jit
def _gemm_kernel(x_ptr, qw_ptr, p_ptr, s_ptr, z_ptr, y_ptr, M, N, K, P_WORDS,
                 stride_xm, stride_qn, stride_pn, stride_sn, stride_zn, stride_ym,
                 GROUP: tl.constexpr, BITS: tl.constexpr, SYM: tl.constexpr, SPARSE: tl.constexpr,
                 SPLIT_K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ATOMIC: tl.constexpr,
                 PRECISION: tl.constexpr, FORMAT: tl.constexpr):
    """FORMAT "int": integer codes (z_ptr: packed zero points); else FPLinear's storage
    (z_ptr: nvfp4's global scale)."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(pid_k * BK, K, BK * SPLIT_K):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                    mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0)          # [BM, BK]
        if FORMAT != "int":
            w = fp_tile(qw_ptr, s_ptr, z_ptr, rk, rn, k0, N, K, stride_qn, stride_sn, GROUP, FORMAT)
        elif SPARSE:
            w = sparse_tile(qw_ptr, p_ptr, s_ptr, z_ptr, rk, rn, k0, N, K, P_WORDS,
                            stride_qn, stride_pn, stride_sn, stride_zn, GROUP, BITS, SYM)
        else:
            w = dequant_tile(qw_ptr, s_ptr, z_ptr, rk, rn, k0, N, K, stride_qn, stride_sn, stride_zn,
                             GROUP, BITS, SYM)                                       # [BK, BN]
        acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
    out = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    inside = (rm < M)[:, None] & (rn < N)[None, :]
    if not ATOMIC:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=inside)
    else:
        tl.atomic_add(out, acc, mask=inside)


def precision(dtype: torch.dtype) -> str:
    """fp32 operands multiply in full fp32 (not TF32), so fp32 results stay within 1e-3."""
    return "ieee" if dtype == torch.float32 else "tf32"


def step_for(group: int, want: int) -> int:
    """The K-step: the largest power of two <= want (and >= 16) that divides the group."""
    bk = want
    while bk > 16 and group % bk:
        bk //= 2
    if group % bk:
        raise ValueError(f"group size {group} is not a multiple of 16: no Triton K-step fits it")
    return bk


# Launch shapes per path, tuned by `benchmarks/kernel_speed.py --tune` (a sweep over
# tiles, warps and pipeline depth at Llama-3-8B layer shapes); the winners by geometric
# mean over the three shapes are recorded here. `per_sm`: programs per multiprocessor the
# decode path's split-K aims at. Until a GPU run tunes them, these are the hand-picked ones.
DECODE = {"BN": 32, "BK": 128, "per_sm": 4, "num_warps": 4, "num_stages": 2}
PREFILL_64 = {"BM": 64, "BN": 128, "BK": 64, "num_warps": 4, "num_stages": 3}      # 16 < M <= 64
PREFILL = {"BM": 128, "BN": 128, "BK": 64, "num_warps": 4, "num_stages": 3}        # M > 64


def launch_shape(M: int, N: int, K: int, group: Optional[int], device: torch.device,
                 tuned: Optional[dict] = None) -> dict:
    """Tile sizes, split-K, warps and stages for an [M, K] x [K, N] problem (see the module
    docstring); `tuned` replaces the recorded table's entry for M's path (for the sweep).
    group None: one scale per row that does not bound the K-step."""
    base = dict(tuned or (DECODE if M <= 16 else PREFILL_64 if M <= 64 else PREFILL))
    bk = base.pop("BK") if group is None else step_for(group, base.pop("BK"))
    if M <= 16:
        per_sm = base.pop("per_sm")
        programs = torch.cuda.get_device_properties(device).multi_processor_count * per_sm \
            if device.type == "cuda" else per_sm
        split = max(1, min(triton.cdiv(K, bk), programs // triton.cdiv(N, base["BN"])))
        return {"BM": 16, "BK": bk, "SPLIT_K": split, **base}
    return {"BK": bk, "SPLIT_K": 1, **base}


def launch(x: torch.Tensor, qweight: torch.Tensor, pattern: Optional[torch.Tensor], scales: torch.Tensor,
           qzeros: Optional[torch.Tensor], bits: int, group_size: Optional[int],
           bias: Optional[torch.Tensor], tuned: Optional[dict] = None, fmt: str = "int") -> torch.Tensor:
    """y [..., N] = x [..., K] W_hat^T; 2:4 storage when `pattern` is given; `tuned`
    overrides the launch shape (launch_shape). fmt "nvfp4" | "mxfp4" | "fp8": FPLinear's
    storage, with nvfp4's global scale in the place of `qzeros` (fp_matmul.py)."""
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8 (codes must not straddle words), got {bits}")
    K = x.shape[-1]
    N = qweight.shape[0]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    group = K if group_size is None else group_size
    cfg = launch_shape(M, N, K, None if fmt == "fp8" else group, x.device, tuned)
    split = cfg["SPLIT_K"] > 1
    y = (torch.zeros if split else torch.empty)(M, N, device=x.device, dtype=torch.float32 if split else x.dtype)
    z = qzeros if qzeros is not None else qweight                         # unused when symmetric
    p = pattern if pattern is not None else qweight                       # unused when dense
    grid = (triton.cdiv(M, cfg["BM"]), triton.cdiv(N, cfg["BN"]), cfg["SPLIT_K"])
    _gemm_kernel[grid](x2, qweight, p, scales, z, y, M, N, K, p.shape[1],
                       x2.stride(0), qweight.stride(0), p.stride(0), scales.stride(0), z.stride(0), y.stride(0),
                       SPLIT_K=cfg.pop("SPLIT_K"), GROUP=group, BITS=bits, SYM=qzeros is None,
                       SPARSE=pattern is not None, ATOMIC=split, PRECISION=precision(x.dtype), FORMAT=fmt, **cfg)
    y = y.to(x.dtype)
    if bias is not None:
        y += bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], N)
