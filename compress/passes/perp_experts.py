"""PERP's adapters on fused MoE experts (compress.passes.perp; the experts' layout is
compress.experts): every targeted expert's projection gets its own low-rank factor,
batched over experts,

    MaskLoRA   W'_e = W_e + s * (B_e A_e ⊙ M_e),  M_e = (W_e != 0)
    ScaleLoRA  W'_e = W_e ⊙ (B_e A_e)

    B [E, out, r]   A [E, r, in]   (experts a pass does not target keep B_e A_e out)

The adapter is a parametrization of the fused parameter (torch.nn.utils.parametrize),
so the model's own experts forward reads W' and gradients reach A and B. Merging
writes W' back with the mask exactly as it was, as PERP's `merge` does for linears.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.experts import Experts, Proj


class ExpertsLoRA(nn.Module):
    """The parametrization of one fused parameter `param` of experts module `ex`:
    adapters on its projections `projs` for the experts marked in `chosen` [E] bool."""

    def __init__(self, ex: Experts, param: str, projs: list[Proj], chosen: torch.Tensor, kind: str, rank: int,
                 scaling: float, generator: torch.Generator):
        super().__init__()
        self.ex, self.projs, self.kind, self.s = ex, projs, kind, scaling
        W = getattr(ex.module, param)
        self.register_buffer("chosen", chosen.to(W.device).float()[:, None, None])   # [E, 1, 1]
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for p in projs:
            E, out, d_in = ex.weights(p).shape
            r = min(rank, out, d_in)
            A = torch.empty(E, r, d_in).uniform_(-1 / math.sqrt(d_in), 1 / math.sqrt(d_in), generator=generator)
            B = torch.zeros(E, out, r)
            if kind == "scalelora":                       # B A = 1 with all r components free
                A[:, 0], B[:, :, 0] = 1.0, 1.0
            self.A[p.name], self.B[p.name] = nn.Parameter(A.to(W.device)), nn.Parameter(B.to(W.device))

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        out = W.clone()
        for p in self.projs:
            V = self.ex.weights(p, W).float()                                 # [E, out, in]
            BA = self.B[p.name] @ self.A[p.name]
            if self.kind == "scalelora":
                new = V * (1 + self.chosen * (BA - 1))
            else:
                new = V + self.s * self.chosen * torch.where(V != 0, BA, torch.zeros((), device=V.device))
            self.ex.weights(p, out).copy_(new.to(W.dtype))
        return out

    def parameters_to_train(self) -> list[nn.Parameter]:
        return [*self.A.values(), *self.B.values()]


def attach_experts(ex: Experts, names: set, kind: str, rank: int, scaling: float, gen) -> list[ExpertsLoRA]:
    """Parametrize the fused parameters of `ex` whose expert layers are in `names`."""
    out = []
    for param in dict.fromkeys(p.param for p in ex.projs):
        projs = [p for p in ex.projs if p.param == param]
        chosen = torch.tensor([any(ex.layer_name(e, p) in names for p in projs) for e in range(ex.num)])
        if chosen.any():
            lora = ExpertsLoRA(ex, param, projs, chosen, kind, rank, scaling, gen)
            parametrize.register_parametrization(ex.module, param, lora, unsafe=True)
            out.append(lora)
    return out


@torch.no_grad()
def merge_experts(loras: list[ExpertsLoRA], write: bool) -> int:
    """Write W' into each fused parameter (write=False: drop the adapters); pruned
    weights stay 0 and a kept weight that would round to 0 keeps its value. Returns the
    number of such guarded weights."""
    kept_back = 0
    for lora in loras:
        m = lora.ex.module
        name = next(n for n, ps in m.parametrizations.items() if any(x is lora for x in ps))
        new = getattr(m, name).detach().clone()
        parametrize.remove_parametrizations(m, name, leave_parametrized=False)
        W = getattr(m, name)
        if write:
            stuck = (W != 0) & (new == 0)
            kept_back += int(stuck.sum())
            W.copy_(torch.where(W != 0, torch.where(stuck, W, new), torch.zeros((), dtype=W.dtype, device=W.device)))
    return kept_back
