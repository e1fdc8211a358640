"""PERP's low-rank adapters on one dense linear layer (compress.passes.perp):

    masklora   W' = W + s * (B A ⊙ M),  M = (W != 0)
    scalelora  W' = W ⊙ (B A),          B A = 1 at the start
    lora       W' = W + s * B A          (the output head)

B [out, r], A [r, in], s = alpha / r.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from compress.models import get_weight


class Adapter(nn.Module):
    """A frozen linear `base` plus a trainable low-rank factor (MaskLoRA, ScaleLoRA or
    LoRA). The effective weight is materialized per forward: out x in x r extra work,
    small next to the batch matmul, and it is exactly what `merge` writes."""

    def __init__(self, base: nn.Module, kind: str, rank: int, scaling: float, generator: torch.Generator):
        super().__init__()
        out, d_in = get_weight(base).shape
        self.base, self.kind, self.s = base, kind, scaling
        r = min(rank, out, d_in)
        A = torch.empty(r, d_in)
        bound = 1 / math.sqrt(d_in)                    # LoRA's kaiming-uniform(a=sqrt 5) bound
        A.uniform_(-bound, bound, generator=generator)
        B = torch.zeros(out, r)
        if kind == "scalelora":                        # B A = 1 with all r components free
            A[0], B[:, 0] = 1.0, 1.0
        dev = base.weight.device
        self.A, self.B = nn.Parameter(A.to(dev)), nn.Parameter(B.to(dev))

    def weight(self) -> torch.Tensor:
        """W' [out, in] in fp32."""
        W = get_weight(self.base).float()
        BA = self.B @ self.A
        if self.kind == "scalelora":
            return W * BA
        if self.kind == "masklora":
            return W + self.s * torch.where(W != 0, BA, torch.zeros((), device=W.device))
        return W + self.s * BA

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), self.base.bias)

    def parameters_to_train(self) -> list[nn.Parameter]:
        return [self.A, self.B]
