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
once) and feeds it to tl.dot in the loop it shares with quant_matmul (gemm.py). The saving is in
bytes read, which is what bounds decode; the tensor cores still see a dense tile.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl



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


def sparse24_quant_matmul(x: torch.Tensor, qweight: torch.Tensor, pattern: torch.Tensor, scales: torch.Tensor,
                          qzeros: Optional[torch.Tensor], bits: int, group_size: Optional[int],
                          bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [..., N] = x [..., K] W_hat^T; the same arguments as reference.sparse24_quant_matmul."""
    from compress.kernels.gemm import launch
    if x.shape[-1] % 4:
        raise ValueError(f"sparse24_quant_matmul: {x.shape[-1]} inputs are not a multiple of 4")
    return launch(x, qweight, pattern, scales, qzeros, bits, group_size, bias)
