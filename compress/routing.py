"""Per-expert input statistics of fused MoE experts, from the block's own forward.

A forward hook on the experts module sees its arguments (the tokens and the model's
true routing) and its output. It recomputes each expert's chain, input -> gate_up (or
up) -> the module's own gating -> down, in the dtype the block runs in, as the model
computes it (compress.experts), and adds the inputs of each projection to that
projection's ExpertStats:

- moe_calibration 'all' (llm-compressor's default): every expert on every token, so no
  expert is starved of data; batched over experts, in chunks of tokens;
- 'routed': each expert on the tokens the router sent it, one expert at a time.

The block's output, which feeds the next block, is the module's own either way: the
true routing. On the first batch the recomputed output must match it (check_output).

    X [E, T, H]   each expert's input        A [E, T, I]   each expert's down input
"""
from __future__ import annotations

from typing import Optional

import torch

from compress.experts import Experts, Proj, check_output
from compress.stats import ExpertStats

MODES = ("all", "routed")
CHUNK_ELEMS = 1 << 25   # tokens per chunk in 'all' mode: E * t * 2I fp32 values stay under 128 MiB


class ExpertsObserver:
    """Statistics of the requested projections of one experts module. `stats` maps a
    Proj to its ExpertStats; gate and up read the same input and share one."""

    def __init__(self, ex: Experts, projs: list[Proj], want_xtx: bool, mode: str, device):
        self.ex, self.mode, self.checked = ex, mode, False
        self.stats: dict[Proj, ExpertStats] = {}
        up = next(p for p in ex.projs if p.param != "down_proj")
        shared = None
        for p in projs:
            d_in = ex.weights(p).shape[-1]
            if p.param == "down_proj":
                self.stats[p] = ExpertStats(ex.num, d_in, want_xtx, device)
            else:
                shared = shared or ExpertStats(ex.num, d_in, want_xtx, device)
                self.stats[p] = shared
        self.up = up.param
        self.s_in = shared
        self.s_down = next((s for p, s in self.stats.items() if p.param == "down_proj"), None)

    def hook(self, module, args, kwargs, out):
        args = tuple(args) + tuple(kwargs.values())
        X, routed, weight = self.ex.routing(args)
        y = out[0] if isinstance(out, tuple) else out
        mine = self._all(X, routed, weight) if self.mode == "all" else self._routed(X, routed, weight)
        if not self.checked:
            check_output(self.ex, mine, y.reshape(mine.shape))
            self.checked = True

    def _chain(self, experts: torch.Tensor, X: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Add the statistics of X [n, t, H] for `experts` [n]; return their outputs [n, t, H]."""
        if self.s_in is not None:
            self.s_in.update(experts, X, counts)
        A = self.ex.hidden(self.ex.project(self.up, X, experts))          # [n, t, I]
        if self.s_down is not None:
            self.s_down.update(experts, A, counts)
        return self.ex.project("down_proj", A, experts)                   # [n, t, H]

    def _all(self, X, routed, weight) -> torch.Tensor:
        E, T, H = X.shape
        every = torch.arange(E, device=X.device)
        step = max(1, CHUNK_ELEMS // max(1, E * self.ex.weights(self.ex.projs[0]).shape[1] * 2))
        outs = []
        for t0 in range(0, T, step):
            Xc = X[:, t0:t0 + step]                                         # [E, t, H]
            Y = self._chain(every, Xc, torch.full((E,), Xc.shape[1], device=X.device))
            outs.append(self._combine(Y, routed[:, t0:t0 + step], None if weight is None else weight[:, t0:t0 + step]))
        return torch.cat(outs, dim=-2)

    def _routed(self, X, routed, weight) -> torch.Tensor:
        E, T, H = X.shape
        if self.ex.dispatch == "dense":
            out = torch.zeros(E, T, H, device=X.device)
        else:
            out = torch.zeros(T, H, device=X.device)
        for e in routed.any(1).nonzero().flatten().tolist():
            tok = routed[e].nonzero().flatten()
            Y = self._chain(torch.tensor([e], device=X.device), X[e, tok][None], tok.new_tensor([len(tok)]))[0].float()
            if self.ex.dispatch == "dense":
                out[e, tok] = Y
            else:
                out.index_add_(0, tok, Y * weight[e, tok, None])
        return out.reshape(-1, H) if self.ex.dispatch == "dense" else out

    def _combine(self, Y: torch.Tensor, routed: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
        """The module's output on a chunk from every expert's output Y [E, t, H]: the
        routing-weighted sum (decorated experts), or each expert's rows (dense)."""
        if weight is None:
            return Y.float() * routed[..., None]
        return (Y.float() * weight[..., None]).sum(0)
