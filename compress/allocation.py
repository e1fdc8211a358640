"""Non-uniform sparsity: how much of a pruning budget each block or layer gets.

Tensors in, numbers out; compress.survey measures the dense model and calls these.
Every allocation keeps the mean sparsity over all pruned weights at the target:
sum_l n_l s_l = S sum_l n_l, n_l the weights of layer (or block) l.

OWL (Yin et al., ICML 2024, "Outlier Weighed Layerwise Sparsity", Sec. 3.3). With the
Wanda score A_ij = |W_ij| ||X_j||_2 of every weight of block l's layers, the block's
layerwise outlier distribution is

    D_l = #{A_ij > M * mean(A)} / #A

and blocks with more outliers keep more weights: s_l = S - (d_l - mean_n(d)),
d_l = 2 lambda (D_l - min D) / (max D - min D), so the sparsities span [S - lambda,
S + lambda] around the target (the reference code's normalisation; the mean is
weighted by block size so that blocks of different widths still average to S).

budget (ours). Pruning the weights P of a layer adds about sum_{(i,j) in P} A_ij^2 to
its output error ||(W - W_hat) X||^2 (the diagonal of XᵀX: cross terms dropped). Each
layer's curve E_l(s) sums the smallest A^2 the pass's ranking would drop at sparsity s
(per row or over the layer, as the pass ranks), relative to the layer's total sum A^2.
The allocation minimises sum_l E_l(s_l) under the budget, with every s_l in
[S - spread, S + spread]: each curve is convex (its steps drop ever larger scores), so
the greedy that always takes the cheapest next step per pruned weight is optimal, and
the last step is taken in part so that the budget holds exactly.
"""
from __future__ import annotations

import numpy as np
import torch

from compress.errors import CompressError
from compress.masks import pruned_count


def outlier_count(scores: list[torch.Tensor], m: float) -> tuple[int, int]:
    """(#{A > m * mean A}, #A) over all entries of the score tensors of one block."""
    total = sum(float(a.sum(dtype=torch.float64)) for a in scores)
    n = sum(a.numel() for a in scores)
    t = m * total / n
    return sum(int((a > t).sum()) for a in scores), n


def owl(ratios: list[float], sizes: list[int], target: float, lam: float) -> list[float]:
    """OWL's per-block sparsities from outlier ratios D_l and block sizes n_l."""
    D = torch.tensor(ratios, dtype=torch.float64)
    n = torch.tensor(sizes, dtype=torch.float64)
    span = float(D.max() - D.min())
    d = 2 * lam * (D - D.min()) / span if span > 0 else torch.zeros_like(D)
    s = target - (d - (n * d).sum() / n.sum())
    if float(s.min()) < 0 or float(s.max()) >= 1:
        raise CompressError(f"owl_lambda: {lam} spreads the block sparsities over [{float(s.min()):.3f}, "
                            f"{float(s.max()):.3f}], outside [0, 1); use a smaller owl_lambda")
    return s.tolist()


def ascending(x: torch.Tensor) -> torch.Tensor:
    """x sorted along its last dimension. On the CPU numpy's SIMD sort gives the same
    values 3-4x faster than torch.sort (a whole SmolLM2 MLP layer: 28 against 84 ms)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.contiguous().numpy(), axis=-1))
    return x.sort(dim=-1).values


def error_curve(score: torch.Tensor, grid: torch.Tensor, scope: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(E [K], pruned [K], total): the sum of score^2 a ranking by `score` [..., out, in]
    drops at each sparsity of `grid` [K], how many weights that prunes, and the sum of all
    score^2. scope 'row' ranks within each row (the same count per row, as
    compress.masks.topk_mask), 'layer' over each whole matrix."""
    s = score.detach().float()                                          # >= 0: sorts as score^2 does
    flat = s if scope == "row" else s.reshape(*s.shape[:-2], 1, -1)     # [..., rows, n]
    a2 = ascending(flat).double().square()
    cum = a2.cumsum(-1).reshape(-1, flat.shape[-1]).sum(0)                # [n] over all rows
    cum = torch.cat([cum.new_zeros(1), cum])
    k = torch.tensor([pruned_count(flat.shape[-1], float(s)) for s in grid])
    rows = flat.numel() // flat.shape[-1]
    return cum[k], (k * rows).double(), float(cum[-1])


def budget(curves: list[torch.Tensor], pruned: list[torch.Tensor], sizes: list[int], target: float,
           lo: float, hi: float) -> list[float]:
    """Per-layer sparsities minimising sum_l E_l(s_l) with sum_l n_l s_l = target sum n_l.

    curves[l] [K] is E_l on the grid lo .. hi (K points, both ends included), pruned[l]
    [K] the weights pruned there. Every layer starts at lo; the steps between grid
    points are taken cheapest first by their cost per pruned weight (made monotone per
    layer, a no-op on curves from sorted scores), the last one in part."""
    n = torch.tensor(sizes, dtype=torch.float64)
    need = target * float(n.sum()) - lo * float(n.sum())            # weights to prune beyond lo everywhere
    steps = []                                                       # (cost per weight, layer, weights, k)
    K = len(curves[0])
    for l, (E, P) in enumerate(zip(curves, pruned)):
        dw = (P[1:] - P[:-1]).clamp(min=1e-12)
        cost = torch.cummax((E[1:] - E[:-1]) / dw, dim=0).values
        # a step's size in the budget's units: its share of the layer's sparsity range
        share = (hi - lo) / (K - 1) * float(n[l])
        steps += [(float(cost[k]), l, share, k) for k in range(K - 1)]
    steps.sort(key=lambda t: (t[0], t[3]))
    s = torch.full((len(curves),), lo, dtype=torch.float64)
    for cost, l, share, k in steps:
        if need <= 0:
            break
        take = min(share, need)
        s[l] += take / float(n[l])
        need -= take
    return s.tolist()
