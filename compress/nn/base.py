"""What the runtime modules share: packed storage that casting never touches, the
plain-torch forward, storage accounting, and the registry `compress.load` uses to
rebuild them from config.json.

A runtime module replaces an `nn.Linear` (or GPT-2's Conv1D) after a packing pass.
Its state is integer codes and fp16 scales, so `model.to(torch.bfloat16)` must not
re-round them: `_apply` moves those buffers between devices but keeps their dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.packing import unpack_bits

RUNTIME: dict[str, type] = {}  # class name -> class, for compress.load


def runtime(cls):
    """Class decorator: make a runtime module loadable by name."""
    RUNTIME[cls.__name__] = cls
    return cls


class PackedLinear(nn.Module):
    """Base: y = x W_hat^T + b with W_hat [out, in] rebuilt from packed storage.

    Subclasses define `effective_weight()` (fp32 [out, in]), `meta()` (the JSON that
    rebuilds an empty module: `cls.empty(meta)`), and the buffers listed in `PACKED`."""

    PACKED: tuple = ()
    replaces_linear = True   # compress.models finds blocks of packed layers by this
    # What forward runs: its own plain-torch reference, unless compress.deploy bound a
    # fast kernel, impl(module, x) -> y, and named it in `kernel`.
    kernel = "reference"
    impl = None

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def set_bias(self, bias) -> None:
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _apply(self, fn, recurse=True):
        kept = {k: self._buffers[k] for k in self.PACKED if self._buffers.get(k) is not None}
        super()._apply(fn, recurse)
        for k, old in kept.items():  # follow the device, keep the dtype (and the values)
            self._buffers[k] = old.to(self._buffers[k].device)
        return self

    def zeros(self) -> torch.Tensor:
        """[out, n] fp32 zero points of the n stored groups (2^(b-1) on symmetric grids,
        which store none). Subclasses have `spec`, `scales` [out, n] and `qzeros`."""
        n = self.scales.shape[1]
        if self.qzeros is None:
            return torch.full((self.out_features, n), float(1 << (self.spec.bits - 1)), device=self.scales.device)
        return unpack_bits(self.qzeros, self.spec.bits, n).float()

    def effective_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl is not None:
            return self.impl(self, x)
        # Reference path: dequantize, then a dense matmul.
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.effective_weight().to(x.dtype), bias)

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A plain nn.Linear holding the effective weight (rounded to `dtype`): the dense
        fold for formats that cannot express this module."""
        W = self.effective_weight()                     # [out, in] fp32
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=W.device, dtype=dtype)
        lin.weight.copy_(W.to(dtype))
        if self.bias is not None:
            lin.bias.copy_(self.bias.to(dtype))
        return lin

    def storage_bits(self) -> int:
        """Bits of the packed weight state (codes, scales, zero points, indices), bias excluded."""
        return sum(self._buffers[k].numel() * self._buffers[k].element_size() * 8
                   for k in self.PACKED if self._buffers.get(k) is not None)

    def bits_per_weight(self) -> float:
        return self.storage_bits() / (self.in_features * self.out_features)

    def meta(self) -> dict:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.meta().items() if k != "type")


def dense_parameters(model: nn.Module) -> int:
    """Parameters of `model` as a dense model: its parameters (a tied embedding and head
    once) plus the in x out weight of every packed layer, which holds it in buffers."""
    return sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, PackedLinear))
