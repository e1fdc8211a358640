"""GQSALinear: group-sparse, group-quantized weights (GQSA, Zeng et al., 2024).

Each row of W [out, in] is cut into G groups of g consecutive inputs; every row keeps
the same number k of groups (the rest are pruned whole), and only the kept groups are
stored, quantized with one scale / zero point per group:

    qweight    [out, ceil(k*g*b/32)] int32   codes of the kept groups, row-major, bit-packed
    group_idx  [out, k] int16                which group each kept group is (ascending)
    scales     [out, k] fp16
    qzeros     [out, ceil(k*b/32)] int32     (asymmetric only; symmetric: z = 2^(b-1))

    W_hat[o, g*idx[o,t] + e] = (u[o, t, e] - z[o, t]) * s[o, t],   all other weights 0

A shorter last group (in % g != 0) is stored padded to g codes; the padding is dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from compress.nn.base import PackedLinear, runtime
from compress.packing import pack_bits, packed_words, unpack_bits
from compress.quantize import SCALE_DTYPE, QuantResult, QuantSpec, dequantize, grouped


def scatter_groups(values: torch.Tensor, idx: torch.Tensor, d_in: int, n_groups: int) -> torch.Tensor:
    """values [out, k, g] of the kept groups idx [out, k] -> W [out, d_in] with zeros elsewhere."""
    out, k, g = values.shape
    W = values.new_zeros(out, n_groups, g)
    W.scatter_(1, idx.long()[..., None].expand(out, k, g), values)
    return W.reshape(out, n_groups * g)[:, :d_in]


@dataclass
class GroupSparseResult:
    """A GQSA layer before packing: codes [out, k, g] uint8, scale / zero [out, k] fp32,
    idx [out, k] (ascending) of the kept groups, d_in the true input size; keep
    [out, in] optionally marks the weights allowed to be non-zero inside kept groups
    (an earlier pass's zeros stay zero under BQPO). Only the first six are stored."""

    spec: QuantSpec
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    idx: torch.Tensor
    d_in: int
    keep: Optional[torch.Tensor] = None

    @classmethod
    def from_dense(cls, res: QuantResult, keep_groups: torch.Tensor,
                   keep: Optional[torch.Tensor] = None) -> "GroupSparseResult":
        """Keep only the groups marked in keep_groups [out, G] (the same count per row)."""
        k = int(keep_groups[0].sum())
        if not bool((keep_groups.sum(1) == k).all()):
            raise ValueError("every row must keep the same number of groups")
        idx = torch.sort(torch.argsort((~keep_groups).to(torch.int8), dim=1, stable=True)[:, :k], dim=1).values
        codes = grouped(res.codes, res.spec)                              # [out, G, g]
        g = codes.shape[2]
        return cls(res.spec, codes.gather(1, idx[..., None].expand(-1, -1, g)),
                   res.scale.gather(1, idx), res.zero.gather(1, idx), idx, res.codes.shape[1], keep)

    def dequantize(self) -> torch.Tensor:
        values = dequantize(self.codes, self.scale[..., None], self.zero[..., None])
        return scatter_groups(values, self.idx, self.d_in, self.spec.n_groups(self.d_in))


@runtime
class GQSALinear(PackedLinear):
    PACKED = ("qweight", "group_idx", "scales", "qzeros")

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool,
                 kept_groups: int, bias: bool = False):
        super().__init__(in_features, out_features, bias)
        self.spec = QuantSpec(bits, group_size, symmetric)
        self.kept_groups = k = kept_groups
        idx_dtype = torch.int16 if self.spec.n_groups(in_features) < 1 << 15 else torch.int32
        self.register_buffer("qweight", torch.zeros(out_features, packed_words(k * group_size, bits), dtype=torch.int32))
        self.register_buffer("group_idx", torch.zeros(out_features, k, dtype=idx_dtype))
        self.register_buffer("scales", torch.ones(out_features, k, dtype=SCALE_DTYPE))
        self.register_buffer("qzeros", None if symmetric else
                             torch.zeros(out_features, packed_words(k, bits), dtype=torch.int32))

    @classmethod
    def from_result(cls, res: GroupSparseResult, bias: Optional[torch.Tensor] = None) -> "GQSALinear":
        out, k, g = res.codes.shape
        s = res.spec
        m = cls(res.d_in, out, s.bits, s.group_size, s.symmetric, k, bias is not None).to(res.codes.device)
        m.qweight.copy_(pack_bits(res.codes.reshape(out, k * g), s.bits))
        m.group_idx.copy_(res.idx)
        m.scales.copy_(res.scale.to(SCALE_DTYPE))
        if m.qzeros is not None:
            m.qzeros.copy_(pack_bits(res.zero.to(torch.uint8), s.bits))
        m.set_bias(bias)
        return m

    @classmethod
    def empty(cls, meta: dict) -> "GQSALinear":
        return cls(meta["in_features"], meta["out_features"], meta["bits"], meta["group_size"], meta["symmetric"],
                   meta["kept_groups"], meta["bias"])

    def meta(self) -> dict:
        return {"type": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features,
                "bits": self.spec.bits, "group_size": self.spec.group_size, "symmetric": self.spec.symmetric,
                "kept_groups": self.kept_groups, "bias": self.bias is not None}

    def effective_weight(self) -> torch.Tensor:
        out, k, g, b = self.out_features, self.kept_groups, self.spec.group_size, self.spec.bits
        codes = unpack_bits(self.qweight, b, k * g).reshape(out, k, g)
        values = dequantize(codes, self.scales.float()[..., None], self.zeros()[..., None])
        return scatter_groups(values, self.group_idx, self.in_features, self.spec.n_groups(self.in_features))
