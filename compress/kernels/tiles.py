"""The weight tiles of the Triton weight-only kernels: each rebuilds a [BK, BN] tile of
W_hat^T in registers (fp32) from packed storage, for the loop in gemm.py.

    dequant_tile   QuantLinear storage: dense codes (quant_matmul.py has the layout)
    sparse_tile    SparseQuantLinear storage: two kept codes per group of 4 inputs and a
                   3-bit pattern index (sparse_quant_matmul.py has the layout)
    fp_tile        FPLinear storage: NVFP4 / MXFP4 / FP8 codes and scales (fp_matmul.py)
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


@triton.jit
def pow2(e):
    """2^e in fp32, exactly, for int32 e in -126..127: the exponent field written directly
    (e = -127 gives the all-zero bits, 0.0)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def minifloat(code, EXP: tl.constexpr, MAN: tl.constexpr):
    """The fp32 value of int32 codes `sign | EXP exponent bits | MAN mantissa bits` with
    bias 2^(EXP-1) - 1 and subnormals, by arithmetic (no table):

        value = (m + 2^MAN [e > 0]) * 2^(max(e, 1) - bias - MAN),  negated when the sign is set

    E2M1 (EXP 2, MAN 1): magnitude index 0..7 -> 0, .5, 1, 1.5, 2, 3, 4, 6. E4M3 (4, 3):
    float8_e4m3fn, whose NaN codes 0x7F / 0xFF (never stored) come out as +-480. Exact:
    an integer below 16 times a power of two."""
    BIAS: tl.constexpr = (1 << (EXP - 1)) - 1
    e = (code >> MAN) & ((1 << EXP) - 1)
    m = code & ((1 << MAN) - 1)
    mag = (m + (e > 0).to(tl.int32) * (1 << MAN)).to(tl.float32) * pow2(tl.maximum(e, 1) - BIAS - MAN)
    return tl.where(((code >> (EXP + MAN)) & 1) != 0, -mag, mag)


@triton.jit
def fp_tile(qw_ptr, s_ptr, gs_ptr, rk, rn, k0, N, K, stride_qn, stride_sn,
            GROUP: tl.constexpr, FORMAT: tl.constexpr):
    """W_hat^T tile [BK, BN] fp32 of FPLinear storage (FORMAT "nvfp4", "mxfp4" or "fp8")
    for inputs rk [BK] and outputs rn [BN]; k0 starts the step, inside one group (FP4)
    or the row's one scale (fp8). gs_ptr: nvfp4's fp32 global scale."""
    inside = (rk < K)[:, None] & (rn < N)[None, :]
    row = rn < N
    if FORMAT == "fp8":
        u = tl.load(qw_ptr + rn[None, :] * stride_qn + rk[:, None], mask=inside, other=0).to(tl.int32)
        s = tl.load(s_ptr + rn * stride_sn, mask=row, other=0.0).to(tl.float32)          # [BN]
        w = minifloat(u, 4, 3) * s[None, :]
    else:
        byte = tl.load(qw_ptr + rn[None, :] * stride_qn + (rk // 2)[:, None], mask=inside, other=0).to(tl.int32)
        u = (byte >> ((rk % 2) * 4)[:, None]) & 0xF                   # even column: low nibble
        sc = tl.load(s_ptr + rn * stride_sn + k0 // GROUP, mask=row, other=0).to(tl.int32)   # [BN]
        if FORMAT == "nvfp4":                                         # E4M3 bits of S, over g (IEEE /)
            s = tl.math.div_rn(minifloat(sc, 4, 3), tl.load(gs_ptr))
        else:                                                         # mxfp4: E8M0, 2^(e - 127); e = 0: 0
            s = tl.where(sc > 0, pow2(sc - 127), 0.0)
        w = minifloat(u, 2, 1) * s[None, :]
    return w
