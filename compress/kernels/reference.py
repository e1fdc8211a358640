"""The meaning of every kernel, in plain torch: slow, obvious, and what the tests hold
the fast kernels to. Each op takes the packed storage of a runtime module (compress/nn)
exactly as it is saved, and computes y = x W_hat^T in fp32, returned in x's dtype.

    x  [..., in] activations (fp16 / bf16 / fp32)
    y  [..., out]

Formats (see the runtime modules' docstrings for the bit layouts):

    sparse24_matmul         W [out, in] dense storage of an exact 2:4 weight
    quant_matmul            QuantLinear:  qweight [out, in*b/32] int32, scales [out, G] fp16,
                            qzeros [out, G*b/32] int32 or None (symmetric: z = 2^(b-1))
    sparse24_quant_matmul   SparseQuantLinear: qweight [out, in/2*b/32] (kept codes),
                            pattern [out, in/4*3/32] (index into PAIRS), scales, qzeros
    armor_matmul            ArmorLinear: A [out/b, b, b], core S [out, in] (2:4), B [in/b, b, b]
    fp_matmul               FPLinear (nvfp4 / mxfp4 / fp8): qweight uint8 [out, in/2] (two E2M1
                            codes a byte, even column low) or [out, in] (E4M3 bits), scales
                            uint8 [out, G] (E4M3 bits / E8M0 exponents) or fp32 [out, 1],
                            global_scale fp32 [1] (nvfp4) or None
"""
from __future__ import annotations

import itertools
from typing import Optional

import torch

from compress.fp_formats import E2M1_CODES, E4M3_CODES, FORMATS
from compress.packing import unpack_bits

# The 6 ways to keep 2 of 4: [6, 2] kept slots (p0 < p1) of a group of 4 inputs, by pattern
# index, stored in PATTERN_BITS bits. The one definition: SparseQuantLinear packs with it,
# and the Triton kernel's _pair decodes it arithmetically (tests hold the two together).
PAIRS = torch.tensor(list(itertools.combinations(range(4), 2)))
PATTERN_BITS = 3


