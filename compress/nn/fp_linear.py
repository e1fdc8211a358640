"""FPLinear: a linear layer stored in a floating-point group format (compress.fp_formats),
in compressed-tensors' own layouts, so the exporter writes its buffers as they are.

    format  qweight                         scales                      global_scale
    nvfp4   uint8 [out, in/2]: two E2M1     uint8 [out, in/16]: E4M3    fp32 [1]: g
            codes a byte, the even column   bits of S (scale * g)
            in the low nibble
    mxfp4   as nvfp4                        uint8 [out, in/32]: 127 + e  -
    fp8     uint8 [out, in]: E4M3 bits      fp32 [out, 1]: s             -

    W_hat[o, j] = value(u[o, j]) * scale[o, j // group]      (FPSpec.dequantize)
"""
from __future__ import annotations

from typing import Optional

import torch

from compress.fp_formats import FPSpec, scale_codes, scales_of
from compress.nn.base import PackedLinear, runtime
from compress.quantize import QuantResult, dequantize_weight


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """[out, in] codes 0..15 -> [out, in/2] uint8, column 2k in the low nibble."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """[out, in/2] uint8 -> [out, in] codes 0..15 (uint8)."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


@runtime
class FPLinear(PackedLinear):
    PACKED = ("qweight", "scales", "global_scale")

    def __init__(self, in_features: int, out_features: int, fmt: str, bias: bool = False):
        super().__init__(in_features, out_features, bias)
        self.spec = FPSpec(fmt)
        G = self.spec.n_groups(in_features)
        fp4 = self.spec.bits == 4
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2 if fp4 else in_features,
                                                    dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, G, dtype=torch.uint8 if fp4 else torch.float32))
        self.register_buffer("global_scale", torch.ones(1) if fmt == "nvfp4" else None)

    @property
    def fmt(self) -> str:
        return self.spec.fmt

    @classmethod
    def from_result(cls, res: QuantResult, bias: Optional[torch.Tensor] = None) -> "FPLinear":
        out, d_in = res.codes.shape
        m = cls(d_in, out, res.spec.fmt, bias is not None).to(res.codes.device)
        m.qweight.copy_(pack_fp4(res.codes) if res.spec.bits == 4 else res.codes)
        gs = None if res.raw is None else res.raw["global_scale"].reshape(1).float()
        m.scales.copy_(scale_codes(res.spec.fmt, res.scale, gs))
        if gs is not None:
            m.global_scale.copy_(gs)
        m.set_bias(bias)
        return m

    @classmethod
    def empty(cls, meta: dict) -> "FPLinear":
        return cls(meta["in_features"], meta["out_features"], meta["format"], meta["bias"])

    def meta(self) -> dict:
        return {"type": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features,
                "format": self.fmt, "bias": self.bias is not None}

    def codes(self) -> torch.Tensor:
        """[out, in] uint8 codes."""
        return unpack_fp4(self.qweight) if self.spec.bits == 4 else self.qweight

    def scale(self) -> torch.Tensor:
        """[out, G] fp32 effective scales."""
        return scales_of(self.fmt, self.scales, self.global_scale)

    def effective_weight(self) -> torch.Tensor:
        s = self.scale()
        return dequantize_weight(self.codes(), s, torch.zeros_like(s), self.spec)
