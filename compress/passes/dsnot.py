"""DSnoT: Dynamic Sparse No Training (Zhang et al., ICLR 2024, "Dynamic Sparse No
Training: Training-Free Fine-tuning for Sparse LLMs").

DSnoT runs after a pruning pass (magnitude, Wanda, SparseGPT) on the same layer. It moves
the layer's zeros and never changes a weight's value: no backpropagation, no update.
For output row i, the expected reconstruction error of the pruned weight W_hat against
the dense W is

    delta_i = sum_j (W_ij - W_hat_ij) * E[x_j]

Each cycle swaps one pruned weight for one kept weight in every row.
- Grow: regrow the pruned weight r that shrinks |delta_i| the most, preferring inputs
  whose value is steady (low variance, raised to the power p):
      r = argmax_j  sign(delta_i) * W_ij * E[x_j] / Var[x_j]^p,
  over pruned j with sign(delta_i) * W_ij * E[x_j] > 0.
- Prune: cut the kept weight q whose removal also moves delta_i towards 0. Among those,
  take the least important by Wanda's score:
      q = argmin_k |W_hat_ik| * ||X_k||_2,
  over kept k with sign(delta_i) * W_hat_ik * E[x_k] < 0.

A swap is accepted while |delta_i| > threshold and delta_i keeps its sign, so there is
no overshoot and |delta_i| only shrinks. A row stops at its first rejected swap, or
after `max_cycles`. A regrown weight gets back its dense value W_ij.

Row sparsity never changes. With an N:M mask the pruned weight is taken from the
regrown weight's group of M, so the pattern stays exact.

Where our version differs from the reference code: it runs on every targeted linear
layer, the MLP projections included. It checks the sign for unstructured masks as
well. It ranks pruning candidates by the Wanda score of the current (for SparseGPT,
updated) weights, so it needs no Hessian.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from compress.errors import CompressError
from compress.masks import check_nm_fits
from compress.passes.base import Layer, PassConfig, register
from compress.passes.sparsity import parse_pattern


@dataclass
class DSnoTConfig(PassConfig):
    """max_cycles  swaps tried per row at most
    threshold   a row stops once |delta_i| is at most this
    var_power   p in the growing criterion (0: ignore the variance)
    pattern     'auto' (the N:M pattern of the pruning pass before it, else
                unstructured), 'unstructured', or 'N:M' to keep (checked)
    guard       ours, not the paper's: also refuse a swap that raises the row's
                expected squared error delta_i^2 + sum_j D_ij^2 Var[x_j]
                (D = W - W_hat, inputs taken as independent)"""

    max_cycles: int = 50
    threshold: float = 0.1
    var_power: float = 1.0
    pattern: str = "auto"
    guard: bool = False

    def validate(self) -> None:
        super().validate()
        n = self.name
        if isinstance(self.max_cycles, bool) or not isinstance(self.max_cycles, int) or self.max_cycles < 0:
            raise CompressError(f"{n}.max_cycles: expected an integer >= 0, got {self.max_cycles!r}")
        for key in ("threshold", "var_power"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise CompressError(f"{n}.{key}: expected a number >= 0, got {v!r}")
        if not isinstance(self.guard, bool):
            raise CompressError(f"{n}.guard: expected true or false, got {self.guard!r}")
        if self.pattern != "auto":
            parse_pattern(self.pattern, f"{n}.pattern")

    @property
    def nm(self):
        """(N, M) of an explicit N:M pattern, else None ('auto', 'unstructured')."""
        return None if self.pattern == "auto" else parse_pattern(self.pattern, f"{self.name}.pattern")

    def check_layer(self, name: str, out: int, d_in: int) -> None:
        if self.nm:
            check_nm_fits(name, d_in, self.nm)


DSnoT = DSnoTConfig


def _layer_pattern(layer: Layer, cfg: DSnoTConfig):
    """(N, M) or None: the pattern the swaps must keep."""
    if cfg.pattern == "auto":
        return layer.nm
    nm = cfg.nm
    if nm:
        cfg.check_layer(layer.name, *layer.W.shape)
        kept = (layer.W != 0).reshape(layer.W.shape[0], -1, nm[1]).sum(-1)
        if (kept > nm[0]).any():
            raise CompressError(f"{cfg.name}.pattern: the zeros of {layer.name} do not follow {cfg.pattern}; "
                                "prune it N:M first or use pattern: unstructured")
    return nm


@dataclass
class _Candidates:
    """Per-weight quantities of one layer, [out, in] unless noted."""

    delta: torch.Tensor        # [out] delta_i
    grow_shift: torch.Tensor   # W_ij E[x_j]: delta_i drops by this when j regrows
    cut_shift: torch.Tensor    # W_hat_ik E[x_k]: delta_i grows by this when k is cut
    grow_rank: torch.Tensor    # growing criterion, -inf where j may not regrow
    cut_rank: torch.Tensor     # Wanda score, +inf where k may not be cut
    grow_var: Optional[torch.Tensor] = None   # guard: change of sum_j D_ij^2 Var[x_j]
    cut_var: Optional[torch.Tensor] = None

    def guard_ok(self, before, after, rows, grow, cut) -> torch.Tensor:
        """The swap lowers delta^2 + sum_j D_ij^2 Var[x_j] (rows/grow/cut index alike)."""
        dvar = self.grow_var[rows, grow] + self.cut_var[rows, cut]
        return after.square() - before.square() + dvar < 0


@register("dsnot", DSnoTConfig)
@torch.no_grad()
def dsnot(layer: Layer, cfg: DSnoTConfig) -> None:
    W_hat, W = layer.W, layer.W_dense.to(layer.W.device)             # [out, in]
    mu, var, norm = (t.to(W.device) for t in (layer.stats.mean, layer.stats.var, layer.stats.norm))  # [in]
    nm = _layer_pattern(layer, cfg)
    kept = W_hat != 0
    delta = ((W - W_hat) * mu).sum(1)                                 # [out]
    s = torch.sign(delta)[:, None]                                    # [out, 1]
    grow_shift, cut_shift = W * mu, W_hat * mu
    gain = s * grow_shift                                             # > 0: regrowing j helps
    var_p = var.clamp_min(torch.finfo(var.dtype).tiny).pow(cfg.var_power)
    c = _Candidates(delta, grow_shift, cut_shift,
                    (gain / var_p).masked_fill(kept | (gain <= 0), float("-inf")),
                    (W_hat.abs() * norm).masked_fill(~kept | (s * cut_shift >= 0), float("inf")))
    if cfg.guard:
        # Regrowing j removes W_ij^2 Var_j; cutting k turns D_ik = W_ik - W_hat_ik into W_ik.
        c.grow_var = -(W.square() * var)
        c.cut_var = (W.square() - (W - W_hat).square()) * var
    rows, grow, cut = (_swap_nm(c, cfg, nm[1]) if nm else _swap_unstructured(c, cfg))
    W_hat[rows, grow] = W[rows, grow]
    W_hat[rows, cut] = 0.0
    layer.nm = nm
    after = delta.index_add(0, rows, cut_shift[rows, cut] - grow_shift[rows, grow])
    layer.info.update(dsnot_swaps=int(rows.numel()),
                      dsnot_mean_abs_delta=[float(delta.abs().mean()), float(after.abs().mean())])


def _swap_unstructured(c: _Candidates, cfg: DSnoTConfig):
    """All cycles at once. While a row is running, sign(delta_i) is fixed and a regrown
    (cut) weight is never a pruning (growing) candidate. So cycle t takes the t-th best
    of two fixed candidate lists, and delta after cycle t is a cumulative sum.
    Returns (rows, grown columns, cut columns) of the accepted swaps."""
    T = min(cfg.max_cycles, c.grow_rank.shape[1])
    gv, gi = c.grow_rank.topk(T, dim=1)                               # [out, T] best regrowths
    cv, ci = c.cut_rank.topk(T, dim=1, largest=False)                 # [out, T] cheapest cuts
    after = c.delta[:, None] + (c.cut_shift.gather(1, ci) - c.grow_shift.gather(1, gi)).cumsum(1)
    before = torch.cat([c.delta[:, None], after[:, :-1]], 1)          # delta before cycle t
    ok = gv.isfinite() & cv.isfinite() & (before.abs() > cfg.threshold)
    ok &= torch.sign(after) == torch.sign(c.delta)[:, None]
    if cfg.guard:
        ok &= c.guard_ok(before, after, torch.arange(len(gi), device=gi.device)[:, None], gi, ci)
    accepted = ok.int().cumprod(1).bool()                             # a row stops at its first refusal
    r, t = accepted.nonzero(as_tuple=True)
    return r, gi[r, t], ci[r, t]


def _swap_nm(c: _Candidates, cfg: DSnoTConfig, m: int):
    """One cycle per loop step, all rows together: each row regrows the best weight
    among its groups of M that hold a weight it may cut, and cuts in that group. Each
    group's best candidates [out, G] are kept up to date where a swap happened."""
    out, d_in = c.grow_rank.shape
    R = c.grow_rank.reshape(out, d_in // m, m).clone()                # [out, G, M]
    C = c.cut_rank.reshape(out, d_in // m, m).clone()
    best_g, arg_g = R.max(2)                                          # [out, G]
    best_c, arg_c = C.min(2)
    s, delta = torch.sign(c.delta), c.delta.clone()
    running = delta.abs() > cfg.threshold
    rows = torch.arange(out, device=delta.device)
    done = [torch.zeros(3, 0, dtype=torch.long, device=delta.device)]
    for _ in range(cfg.max_cycles):
        if not running.any():
            break
        value, q = best_g.masked_fill(best_c.isinf(), float("-inf")).max(1)   # [out] group
        jg, jc = arg_g[rows, q], arg_c[rows, q]                       # [out] place in the group
        grow, cut = q * m + jg, q * m + jc                            # [out] columns
        after = delta + c.cut_shift[rows, cut] - c.grow_shift[rows, grow]
        ok = running & value.isfinite() & (torch.sign(after) == s)
        if cfg.guard:
            ok &= c.guard_ok(delta, after, rows, grow, cut)
        r = ok.nonzero(as_tuple=True)[0]
        done.append(torch.stack([r, grow[r], cut[r]]))
        delta[r] = after[r]
        R[r, q[r], jg[r]] = float("-inf")                             # each weight swaps once
        C[r, q[r], jc[r]] = float("inf")
        best_g[r, q[r]], arg_g[r, q[r]] = R[r, q[r]].max(1)
        best_c[r, q[r]], arg_c[r, q[r]] = C[r, q[r]].min(1)
        running = ok & (delta.abs() > cfg.threshold)
    return torch.cat(done, 1)
