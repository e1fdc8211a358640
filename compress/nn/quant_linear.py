"""QuantLinear: a linear layer whose weight is stored as packed b-bit group codes.

    qweight  [out, ceil(in*b/32)] int32   codes u, bit-packed along the input (compress.packing)
    scales   [out, G] fp16                one scale per group of `group_size` inputs
    qzeros   [out, ceil(G*b/32)] int32    zero points, packed the same way (asymmetric only;
                                          symmetric grids use z = 2^(b-1))
    g_idx    [in] int32                   group of each input column (GPTQ act_order only)

    W_hat[o, j] = (u[o, j] - z[o, g(j)]) * s[o, g(j)]      (compress.quantize)
"""
from __future__ import annotations

from typing import Optional

import torch

from compress.nn.base import PackedLinear, runtime
from compress.packing import pack_bits, packed_words, unpack_bits
from compress.quantize import SCALE_DTYPE, QuantResult, QuantSpec, dequantize_weight


@runtime
class QuantLinear(PackedLinear):
    PACKED = ("qweight", "scales", "qzeros", "g_idx")

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: Optional[int],
                 symmetric: bool, bias: bool = False, g_idx: bool = False):
        super().__init__(in_features, out_features, bias)
        self.spec = QuantSpec(bits, group_size, symmetric)
        G = self.spec.n_groups(in_features)
        self.register_buffer("qweight", torch.zeros(out_features, packed_words(in_features, bits), dtype=torch.int32))
        self.register_buffer("scales", torch.ones(out_features, G, dtype=SCALE_DTYPE))
        self.register_buffer("qzeros", None if symmetric else
                             torch.zeros(out_features, packed_words(G, bits), dtype=torch.int32))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32) if g_idx else None)

    @classmethod
    def from_result(cls, res: QuantResult, bias: Optional[torch.Tensor] = None) -> "QuantLinear":
        out, d_in = res.codes.shape
        s = res.spec
        m = cls(d_in, out, s.bits, s.group_size, s.symmetric, bias is not None, res.g_idx is not None)
        dev = res.codes.device
        m.to(dev)
        m.qweight.copy_(pack_bits(res.codes, s.bits))
        m.scales.copy_(res.scale.to(SCALE_DTYPE))       # exact: the scales are fp16 values
        if m.qzeros is not None:
            m.qzeros.copy_(pack_bits(res.zero.to(torch.uint8), s.bits))
        if m.g_idx is not None:
            m.g_idx.copy_(res.g_idx)
        m.set_bias(bias)
        return m

    @classmethod
    def empty(cls, meta: dict) -> "QuantLinear":
        return cls(meta["in_features"], meta["out_features"], meta["bits"], meta["group_size"],
                   meta["symmetric"], meta["bias"], meta["g_idx"])

    def meta(self) -> dict:
        return {"type": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features,
                "bits": self.spec.bits, "group_size": self.spec.group_size, "symmetric": self.spec.symmetric,
                "bias": self.bias is not None, "g_idx": self.g_idx is not None}

    def codes(self) -> torch.Tensor:
        """[out, in] uint8 codes."""
        return unpack_bits(self.qweight, self.spec.bits, self.in_features)

    def effective_weight(self) -> torch.Tensor:
        return dequantize_weight(self.codes(), self.scales.float(), self.zeros(), self.spec, self.g_idx)
