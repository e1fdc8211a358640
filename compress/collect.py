"""The statistics forward of one block: hooks on its linears accumulate the statistics
of each *distinct* input (q/k/v read one tensor: one InputStats, one X^T X), fused
experts get batched ExpertStats from an observer of their module (compress.routing),
and a distributed run sums them over the ranks.

    hidden [batch, seq, d_model] per calibration batch
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from compress.capture import BlockInput, forward_block
from compress.experts import ExpertLinear
from compress.parallel import reduce_stats
from compress.routing import ExpertsObserver
from compress.stats import InputStats


@dataclass
class MoEOptions:
    """runner.moe_calibration: 'all' (every expert's statistics from every token) or
    'routed' (from the tokens routed to it); runner.moe_min_tokens: experts that saw
    fewer tokens are compressed data-free (compress.batch)."""

    calibration: str = "all"
    min_tokens: int = 16


class _Enough(Exception):
    """The last hooked linear's input is in: the rest of the block's forward is not needed."""


class _InputHooks:
    """Forward pre-hooks on linears: each distinct input tensor's InputStats (a twin that
    reads the very same tensor, as k/v beside q, shares its owner's)."""

    def __init__(self, want_xtx: bool):
        self.want_xtx = want_xtx
        self.stats: dict[str, InputStats] = {}
        self.owner: dict[str, str] = {}
        self.seen: list[tuple[torch.Tensor, str]] = []   # first batch only: (input tensor, its owner)
        self.order: Optional[list[str]] = []             # hook calls of the first batch (None after it)
        self.stop: Optional[str] = None                  # from the second batch: the linear to stop at

    def hook(self, name: str):
        def pre_hook(module, args):   # before the module runs: its input is all a statistic reads
            x = args[0]
            if name not in self.owner:
                twin = next((o for t, o in self.seen if t is x), None)
                self.owner[name] = twin or name
                if twin is None:
                    self.stats[name] = InputStats(x.shape[-1], self.want_xtx, x.device)
                    self.seen.append((x, name))
                else:
                    self.stats[name] = self.stats[twin]
            if self.owner[name] == name:
                self.stats[name].update(x)
                # A NaN or inf in x makes its fp64 running sum non-finite for good (finite
                # activations cannot overflow it): one check of [d_in] values, not of every
                # activation (that cost ~6 % of a GPTQ run on SmolLM2).
                if not torch.isfinite(self.stats[name].sum).all():
                    raise FloatingPointError(f"non-finite activations at the input of {name}")
            if self.order is not None:
                self.order.append(name)
            if name == self.stop:
                raise _Enough
        return pre_hook


@torch.no_grad()
def collect_stats(block, linears: dict, inputs: list[BlockInput], want_xtx: bool, device,
                  max_batches: Optional[int] = None, outputs: Optional[list] = None,
                  act_device=None, moe: Optional[MoEOptions] = None) -> dict[str, InputStats]:
    """One forward over the calibration batches with hooks on `linears`.

    Layers that read the very same tensor (q/k/v, gate/up) share one InputStats, so
    their X^T X is accumulated once. Returns {layer name: stats}; iteration order is
    the order in which the distinct inputs were first seen (execution order). With
    `outputs` (a list), the block's outputs are appended to it (on `act_device`).
    Fused experts (ExpertLinear) get batched ExpertStats from an observer of their
    module (compress.routing); they follow the linears in the order."""
    hooks = _InputHooks(want_xtx)
    handles = [m.register_forward_pre_hook(hooks.hook(n)) for n, m in linears.items() if not isinstance(m, ExpertLinear)]
    observers = _observers(linears, want_xtx, moe or MoEOptions(), device)
    handles += [ob.ex.module.register_forward_hook(ob.hook, with_kwargs=True) for ob in observers]
    try:
        for k, inp in enumerate(inputs[:max_batches]):
            try:
                out = forward_block(block, inp, device)
            except _Enough:
                pass
            if outputs is not None:
                outputs.append(out.to(act_device or out.device))
            hooks.seen.clear()  # drop references to the first batch's activations
            # Every hooked linear read once, in the block's fixed order, and no output
            # wanted: later batches stop at the last one's input. What follows it (on a
            # dense block the down projection and the residual, ~1/4 of its FLOPs) feeds
            # no statistic. Routed experts or a linear called twice keep the whole forward.
            if k == 0 and outputs is None and not observers and sorted(hooks.order) == sorted(linears):
                hooks.stop = hooks.order[-1]
            hooks.order = None
    finally:
        for h in handles:
            h.remove()
    stats = hooks.stats
    for ob in observers:
        for p, st in ob.stats.items():
            stats[f"{ob.ex.name}.{p.name}"] = st
    reduce_stats(stats)   # a distributed run: every rank saw its own shard of the samples
    return stats


def _observers(linears: dict, want_xtx: bool, moe: MoEOptions, device) -> list[ExpertsObserver]:
    """One observer per experts module among `linears`, for the projections listed."""
    by: dict[int, list] = {}
    for m in linears.values():
        if isinstance(m, ExpertLinear):
            by.setdefault(id(m.ex), []).append(m)
    return [ExpertsObserver(ms[0].ex, [m.proj for m in ms], want_xtx, moe.calibration, device) for ms in by.values()]


def input_groups(stats: dict[str, InputStats]) -> list[list[str]]:
    """Layers grouped by shared input, in execution order: qkv -> o -> gate/up -> down."""
    groups: dict[int, list[str]] = {}
    for name, s in stats.items():
        groups.setdefault(id(s), []).append(name)
    return list(groups.values())
