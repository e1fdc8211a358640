"""The allocation survey: one cheap sweep over the *dense* model that measures what a
non-uniform sparsity allocation needs (compress.allocation), before block 0 is pruned.

Each block runs once on its calibration inputs with hooks that collect its linears'
input norms ||X_j||_2 (no XᵀX), on the first `survey_samples` samples; that same
forward's outputs are the next block's inputs (dense propagation, no second forward).
From the Wanda scores A = |W| ||X|| of the layers each pruning pass targets, it keeps a few numbers per block (OWL: the outlier
count) or per layer (budget: the error curve on a grid of sparsities), never the
scores, so its memory is one block's. The allocation is then solved for the whole model
and set on the pass configs (`SparsityConfig.allocated`).
"""
from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from compress import allocation, dist
from compress.block import hits
from compress.capture import capture_inputs
from compress.collect import MoEOptions, collect_stats
from compress.models import find_blocks, get_weight
from compress.offload import lazy_of
from compress.runner import _move_all_but, _unreached, resolve, run_in_dtype, targeted_linears

log = logging.getLogger(__name__)
GRID = 41   # budget: points of each layer's error curve over target +- budget_spread


def wants(configs: list) -> list:
    """The pruning configs of a run whose allocation is not uniform."""
    return [c for c in configs if getattr(c, "allocation", "uniform") != "uniform"]


def _grid(cfg) -> torch.Tensor:
    lo = max(0.0, cfg.target_sparsity - cfg.budget_spread)
    hi = min(0.99, cfg.target_sparsity + cfg.budget_spread)
    return torch.linspace(lo, hi, GRID, dtype=torch.float64)


def influence(inputs: list, outputs: list) -> float:
    """mean over tokens of ||h_out - h_in||^2 / ||h_out||^2: how much of the residual
    stream a block rewrites (ShortGPT's block influence, in energy). Per token, because
    the few tokens that carry massive activations would otherwise set every ratio."""
    num, count = 0.0, 0
    for i, o in zip(inputs, outputs):
        o = o.float()
        d = (o - i.hidden.to(o.device).float()).square().sum(-1)      # [batch, seq]
        num += float((d / o.square().sum(-1).clamp(min=1e-30)).sum())
        count += d.numel()
    return num / max(count, 1)


def _measure(cfg, block_name: str, layers: dict, stats: dict, weight: float) -> dict:
    """One config's numbers for one block from its targeted layers {name: module};
    `weight` the block's influence."""
    scores = {}
    for n, m in layers.items():
        W = get_weight(m).detach().float()                       # [out, in] or [E, out, in]
        scores[n] = W.abs() * stats[n].norm.to(W.device).float().unsqueeze(-2)   # A_ij = |W_ij| ||X_j||
    sizes = {n: a.numel() for n, a in scores.items()}
    if cfg.allocation == "owl":
        count, total = allocation.outlier_count(list(scores.values()), cfg.owl_m)
        return {"block": block_name, "outliers": count, "n": total}
    grid = _grid(cfg)
    curves = {n: allocation.error_curve(a, grid, cfg.rank_scope) for n, a in scores.items()}
    names = {n: getattr(m, "names", []) for n, m in layers.items()}   # fused experts: each expert's name
    return {"block": block_name, "curves": curves, "sizes": sizes, "names": names, "influence": weight}