def _linear(x: torch.Tensor, W: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    y = x.float() @ W.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _zero_points(qzeros: Optional[torch.Tensor], bits: int, out: int, n_groups: int) -> torch.Tensor:
    """[out, G] fp32 zero points; symmetric grids store none and use 2^(b-1)."""
    if qzeros is None:
        return torch.full((out, n_groups), float(1 << (bits - 1)))
    return unpack_bits(qzeros.cpu(), bits, n_groups).float()


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, qzeros: Optional[torch.Tensor],
                      bits: int, group_size: Optional[int]) -> torch.Tensor:
    """codes [out, in] -> W_hat [out, in] fp32: W[o, j] = (u[o, j] - z[o, j // g]) * s[o, j // g]."""
    out, d_in = codes.shape
    g = d_in if group_size is None else group_size
    s = scales.float().cpu()
    z = _zero_points(qzeros, bits, out, s.shape[1])
    W = torch.empty(out, d_in)
    for j in range(d_in):                       # one column at a time: the definition, not a kernel
        W[:, j] = (codes[:, j].float() - z[:, j // g]) * s[:, j // g]
    return W


def sparse24_matmul(x: torch.Tensor, W: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x W^T for an exact 2:4 W (at most 2 non-zeros in every 4 consecutive inputs)."""
    out, d_in = W.shape
    if d_in % 4 or int((W.reshape(out, d_in // 4, 4) != 0).sum(-1).max()) > 2:
        raise ValueError("sparse24_matmul: W is not 2:4 sparse")
    return _linear(x, W, bias)


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: Optional[torch.Tensor],
                 bits: int, group_size: Optional[int], bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x W_hat^T with W_hat dequantized from QuantLinear storage (contiguous groups)."""
    d_in = x.shape[-1]
    codes = unpack_bits(qweight.cpu(), bits, d_in)                                # [out, in]
    W = dequantize_groups(codes, scales, qzeros, bits, group_size)
    return _linear(x, W.to(x.device), bias)


def sparse24_codes(qweight: torch.Tensor, pattern: torch.Tensor, bits: int, d_in: int) -> tuple:
    """SparseQuantLinear storage -> (codes [out, in] with the kept codes in place, kept [out, in] bool)."""
    out = qweight.shape[0]
    kept_codes = unpack_bits(qweight.cpu(), bits, d_in // 2)                     # [out, in/2]
    idx = unpack_bits(pattern.cpu(), PATTERN_BITS, d_in // 4)                    # [out, in/4]
    slots = PAIRS[idx.long()]                                                    # [out, in/4, 2]
    codes = torch.zeros(out, d_in, dtype=torch.uint8)
    kept = torch.zeros(out, d_in, dtype=torch.bool)
    for q in range(d_in // 4):                  # group of 4 inputs q keeps slots PAIRS[idx]
        for t in range(2):
            col = 4 * q + slots[:, q, t]
            codes[torch.arange(out), col] = kept_codes[:, 2 * q + t]
            kept[torch.arange(out), col] = True
    return codes, kept


def sparse24_quant_matmul(x: torch.Tensor, qweight: torch.Tensor, pattern: torch.Tensor, scales: torch.Tensor,
                          qzeros: Optional[torch.Tensor], bits: int, group_size: Optional[int],
                          bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x W_hat^T for SparseQuantLinear storage: kept weights dequantized, the rest 0."""
    codes, kept = sparse24_codes(qweight, pattern, bits, x.shape[-1])
    W = dequantize_groups(codes, scales, qzeros, bits, group_size) * kept
    return _linear(x, W.to(x.device), bias)


def armor_matmul(x: torch.Tensor, A: torch.Tensor, S: torch.Tensor, B: torch.Tensor,
                 bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x W_hat^T with W_hat = blockdiag(A) S blockdiag(B), formed densely."""
    def blockdiag(blocks):
        return torch.block_diag(*blocks.float().cpu())
    W = blockdiag(A) @ S.float().cpu() @ blockdiag(B)
    return _linear(x, W.to(x.device), bias)


def fp_values(qweight: torch.Tensor, fmt: str, d_in: int) -> torch.Tensor:
    """FPLinear's qweight -> the elements' values [out, in] fp32 (before scaling)."""
    q = qweight.cpu().long()
    if fmt == "fp8":
        return E4M3_CODES[q]                                      # float8_e4m3fn's bits -> value
    codes = torch.empty(q.shape[0], d_in, dtype=torch.long)
    codes[:, 0::2] = q & 0xF                                      # even column: low nibble
    codes[:, 1::2] = q >> 4
    return E2M1_CODES[codes]                                      # sign << 3 | magnitude index


def fp_scales(scales: torch.Tensor, global_scale: Optional[torch.Tensor], fmt: str) -> torch.Tensor:
    """FPLinear's stored scales -> the effective scales [out, G] fp32."""
    if fmt == "nvfp4":                                            # E4M3 bits of scale * g
        return E4M3_CODES[scales.cpu().long()] / global_scale.cpu().float()
    if fmt == "mxfp4":                                            # E8M0: 2^(e - 127), 0 for e = 0
        e = scales.cpu().long()
        return torch.where(e > 0, torch.ldexp(torch.ones(e.shape), e - 127), torch.zeros(e.shape))
    return scales.cpu().float()                                   # fp8: fp32, one per row


def fp_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, global_scale: Optional[torch.Tensor],
              fmt: str, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x W_hat^T for FPLinear storage: W_hat[o, j] = value(u[o, j]) * scale[o, j // group]."""
    d_in = x.shape[-1]
    g = FORMATS[fmt][1] or d_in
    values, s = fp_values(qweight, fmt, d_in), fp_scales(scales, global_scale, fmt)
    W = values * s.repeat_interleave(g, dim=1)[:, :d_in]
    return _linear(x, W.to(x.device), bias)
