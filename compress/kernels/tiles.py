"""The weight tiles of the two Triton weight-only kernels: each rebuilds a [BK, BN] tile
of W_hat^T in registers (fp32) from packed storage, for the loop in gemm.py.

    dequant_tile   QuantLinear storage: dense codes (quant_matmul.py has the layout)
    sparse_tile    SparseQuantLinear storage: two kept codes per group of 4 inputs and a
                   3-bit pattern index (sparse_quant_matmul.py has the layout)
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dequant_tile(qw_ptr, s_ptr, z_ptr, rk, rn, k0, N, K, stride_qn, stride_sn, stride_zn,
                 GROUP: tl.constexpr, BITS: tl.constexpr, SYM: tl.constexpr):
    """W_hat^T tile [BK, BN] fp32 for inputs rk [BK] and outputs rn [BN]; k0 starts the step."""
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    inside = (rk < K)[:, None] & (rn < N)[None, :]
    words = tl.load(qw_ptr + rn[None, :] * stride_qn + (rk // PER)[:, None], mask=inside, other=0)
    u = (words >> ((rk % PER) * BITS)[:, None]) & MASK                       # [BK, BN] codes
    g = k0 // GROUP                                                         # one group per step
    s = tl.load(s_ptr + rn * stride_sn + g, mask=rn < N, other=0.0).to(tl.float32)   # [BN]
    if SYM:
        z = tl.full(s.shape, 1 << (BITS - 1), tl.int32)
    else:
        zw = tl.load(z_ptr + rn * stride_zn + g // PER, mask=rn < N, other=0)
        z = (zw >> ((g % PER) * BITS)) & MASK
    return (u - z[None, :]).to(tl.float32) * s[None, :]


@triton.jit
def pair(idx):
    """Pattern index 0..5 -> its kept slots (p0, p1): (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)."""
    ge3 = (idx >= 3).to(tl.int32)
    ge5 = (idx >= 5).to(tl.int32)
    return ge3 + ge5, idx + 1 - 2 * ge3 - ge5


@triton.jit
def sparse_tile(qw_ptr, p_ptr, s_ptr, z_ptr, rk, rn, k0, N, K, P_WORDS,
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
    p0, p1 = pair(idx)
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