def _solve(cfg, measured: list[dict]) -> dict:
    """Set cfg.allocated from the per-block measurements; the report section."""
    S = cfg.target_sparsity
    if cfg.allocation == "owl":
        ratios = [m["outliers"] / m["n"] for m in measured]
        s = allocation.owl(ratios, [m["n"] for m in measured], S, cfg.owl_lambda)
        cfg.allocated = {m["block"]: v for m, v in zip(measured, s)}
        return {"method": "owl", "owl_m": cfg.owl_m, "owl_lambda": cfg.owl_lambda,
                "blocks": {m["block"]: {"sparsity": v, "outlier_ratio": r} for m, v, r in zip(measured, s, ratios)}}
    layers = [(n, m) for m in measured for n in m["curves"]]
    curves = [m["curves"][n] for n, m in layers]
    weight = [m["influence"] if cfg.budget_weight == "influence" else 1.0 for _, m in layers]
    s = allocation.budget([w * c[0] / max(c[2], 1e-300) for w, c in zip(weight, curves)], [c[1] for c in curves],
                          [m["sizes"][n] for n, m in layers], S, float(_grid(cfg)[0]), float(_grid(cfg)[-1]))
    cfg.allocated = {}
    for (n, m), v in zip(layers, s):
        cfg.allocated[n] = v
        cfg.allocated.update({e: v for e in m["names"][n]})
    def share(m: dict) -> float:   # a block's sparsity: its layers' allocations weighted by their sizes
        return sum(cfg.allocated[n] * k for n, k in m["sizes"].items()) / sum(m["sizes"].values())

    blocks = {m["block"]: {"sparsity": share(m), "influence": m["influence"]} for m in measured}
    return {"method": "budget", "budget_spread": cfg.budget_spread, "budget_weight": cfg.budget_weight,
            "blocks": blocks,
            "layers": dict(cfg.allocated)}   # fused experts: each expert by its own name too


@torch.no_grad()
def survey(model, configs: list, ids: torch.Tensor, *, device=None, batch_size: int = 8, compute_dtype=None,
           moe: MoEOptions = None) -> dict:
    """Measure the dense model and set the allocation of every config in `wants(configs)`.
    Returns the report section {"<index>.<pass>": {...}}, empty when all are uniform."""
    todo = wants(configs)
    if not todo:
        return {}
    device, dtype = resolve(device, compute_dtype, model)
    prefix, blocks = find_blocks(model)
    home = next(model.parameters()).device
    _move_all_but(model, blocks, device)
    wanted = [c.survey_samples for c in todo]
    ids = ids if None in wanted else ids[:max(wanted)]
    calib = capture_inputs(model, blocks, ids[dist.shard(ids.shape[0])], batch_size, device, device, dtype)
    lazy = lazy_of(model)
    measured: list[list] = [[] for _ in todo]
    for i in tqdm(range(len(blocks)), desc="allocation survey", unit="block"):
        if lazy is not None:
            lazy.load(i)
        block = blocks[i].to(device)
        name = f"{prefix}.{i}"
        linears = targeted_linears(block, name, todo)
        if not _unreached(calib, i, block, prefix, linears):
            inputs, outs = calib.block(i), []
            with run_in_dtype(block, dtype):
                stats = collect_stats(block, linears, inputs, False, device, outputs=outs, act_device=device, moe=moe)
            weight = influence(inputs, outs) if any(c.allocation == "budget" for c in todo) else 1.0
            calib.hidden = outs
            for k, cfg in enumerate(todo):
                mine = {n: m for n, m in linears.items() if hits(n, m, cfg)}
                if mine:
                    measured[k].append(_measure(cfg, name, mine, stats, weight))
        blocks[i].to(home)
        if lazy is not None:
            lazy.release(i)
    _move_all_but(model, blocks, home)
    out = {}
    for k, cfg in enumerate(todo):
        out[f"{configs.index(cfg)}.{cfg.name}"] = _solve(cfg, measured[k])
        log.info("%s: allocation %s, block sparsities %s", cfg.name, cfg.allocation,
                 " ".join(f"{v['sparsity']:.3f}" for v in out[f"{configs.index(cfg)}.{cfg.name}"]["blocks"].values()))
    return out


def restore(configs: list, section: dict) -> None:
    """Set the allocations a resumed run computed before it was interrupted."""
    for k, cfg in enumerate(configs):
        entry = section.get(f"{k}.{cfg.name}")
        if entry is None:
            continue
        cfg.allocated = dict(entry.get("layers") or {b: v["sparsity"] for b, v in entry["blocks"].items()})
