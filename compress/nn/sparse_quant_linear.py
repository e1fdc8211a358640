"""SparseQuantLinear: a 2:4 sparse, group-quantized linear layer that stores only the
kept half of the codes.

    qweight  [out, ceil(in/2*b/32)] int32  codes u of the two kept weights of every group
                                           of 4 inputs, in column order, bit-packed
    pattern  [out, ceil(in/4*3/32)] int32  which two of the four: an index into PAIRS,
                                           3 bits per group of 4 (6 patterns), bit-packed
    scales   [out, G] fp16, qzeros as in QuantLinear (groups of `group_size` input columns)

    W_hat[o, j] = (u[o, j] - z[o, g(j)]) * s[o, g(j)] where j is kept, else 0

At 4 bits with groups of 64: 2 (codes) + 0.75 (pattern) + 0.25 (scale) = 3 bits per
weight, 0.19 of fp16; a dense-stored int4 layer takes 4.25 (asymmetric zero points add
about 0.1 to both, word padding a little). It is a QuantLinear: its `codes()` are the
full [out, in] codes, with the code of 0 at the pruned positions.
"""
from __future__ import annotations

from typing import Optional

import torch

from compress.kernels.reference import PAIRS, PATTERN_BITS   # [6, 2] the ways to keep 2 of 4
from compress.nn.base import runtime
from compress.nn.quant_linear import QuantLinear
from compress.packing import pack_bits, packed_words, unpack_bits
from compress.quantize import SCALE_DTYPE, QuantResult, column_groups


def pattern_of(keep: torch.Tensor) -> torch.Tensor:
    """[out, in] mask with at most 2 True per group of 4 -> [out, in/4] pattern index.
    A group with fewer than two kept weights is completed with its first free slots."""
    out, d_in = keep.shape
    g = keep.reshape(out, d_in // 4, 4)
    rank = (~g).to(torch.int64) * 4 + torch.arange(4, device=keep.device)   # kept first, then by slot
    two = rank.argsort(dim=-1)[..., :2].sort(dim=-1).values                  # [out, in/4, 2], p0 < p1
    lookup = torch.full((16,), -1, dtype=torch.int64, device=keep.device)
    lookup[PAIRS[:, 0].to(keep.device) * 4 + PAIRS[:, 1].to(keep.device)] = torch.arange(6, device=keep.device)
    return lookup[two[..., 0] * 4 + two[..., 1]]


def positions_of(pattern: torch.Tensor) -> torch.Tensor:
    """[out, in/4] pattern index -> [out, in/2] input column of each kept slot."""
    out, n = pattern.shape
    pos = PAIRS.to(pattern.device)[pattern.long()]                           # [out, in/4, 2]
    return (pos + 4 * torch.arange(n, device=pattern.device)[None, :, None]).reshape(out, 2 * n)


@runtime
class SparseQuantLinear(QuantLinear):
    PACKED = ("qweight", "pattern", "scales", "qzeros")

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: Optional[int],
                 symmetric: bool, bias: bool = False, g_idx: bool = False):
        if in_features % 4 or g_idx:
            raise ValueError("SparseQuantLinear needs a multiple of 4 inputs and contiguous groups")
        super().__init__(in_features, out_features, bits, group_size, symmetric, bias, False)
        self.qweight = torch.zeros(out_features, packed_words(in_features // 2, bits), dtype=torch.int32)
        self.register_buffer("pattern", torch.zeros(out_features, packed_words(in_features // 4, PATTERN_BITS),
                                                    dtype=torch.int32))

    @classmethod
    def from_result(cls, res: QuantResult, bias: Optional[torch.Tensor] = None) -> "SparseQuantLinear":
        out, d_in = res.codes.shape
        s = res.spec
        m = cls(d_in, out, s.bits, s.group_size, s.symmetric, bias is not None).to(res.codes.device)
        zero_code = res.zero[:, column_groups(d_in, s, res.codes.device)]   # [out, in] code of 0
        pattern = pattern_of(res.codes.float() != zero_code)
        kept = res.codes.gather(1, positions_of(pattern))                    # [out, in/2]
        m.qweight.copy_(pack_bits(kept, s.bits))
        m.pattern.copy_(pack_bits(pattern, PATTERN_BITS))
        m.scales.copy_(res.scale.to(SCALE_DTYPE))
        if m.qzeros is not None:
            m.qzeros.copy_(pack_bits(res.zero.to(torch.uint8), s.bits))
        m.set_bias(bias)
        return m

    def codes(self) -> torch.Tensor:
        """[out, in] uint8 codes: the kept ones, the code of 0 elsewhere."""
        d_in = self.in_features
        zero_code = self.zeros()[:, column_groups(d_in, self.spec, self.scales.device)]
        full = zero_code.to(torch.uint8)
        pattern = unpack_bits(self.pattern, PATTERN_BITS, d_in // 4)
        kept = unpack_bits(self.qweight, self.spec.bits, d_in // 2)
        return full.scatter(1, positions_of(pattern), kept)
