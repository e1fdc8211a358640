"""Wanda: Pruning by Weights and activations (Sun et al., 2023, "A Simple and Effective
Pruning Approach for Large Language Models").

Eq. (1) of the paper: the importance of weight W_ij is

    S_ij = |W_ij| * ||X_j||_2

where ||X_j||_2 is the l2 norm of input feature j over all N*L calibration tokens.
Weights are compared within each output row (the paper's "per output" group, Sec. 3);
`scope: layer` compares the whole matrix instead. N:M ranks within groups of M inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

from compress.passes.base import Layer, register
from compress.passes.sparsity import SparsityConfig, prune_by_score


@dataclass
class WandaConfig(SparsityConfig):
    """sparsity / pattern / scope as in `SparsityConfig`."""

    batched = True


Wanda = WandaConfig


@register("wanda", WandaConfig)
def wanda(layer: Layer, cfg: WandaConfig) -> None:
    norm = layer.stats.norm.to(layer.W.device)      # [in]  ||X_j||_2  ([E, in] for experts)
    score = layer.W.abs() * norm.unsqueeze(-2)       # [out, in]  S_ij
    layer.W.mul_(prune_by_score(score, cfg, layer))
