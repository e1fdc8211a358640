"""What the pruning passes share (magnitude, Wanda, SparseGPT): the pattern rules, the
per-layer sparsity of a non-uniform allocation, and the mask a score implies. The mask
math itself is compress.masks; the allocations' math is compress.allocation.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from compress.errors import CompressError
from compress.masks import check_nm_fits, nm_mask, topk_mask
from compress.passes.base import Layer, PassConfig

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
ALLOCATIONS = ("uniform", "owl", "budget")


def parse_pattern(pattern: str, field_name: str) -> Optional[tuple[int, int]]:
    """'unstructured' -> None; 'N:M' -> (N, M): keep at most N of every M consecutive
    inputs (NVIDIA's convention: 2:4 keeps 2 of 4)."""
    if pattern == "unstructured":
        return None
    m = _NM.match(str(pattern))
    if not m or not (0 < int(m.group(1)) < int(m.group(2))):
        raise CompressError(f"{field_name}: expected 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4'), got {pattern!r}")
    return int(m.group(1)), int(m.group(2))


def _number(cfg, key: str, lo: float, hi: float, hi_open: bool = True) -> None:
    v = getattr(cfg, key)
    bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v and (v < hi if hi_open else v <= hi))
    if bad:
        raise CompressError(f"{cfg.name}.{key}: expected a number in [{lo:g}, {hi:g}{')' if hi_open else ']'}, got {v!r}")


@dataclass
class SparsityConfig(PassConfig):
    """Shared fields of the pruning passes.

    sparsity    fraction of weights set to zero, in [0, 1); with an N:M pattern it is
                1 - N/M and may be left out. With a non-uniform allocation, the mean
                over all pruned weights.
    pattern     'unstructured' or 'N:M' (keep N of every M consecutive inputs).
    scope       'row' ranks weights within each output row (Wanda's comparison group),
                'layer' ranks the whole matrix at once (unstructured only: an N:M
                pattern always ranks within its groups of M inputs of a row). Left out:
                the pass's own default (`default_scope`).
    allocation  'uniform' (every layer `sparsity`), 'owl' (per block, by outlier ratio:
                Yin et al. 2024) or 'budget' (per layer, least estimated output error;
                compress.allocation). Both measure the dense model in one cheap sweep
                before block 0 is pruned; unstructured patterns only.
    owl_m, owl_lambda  OWL's M (outlier threshold, times the block's mean score) and
                lambda (block sparsities span target +- lambda); the paper's LLaMA values
    budget_spread  with 'budget', every layer's sparsity stays within target +- this
    budget_weight  'influence': each layer's error counts times its block's influence
                ||h_out - h_in||^2 / ||h_out||^2 (how much of the residual stream the
                block rewrites); 'none': relative errors count alike
    survey_samples  calibration samples the survey reads (the first ones; null: all).
                On SmolLM2 the OWL allocations from 16, 24 and 32 samples all lie
                within 0.0044 of the one from all 128, while the survey's forward costs
                ~1/14 of a Wanda run per 16 samples (all 128: about half of one)"""

    sparsity: Optional[float] = None
    pattern: str = "unstructured"
    scope: Optional[str] = None
    allocation: str = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    budget_spread: float = 0.2
    budget_weight: str = "influence"
    survey_samples: Optional[int] = 16

    default_scope = "row"   # class-level: the scope when the recipe sets none

    def __post_init__(self):
        # {layer or block name: sparsity} a non-uniform allocation set (compress.survey);
        # per instance, not a YAML field
        self.allocated: dict = {}

    def validate(self) -> None:
        super().validate()
        nm = parse_pattern(self.pattern, f"{self.name}.pattern")
        if self.sparsity is not None:
            _number(self, "sparsity", 0, 1)
            if nm and abs(self.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
                raise CompressError(
                    f"{self.name}.sparsity: pattern {self.pattern} fixes sparsity at {1 - nm[0] / nm[1]:g}, got {self.sparsity}")
        if self.scope is not None and self.scope not in ("row", "layer"):
            raise CompressError(f"{self.name}.scope: expected 'row' or 'layer', got {self.scope!r}")
        if nm and self.scope == "layer":
            raise CompressError(f"{self.name}.scope: pattern {self.pattern} ranks within groups of {nm[1]} inputs "
                                f"of a row; scope 'layer' is for unstructured sparsity only")
        if self.allocation not in ALLOCATIONS:
            raise CompressError(f"{self.name}.allocation: expected one of {', '.join(ALLOCATIONS)}, "
                                f"got {self.allocation!r}")
        if nm and self.allocation != "uniform":
            raise CompressError(f"{self.name}.allocation: pattern {self.pattern} fixes every layer's sparsity at "
                                f"{1 - nm[0] / nm[1]:g}; allocation '{self.allocation}' needs an unstructured pattern")
        _number(self, "owl_m", 0, float("inf"))
        _number(self, "owl_lambda", 0, 0.5)
        _number(self, "budget_spread", 0, 1)
        if self.budget_weight not in ("influence", "none"):
            raise CompressError(f"{self.name}.budget_weight: expected 'influence' or 'none', got {self.budget_weight!r}")
        n = self.survey_samples
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise CompressError(f"{self.name}.survey_samples: expected a positive integer or null (all), got {n!r}")

    def to_dict(self) -> dict:
        return {**super().to_dict(), "scope": self.rank_scope}   # the resolved recipe names the scope used

    @property
    def nm(self) -> Optional[tuple[int, int]]:
        return parse_pattern(self.pattern, f"{self.name}.pattern")

    @property
    def rank_scope(self) -> str:
        """The scope pruning ranks in: the recipe's, else the pass's default; 'row' for
        an N:M pattern, whose groups lie within a row."""
        return "row" if self.nm else self.scope or self.default_scope

    def check_layer(self, name: str, out: int, d_in: int) -> None:
        if self.nm:
            check_nm_fits(name, d_in, self.nm)

    @property
    def target_sparsity(self) -> float:
        """The mean sparsity the pass aims at."""
        nm = self.nm
        if nm:
            return 1 - nm[0] / nm[1]
        return 0.5 if self.sparsity is None else float(self.sparsity)

    def sparsity_for(self, name: str) -> float:
        """The sparsity of layer `name`: its allocated one (by its own name, else by the
        block it is in), else the target."""
        if not self.allocated:
            if self.allocation != "uniform":
                raise CompressError(f"{self.name}.allocation: '{self.allocation}' was not computed for this run "
                                    f"(compress.run computes it before the sweep)")
            return self.target_sparsity
        if name in self.allocated:
            return self.allocated[name]
        block = max((k for k in self.allocated if name.startswith(k + ".")), key=len, default=None)
        if block is None:
            raise CompressError(f"{self.name}.allocation: no sparsity was allocated to {name}")
        return self.allocated[block]


def prune_by_score(score: torch.Tensor, cfg: SparsityConfig, layer: Layer) -> torch.Tensor:
    """The mask a score implies under the config's pattern (recorded in `layer.nm`) and
    the layer's sparsity. score [out, in], or [E, out, in] for a batch of experts."""
    nm = cfg.nm
    if nm:
        check_nm_fits(layer.name, score.shape[-1], nm)
        layer.nm = nm
        return nm_mask(score, *nm)
    return topk_mask(score, cfg.sparsity_for(layer.name), cfg.rank_scope)
