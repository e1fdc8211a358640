"""Magnitude pruning: drop the weights of smallest |W_ij|.

The baseline every pruning paper compares against (e.g. Han et al., 2015). It needs no
calibration data, so a sweep of magnitude passes alone skips the statistics forward.
"""
from __future__ import annotations

from dataclasses import dataclass

from compress.passes.base import Layer, register
from compress.passes.sparsity import SparsityConfig, prune_by_score


@dataclass
class MagnitudeConfig(SparsityConfig):
    """sparsity / pattern / scope as in `SparsityConfig`."""

    needs_stats = False
    batched = True


Magnitude = MagnitudeConfig


@register("magnitude", MagnitudeConfig)
def magnitude(layer: Layer, cfg: MagnitudeConfig) -> None:
    # score S_ij = |W_ij|; weights already zero (an earlier pass) score 0 and go first.
    keep = prune_by_score(layer.W.abs(), cfg, layer)
    layer.W.mul_(keep)
