"""2:4 + int4 fused matmul in Triton: y = x W_hat^T from SparseQuantLinear storage, where
only the two kept codes of every group of four inputs and a 3-bit pattern index are
stored (about 3 bits per weight at int4 g64, against 16 for fp16).

    qweight [N, (K/2)*b/32] int32   the kept codes, two per group of 4, in column order
    pattern [N, (K/4)*3/32] int32   index into PAIRS per group of 4, 3 bits each; an index
                                    may straddle two words
    scales, qzeros                  as QuantLinear (groups of g dense input columns)

For dense input k in group q = k // 4 at slot k % 4, with kept slots (p0, p1) = PAIRS[idx[q]]
and kept codes u0 = u[2q], u1 = u[2q+1]:

    W_hat[n, k] = (u0 - z) s  if k % 4 == p0;   (u1 - z) s  if k % 4 == p1;   else 0

The kernel rebuilds each [BK, BN] weight tile in registers from these (the four inputs
of a group load the same words, which the cache serves: every byte comes from memory
once) and feeds it to tl.dot, with the launch shapes of quant_matmul. The saving is in
bytes read, which is what bounds decode; the tensor cores still see a dense tile.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from compress.kernels.quant_matmul import launch_shape, precision


@triton.jit
def _pair(idx):
    """Pattern index 0..5 -> its kept slots (p0, p1): (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)."""
    ge3 = (idx >= 3).to(tl.int32)
    ge5 = (idx >= 5).to(tl.int32)
    return ge3 + ge5, idx + 1 - 2 * ge3 - ge5


@triton.jit
def _sparse_tile(qw_ptr, p_ptr, s_ptr, z_ptr, rk, rn, k0, N, K, P_WORDS,
                 stride_qn, stride_pn, stride_sn, stride_zn,
                 GROUP: tl.constexpr, BITS: tl.constexpr, SYM: tl.constexpr):
    """W_hat^T tile [BK, BN] fp32 for dense inputs rk [BK] and outputs rn [BN]."""
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    inside = (rk < K)[:, None] & (rn < N)[None, :]
    q = rk // 4                                                              # [BK] group of 4
    slot = rk % 4
    t0 = 2 * q                                                               # first kept code (even)
    words = tl.load(qw_ptr + rn[None, :] * stride_qn + (t0 // PER)[:, None], mask=inside, other=0)
    sh = ((t0 % PER) * BITS)[:, None]
    u0 = (words >> sh) & MASK                                                # t0 and t0 + 1 share a word
    u1 = (words >> (sh + BITS)) & MASK
    bit = 3 * q                                                              # the 3-bit pattern index
    wi = (bit // 32)[:, None]
    row = p_ptr + rn[None, :] * stride_pn
    lo = tl.load(row + wi, mask=inside, other=0).to(tl.int64) & 0xFFFFFFFF
    hi = tl.load(row + wi + 1, mask=inside & (wi + 1 < P_WORDS), other=0).to(tl.int64) & 0xFFFFFFFF
    idx = (((lo | (hi << 32)) >> (bit % 32)[:, None].to(tl.int64)) & 7).to(tl.int32)
    p0, p1 = _pair(idx)
    g = k0 // GROUP
    s = tl.load(s_ptr + rn * stride_sn + g, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if SYM:
        z = 1 << (BITS - 1)
    else:
        zw = tl.load(z_ptr + rn * stride_zn + g // PER, mask=rn < N, other=0)
        z = ((zw >> ((g % PER) * BITS)) & MASK)[None, :]
    v0 = (u0 - z).to(tl.float32) * s
    v1 = (u1 - z).to(tl.float32) * s
    return tl.where(slot[:, None] == p0, v0, tl.where(slot[:, None] == p1, v1, 0.0))


@triton.jit
def _sparse_quant_matmul_kernel(x_ptr, qw_ptr, p_ptr, s_ptr, z_ptr, y_ptr, M, N, K, P_WORDS,
                                stride_xm, stride_qn, stride_pn, stride_sn, stride_zn, stride_ym,
                                GROUP: tl.constexpr, BITS: tl.constexpr, SYM: tl.constexpr,
                                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
                                PRECISION: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(pid_k * BK, K, BK * SPLIT_K):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                    mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0)          # [BM, BK]
        w = _sparse_tile(qw_ptr, p_ptr, s_ptr, z_ptr, rk, rn, k0, N, K, P_WORDS,
                         stride_qn, stride_pn, stride_sn, stride_zn, GROUP, BITS, SYM)
        acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
    out = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    inside = (rm < M)[:, None] & (rn < N)[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=inside)
    else:
        tl.atomic_add(out, acc, mask=inside)


def sparse24_quant_matmul(x: torch.Tensor, qweight: torch.Tensor, pattern: torch.Tensor, scales: torch.Tensor,
                          qzeros: Optional[torch.Tensor], bits: int, group_size: Optional[int],
                          bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [..., N] = x [..., K] W_hat^T; the same arguments as reference.sparse24_quant_matmul."""
    if bits not in (2, 4, 8):
        raise ValueError(f"sparse24_quant_matmul: bits must be 2, 4 or 8, got {bits}")
    K = x.shape[-1]
    N = qweight.shape[0]
    if K % 4:
        raise ValueError(f"sparse24_quant_matmul: {K} inputs are not a multiple of 4")
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    group = K if group_size is None else group_size
    cfg = launch_shape(M, N, K, group, x.device)
    split = cfg["SPLIT_K"] > 1
    y = (torch.zeros if split else torch.empty)(M, N, device=x.device, dtype=torch.float32 if split else x.dtype)
    z = qzeros if qzeros is not None else qweight                         # unused when symmetric
    grid = (triton.cdiv(M, cfg["BM"]), triton.cdiv(N, cfg["BN"]), cfg["SPLIT_K"])
    _sparse_quant_matmul_kernel[grid](
        x2, qweight, pattern, scales, z, y, M, N, K, pattern.shape[1],
        x2.stride(0), qweight.stride(0), pattern.stride(0), scales.stride(0), z.stride(0), y.stride(0),
        GROUP=group, BITS=bits, SYM=qzeros is None, PRECISION=precision(x.dtype), **cfg)
    y = y.to(x.dtype)
    if bias is not None:
        y += bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], N)
