"""GGMLLinear: a linear layer stored as the bytes of a llama.cpp block format.

    blocks  [out, in / block * bytes] uint8    each row a sequence of ggml blocks
                                               (Q8_0 ... Q6_K, compress/ggml_blocks.py)

The quant pass with `format: gguf-...` leaves codes chosen on that format's grid
(compress.ggml); this module keeps them as the very bytes llama.cpp reads, so the GGUF
exporter writes them unchanged and `compress.load` rebuilds identical logits.
"""
from __future__ import annotations

from typing import Optional

import torch

from compress.ggml_blocks import dequantize, pack, row_bytes
from compress.nn.base import PackedLinear, runtime
from compress.quantize import QuantResult


@runtime
class GGMLLinear(PackedLinear):
    PACKED = ("blocks",)

    def __init__(self, in_features: int, out_features: int, fmt: str, bias: bool = False):
        super().__init__(in_features, out_features, bias)
        self.fmt = fmt
        self.register_buffer("blocks", torch.zeros(out_features, row_bytes(fmt, in_features), dtype=torch.uint8))

    @classmethod
    def from_result(cls, res: QuantResult, bias: Optional[torch.Tensor] = None) -> "GGMLLinear":
        out, d_in = res.codes.shape
        m = cls(d_in, out, res.spec.fmt, bias is not None)
        m.blocks = pack(res.spec.fmt, res.codes, res.raw).to(res.codes.device)
        m.set_bias(bias)
        return m

    @classmethod
    def empty(cls, meta: dict) -> "GGMLLinear":
        return cls(meta["in_features"], meta["out_features"], meta["format"], meta["bias"])

    def meta(self) -> dict:
        return {"type": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features,
                "format": self.fmt, "bias": self.bias is not None}

    def effective_weight(self) -> torch.Tensor:
        return dequantize(self.blocks, self.fmt, self.in_features).to(self.blocks.device)
