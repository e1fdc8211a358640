"""The experts of one fused MoE projection as one batched layer.

An `ExpertLayer` holds W [E, out, in], one slice per expert, with that projection's
ExpertStats. A pass runs on the experts it targets (its `targets` / `ignore` read the
per-expert names ``<experts>.<e>.<proj>``):

- batched, when the pass's function takes a leading expert dimension (`batched = True`:
  magnitude, Wanda, SparseGPT, quant): one call for all of them, with batched Cholesky
  factors and one column loop over [E, out, in];
- otherwise once per expert, on views of its slice.

An expert that saw fewer than `min_tokens` calibration tokens is compressed data-free
(`ExpertStats.data_free`: magnitude for the pruning passes, RTN for quant), with a
warning that names it.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from compress.passes.base import Layer, PassConfig, pass_fn

log = logging.getLogger(__name__)


@dataclass
class ExpertLayer(Layer):
    """Layer with a leading expert dimension: W, W_dense [E, out, in]; stats an
    ExpertStats; `packed` a list of E results (None where an expert is not packed);
    `infos` the per-expert report notes."""

    names: list = field(default_factory=list)
    infos: list = field(default_factory=list)

    def __post_init__(self):
        self.infos = self.infos or [{} for _ in self.names]

    def take(self, idx: list) -> "ExpertLayer":
        sub = ExpertLayer(self.name, self.W[idx], self.W_dense[idx], None if self.stats is None else self.stats.take(idx),
                          names=[self.names[k] for k in idx])
        sub.nm = self.nm
        return sub

    def one(self, k: int) -> Layer:
        """Expert k as a plain Layer on views of its slices."""
        one = Layer(self.names[k], self.W[k], self.W_dense[k], None if self.stats is None else self.stats[k])
        one.nm = self.nm
        return one

    def put(self, idx: list, sub: "ExpertLayer") -> None:
        """Write what a pass did on `sub` (experts idx) back."""
        self.W[idx] = sub.W
        self.nm = sub.nm or self.nm
        for j, k in enumerate(idx):
            self.infos[k].update(sub.infos[j])
            if sub.packed is not None and sub.packed[j] is not None:
                self.set_packed(k, sub.packed[j])

    def set_packed(self, k: int, result) -> None:
        """Expert k's packing result."""
        self.packed = self.packed or [None] * len(self.names)
        self.packed[k] = result


def looped() -> bool:
    """COMPRESS_MOE_LOOP=1 runs every pass once per expert (the benchmark's reference)."""
    return os.environ.get("COMPRESS_MOE_LOOP") == "1"


@torch.no_grad()
def run_on_experts(layer: ExpertLayer, cfg: PassConfig, min_tokens: int) -> None:
    """Run pass `cfg` on the experts of `layer` it targets (module docstring)."""
    idx = [k for k, n in enumerate(layer.names) if cfg.applies_to(n)]
    if not idx:
        return
    sub = layer if len(idx) == len(layer.names) else layer.take(idx)
    real = sub.stats
    if real is not None and cfg.needs_stats:
        rare = real.n < min_tokens
        for j in rare.nonzero().flatten().tolist():
            log.warning("%s saw %d calibration tokens (< runner.moe_min_tokens = %d): %s compresses it data-free "
                        "(%s)", sub.names[j], int(real.n[j]), min_tokens, cfg.name,
                        "RTN" if cfg.name == "quant" else "magnitude")
            sub.infos[j]["data_free"] = True
        if rare.any():
            sub.stats = real.data_free(rare)
    if getattr(cfg, "batched", False) and not looped():
        sub.info = {}
        pass_fn(cfg)(sub, cfg)
        _split_info(sub)
    else:
        for j in range(len(sub.names)):
            one = sub.one(j)
            pass_fn(cfg)(one, cfg)
            sub.W[j] = one.W   # a pass may replace layer.W rather than edit the view
            sub.nm = one.nm or sub.nm
            sub.infos[j].update(one.info)
            if one.packed is not None:
                sub.set_packed(j, one.packed)
    sub.stats = real
    if not torch.isfinite(sub.W).all():
        raise FloatingPointError(f"{layer.name}: non-finite weights after pass {cfg.name}")
    if sub is not layer:
        layer.put(idx, sub)


def _split_info(sub: ExpertLayer) -> None:
    """A batched pass's notes: a list with one entry per expert is split among them."""
    for k, v in sub.info.items():
        for j, info in enumerate(sub.infos):
            info[k] = v[j] if isinstance(v, list) and len(v) == len(sub.names) else v
    sub.info = {}


def expert_rows(layer: ExpertLayer, sweep: list[PassConfig]) -> list[dict]:
    """One report row per expert some pass of the sweep targeted."""
    rel: Optional[list] = layer.stats.relative_error(layer.W_dense, layer.W) if layer.stats is not None else None
    rows = []
    for k, n in enumerate(layer.names):
        passes = [c.name for c in sweep if c.applies_to(n)]
        if not passes:
            continue
        row = {"layer": n, "passes": passes, "shape": list(layer.W.shape[1:]),
               "sparsity": float((layer.W[k] == 0).float().mean()), "rel_error": None if rel is None else rel[k]}
        if layer.stats is not None:
            row["tokens"] = int(layer.stats.n[k])
        rows.append({**row, **layer.infos[k]})
    return rows
