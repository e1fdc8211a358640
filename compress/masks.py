"""Sparsity masks: which weights of a matrix [out, in] a pruning score keeps.

Tensors in, tensors out: the pruning passes, DSnoT, the quant pass's 2:4 check and
export's N:M checks share these, so they live below all of them. True = kept.
"""
from __future__ import annotations

import torch

from compress.errors import CompressError


def check_nm_fits(layer_name: str, d_in: int, nm: tuple[int, int]) -> None:
    if d_in % nm[1]:
        raise CompressError(f"pattern {nm[0]}:{nm[1]}: layer {layer_name} has input size {d_in}, not a multiple of {nm[1]}")


def follows_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of m consecutive inputs of mask [out, in] (True = kept, or a
    weight: non-zero = kept) keeps at most n."""
    out, d_in = mask.shape
    return d_in % m == 0 and bool(((mask != 0).reshape(out, d_in // m, m).sum(-1) <= n).all())


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest scores in every group of m consecutive inputs.
    score [..., out, in] -> bool mask [..., out, in] (a leading dimension: experts)."""
    groups = score.reshape(*score.shape[:-1], score.shape[-1] // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(score.shape)


def pruned_count(n: int, sparsity: float) -> int:
    """How many of n weights (or groups) a sparsity prunes: the nearest integer to
    n * sparsity, exact halves to the even count (Python's round). Every pass uses this
    one rule; truncating instead would prune 251 of 360 at 0.7, since 360 * 0.7 is
    251.99999999999997 in floating point."""
    return round(n * sparsity)


def topk_mask(score: torch.Tensor, sparsity: float, scope: str) -> torch.Tensor:
    """Prune the lowest `sparsity` fraction of scores per row ('row') or over the whole
    matrix ('layer'), `pruned_count` of them. Ties are broken by index, so exactly that
    count is pruned: the k smallest of a stable sort, found by selection (kthvalue, O(n))
    rather than sorting. score [..., out, in]: a leading dimension (experts) holds
    separate matrices."""
    flat = score if scope == "row" else score.reshape(*score.shape[:-2], -1)   # [..., rows, n]
    k = pruned_count(flat.shape[-1], sparsity)
    if k == 0:
        return torch.ones_like(score, dtype=torch.bool)
    if flat.isnan().any():   # NaN sorts last; selection's order of NaNs is not a sort's
        drop = flat.argsort(dim=-1, stable=True)[..., :k]
        return torch.ones_like(flat, dtype=torch.bool).scatter_(-1, drop, False).reshape(score.shape)
    t = flat.kthvalue(k, dim=-1, keepdim=True).values            # [..., rows, 1] the k-th smallest
    below = flat < t
    tied = flat == t
    need = k - below.sum(-1, keepdim=True)                      # ties to drop, the lowest indices first
    drop = below | (tied & (tied.cumsum(-1) <= need))
    return (~drop).reshape(score.shape)
