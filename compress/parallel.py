"""One block's layer work across the processes of a distributed run (compress.dist).

Every rank calibrates on its own shard of the samples, so before any pass reads a
statistic it is summed over the ranks (`reduce_stats`). The layers of a layer stage
are then independent given their statistics: each is a unit of work, and so is each
expert of a fused MoE projection (compress.batch runs a rank's experts as one batched
layer). `compress_layers` deals the units to the ranks by cost (compress.dist.assign),
lets every rank compress its own, then broadcasts each result from its owner: the
weight W [out, in] (an expert share [e, out, in]) as a tensor, the packed result, the
report notes and the N:M pattern as one object. Afterwards every rank holds the same
layers, bit for bit, and propagates its shard through the same compressed block.

With one process both functions do what the sequential runner always did.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from compress import dist
from compress.batch import ExpertLayer, run_on_experts
from compress.models import set_weight
from compress.passes.base import Layer, PassConfig
from compress.stats import InputStats


def reduce_stats(stats: dict[str, InputStats]) -> None:
    """Sum every distinct statistics object (shared ones once) over the ranks, in place:
    count, sum, sum of squares, sum of magnitudes and X^T X, for ExpertStats per expert."""
    if not dist.active():
        return
    seen: set = set()
    for s in stats.values():
        if id(s) in seen:
            continue
        seen.add(id(s))
        n = s.n if isinstance(s.n, torch.Tensor) else torch.tensor([s.n], dtype=torch.int64, device=s.sum.device)
        dist.all_sum([t for t in (n, s.sum, s.sumsq, s.abssum, s.xtx) if t is not None])
        s.n = n if isinstance(s.n, torch.Tensor) else int(n)


def _units(layers: dict, names, cfgs: list[PassConfig]) -> dict:
    """{(layer name, expert index or None): estimated cost} of the layers `names`: the
    sum of PassConfig.cost over the passes `cfgs` that target it."""
    def cost(name: str, out: int, d_in: int) -> float:
        return sum(c.cost(out, d_in) for c in cfgs if c.applies_to(name))

    units = {}
    for n in names:
        L = layers[n]
        if isinstance(L, ExpertLayer):
            units.update({(n, k): cost(e, *L.W.shape[1:]) for k, e in enumerate(L.names)})
        else:
            units[(n, None)] = cost(n, *L.W.shape)
    return units


def compress_layers(layers: dict[str, Layer], modules: dict, stats: Optional[dict], cfgs: list[PassConfig],
                    compress_one: Callable, min_tokens: int) -> dict:
    """compress_one(layer, module, stats or None, cfgs) on every layer of `modules`
    {name: module}; in a distributed run each rank does its share (module docstring).
    Returns {unit: rank} (empty in one process)."""
    def st(n):
        return None if stats is None else stats[n]

    if not dist.active():
        for n, m in modules.items():
            compress_one(layers[n], m, st(n), cfgs)
        return {}
    owner = dist.assign(_units(layers, modules, cfgs), dist.world_size())
    me = dist.rank()
    shares: dict = {}   # experts layer name -> {rank: its ExpertLayer share}
    for n, m in modules.items():   # 1. my units
        L = layers[n]
        if not isinstance(L, ExpertLayer):
            if owner[(n, None)] == me:
                compress_one(L, m, st(n), cfgs)
            continue
        L.stats = st(n) if stats is not None else L.stats
        shares[n] = {r: L.take([k for k in range(len(L.names)) if owner[(n, k)] == r])
                     for r in range(dist.world_size())}
        mine = shares[n][me]
        for cfg in cfgs if mine.names else []:
            run_on_experts(mine, cfg, min_tokens)
    for n, m in modules.items():   # 2. everyone's results, in a fixed order
        L = layers[n]
        if isinstance(L, ExpertLayer):
            _gather_experts(L, shares[n], owner, n)
        else:
            L.stats = st(n) if stats is not None else L.stats
            _share(L, owner[(n, None)], n)
        set_weight(m, L.W)
    return owner


def _share(L: Layer, src: int, what: str) -> None:
    """Layer L as rank `src` computed it, on every rank."""
    dist.broadcast_tensor(L.W, src, what)
    got = dist.broadcast_object((L.packed, L.info, L.nm), src, what)
    if dist.rank() != src:
        L.packed, L.info, L.nm = dist.to_device(got[0], L.W.device), got[1], got[2]


def _gather_experts(L: ExpertLayer, shares: dict, owner: dict, name: str) -> None:
    """Every rank's experts of L, written back into L on every rank."""
    for r, sub in shares.items():
        idx = [k for k in range(len(L.names)) if owner[(name, k)] == r]
        if not idx:
            continue
        dist.broadcast_tensor(sub.W, r, f"{name} experts {idx[0]}..{idx[-1]}")
        got = dist.broadcast_object((sub.packed, sub.infos, sub.nm), r, name)
        if dist.rank() != r:
            sub.packed, sub.infos, sub.nm = dist.to_device(got[0], L.W.device), got[1], got[2]
        L.put(idx, sub)
