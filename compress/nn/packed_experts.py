"""PackedExperts: a fused experts module whose projections are stored per expert.

transformers' experts modules hold every expert in one 3-D parameter per projection
(compress.experts). After a packing pass each expert's projection is its own runtime
module (QuantLinear, SparseQuantLinear, GQSALinear, ArmorLinear; an nn.Linear for an
expert no packing pass targeted), stored under the per-expert names of the published
checkpoints:

    <experts>.<e>.gate_proj.qweight ...     <experts>.<e>.down_proj.scales ...

The forward is the model's own: the original module (`inner`, without its packed
parameters) is called with each fused parameter rebuilt, in its own layout, from the
experts' effective weights. Biases, and fused parameters no pass packed, stay in `inner`.
"""
from __future__ import annotations

import torch
from torch import nn

from compress.experts import Experts, Proj, view_of
from compress.nn.base import RUNTIME, runtime


def _proj(d: dict) -> Proj:
    return Proj(d["param"], d["name"], d["half"])


@runtime
class PackedExperts(nn.Module):
    """inner     the model's experts module, its packed fused parameters removed
    <e>.<proj>   expert e's runtime module for projection proj"""

    replaces_experts = True

    def __init__(self, inner: nn.Module, layout: dict, projs: list[Proj], shapes: dict, experts: list[dict]):
        super().__init__()
        self.inner, self.layout, self.projs, self.shapes, self.num = inner, layout, projs, shapes, len(experts)
        for e, mods in enumerate(experts):
            self.add_module(str(e), nn.ModuleDict(mods))
        for param in {p.param for p in projs}:   # rebuilt at every forward
            inner._parameters.pop(param, None)

    @classmethod
    def pack(cls, ex: Experts, parts: dict) -> "PackedExperts":
        """From the runtime modules {Proj: [E modules or None]} the runner made of the
        packing results; the fused parameters those projections live in move into
        per-expert modules (an expert a pass did not pack keeps its weight in an nn.Linear)."""
        params = {p.param for p in parts}
        projs = [p for p in ex.projs if p.param in params]
        experts = [{p.name: parts[p][e] if parts.get(p) and parts[p][e] is not None
                    else _dense(ex.weights(p)[e]) for p in projs} for e in range(ex.num)]
        shapes = {n: list(getattr(ex.module, n).shape) for n in params}
        layout = {"transposed": ex.transposed, "concatenated": ex.concatenated}
        return cls(ex.module, layout, projs, shapes, experts)

    @classmethod
    def empty(cls, meta: dict, inner: nn.Module) -> "PackedExperts":
        """An unfilled module of the layout `meta` records, around the model's own `inner`."""
        projs = [_proj(d) for d in meta["projs"]]
        experts = [{p.name: nn.Linear(mm["in_features"], mm["out_features"], bias=False) if mm["type"] == "Linear"
                    else RUNTIME[mm["type"]].empty(mm) for p, mm in zip(projs, metas)} for metas in meta["experts"]]
        return cls(inner, meta["layout"], projs, meta["shapes"], experts)

    def meta(self) -> dict:
        def one(mod):
            if isinstance(mod, nn.Linear):
                return {"type": "Linear", "in_features": mod.in_features, "out_features": mod.out_features}
            return mod.meta()
        return {"type": type(self).__name__, "layout": self.layout, "shapes": self.shapes,
                "projs": [{"param": p.param, "name": p.name, "half": p.half} for p in self.projs],
                "experts": [[one(self.expert(e, p)) for p in self.projs] for e in range(self.num)]}

    def expert(self, e: int, p: Proj) -> nn.Module:
        return self.get_submodule(f"{e}.{p.name}")

    def weights(self, p: Proj, fused: torch.Tensor) -> torch.Tensor:
        """[E, out, in] view of projection p inside `fused` (compress.experts.view_of)."""
        return view_of(fused, p, self.layout["transposed"], self.layout["concatenated"])

    def effective(self, dtype=torch.float32) -> dict[str, torch.Tensor]:
        """{fused parameter name: its dense tensor, rebuilt from the experts' modules}."""
        out = {}
        for p in self.projs:
            if p.param not in out:
                dev = next(iter(self.state_dict().values())).device
                out[p.param] = torch.empty(self.shapes[p.param], dtype=dtype, device=dev)
            W = torch.stack([_weight(self.expert(e, p)) for e in range(self.num)])   # [E, out, in]
            self.weights(p, out[p.param]).copy_(W)
        return out

    def forward(self, *args, **kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        fused = self.effective(x.dtype)
        for name, t in fused.items():
            setattr(self.inner, name, t)   # a plain attribute for this call
        try:
            return self.inner(*args, **kwargs)
        finally:
            for name in fused:
                delattr(self.inner, name)

    @torch.no_grad()
    def to_fused(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The model's own experts module with its fused parameters holding the experts'
        effective weights (in `dtype`): the dense fold, for formats of plain tensors."""
        for name, t in self.effective(dtype).items():
            self.inner.register_parameter(name, nn.Parameter(t, requires_grad=False))
        return self.inner

    def storage_bits(self) -> int:
        return sum(m.storage_bits() if hasattr(m, "storage_bits") else m.weight.numel() * 16
                   for e in range(self.num) for m in (self.expert(e, p) for p in self.projs))


def _dense(W: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
    return lin


def _weight(m: nn.Module) -> torch.Tensor:
    return m.weight.float() if isinstance(m, nn.Linear) else m.effective_weight()
