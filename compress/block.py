"""One decoder block's compression: the runner hands it a block on the device and that
block's calibration inputs; this module does the rest for that block.

1. `collect_stats` (compress.collect): one forward over the calibration batches with
   hooks that accumulate the statistics of each *distinct* linear input.
2. The sweep is cut into `segments` after every block pass, so that passes run in
   recipe order. Each segment runs its layer passes on fresh statistics of the block as
   it then stands (`_layer_stage`), then its block pass (GQSA's BQPO, PERP reconstruct),
   which gets a `BlockContext` whose `forward(k)` replays calibration batch k.
3. `finish_linear` writes each layer's final weight and makes its report row.

    hidden [batch, seq, d_model] per calibration batch
"""
from __future__ import annotations

import logging
import re
import time
from typing import Optional

import torch
from torch import nn

from compress.batch import ExpertLayer, expert_rows, run_on_experts
from compress.capture import BlockInput, forward_block
from compress.collect import MoEOptions, collect_stats, input_groups
from compress.errors import CompressError
from compress.experts import ExpertLinear
from compress.models import serving_groups, set_weight
from compress.parallel import compress_layers
from compress.passes.base import BLOCK_FNS, BlockContext, Layer, PassConfig, pass_fn
from compress.stats import InputStats

log = logging.getLogger(__name__)


@torch.no_grad()
def compress_linear(layer: Layer, module: nn.Module, stats: Optional[InputStats], cfgs: list[PassConfig],
                    moe: Optional[MoEOptions] = None) -> None:
    """Run the layer passes `cfgs` that target this layer on its fp32 working weight
    layer.W [out, in] ([E, out, in] for fused experts, compress.batch); the module gets
    the result (in its compute dtype) at once, for the statistics and forwards that
    follow."""
    layer.stats = stats if stats is not None else layer.stats
    t0 = time.perf_counter()
    for cfg in cfgs:
        if isinstance(layer, ExpertLayer):
            run_on_experts(layer, cfg, (moe or MoEOptions()).min_tokens)
        elif cfg.applies_to(layer.name):
            pass_fn(cfg)(layer, cfg)
            if not torch.isfinite(layer.W).all():
                raise FloatingPointError(f"{layer.name}: non-finite weights after pass {cfg.name}")
    layer.info["seconds"] = round(layer.info.get("seconds", 0.0) + time.perf_counter() - t0, 4)
    set_weight(module, layer.W)


def finish_linear(layer: Layer, module: nn.Module, master: torch.Tensor, sweep: list[PassConfig]) -> dict:
    """Write the layer's final weight to its master and module; return its report row.
    A packed layer must compute exactly what the block was propagated with: its
    dequantized weight is checked against layer.W."""
    if isinstance(layer, ExpertLayer):
        for k, p in enumerate(layer.packed or []):
            if p is not None and not torch.equal(p.dequantize().float(), layer.W[k]):
                raise RuntimeError(f"{layer.names[k]}: the packed weight differs from the weight the block was "
                                   f"calibrated and propagated with")
        master.copy_(layer.W)
        set_weight(module, layer.W)
        return expert_rows(layer, sweep)
    if layer.packed is not None and not torch.equal(layer.packed.dequantize().float(), layer.W):
        raise RuntimeError(f"{layer.name}: the packed weight differs from the weight the block was calibrated "
                           f"and propagated with (a pass changed the weight after packing it)")
    master.copy_(layer.W)
    set_weight(module, layer.W)
    rel = layer.stats.relative_error(layer.W_dense, layer.W) if layer.stats is not None else None
    return {"layer": layer.name, "passes": [c.name for c in sweep if c.applies_to(layer.name)],
            "shape": list(master.shape), "sparsity": float((layer.W == 0).float().mean()), "rel_error": rel,
            **layer.info}


def segments(sweep: list[PassConfig]) -> list[list[PassConfig]]:
    """The sweep cut after every pass with a block function, so that passes run in
    recipe order: [wanda, perp(reconstruct), quant] -> [[wanda, perp], [quant]]. Each
    segment runs its layer passes, then its last pass's block function (GQSA's one-shot
    layer stage is followed by its own BQPO in the same segment)."""
    out: list[list[PassConfig]] = [[]]
    for cfg in sweep:
        out[-1].append(cfg)
        if cfg.name in BLOCK_FNS:
            out.append([])
    return [seg for seg in out if seg]


def hits(name: str, module, cfg: PassConfig) -> bool:
    """Whether `cfg` targets the layer (for fused experts: one of its experts)."""
    if isinstance(module, ExpertLinear):
        return any(cfg.applies_to(n) for n in module.names)
    return cfg.applies_to(name)


def _targeted(linears: dict, cfgs: list[PassConfig]) -> dict:
    """The linears {name: module} that at least one of `cfgs` targets."""
    return {n: m for n, m in linears.items() if any(hits(n, m, c) for c in cfgs)}


def _stats_forward(cfgs: list[PassConfig], mine: dict) -> bool:
    """Whether the layer stage of `cfgs` (targeting `mine`) runs a statistics forward."""
    return bool(mine) and any(c.needs_stats for c in cfgs)


@torch.no_grad()
def _layer_stage(block, linears: dict, layers: dict, cfgs: list[PassConfig], inputs: list[BlockInput], device,
                 true_sequential: bool, targets: Optional[list] = None, act_device=None,
                 moe: Optional[MoEOptions] = None) -> None:
    """Statistics of the block as it stands, then the layer passes `cfgs` on `layers`.
    With `targets` (a list), the first statistics forward also appends the block's
    outputs to it (the dense block's, for block passes)."""
    mine = _targeted(linears, cfgs)
    want_xtx = any(c.needs_xtx for c in cfgs)
    moe = moe or MoEOptions()
    for group in serving_groups([n for n in mine if not isinstance(layers[n], ExpertLayer)]):
        absmax = max(float(layers[n].W.abs().max()) for n in group)
        for n in group:
            layers[n].fused_absmax = absmax

    def run(sub: dict, stats: Optional[dict]) -> None:   # in a distributed run, each rank its share
        compress_layers(layers, sub, stats, cfgs, lambda *a: compress_linear(*a, moe), moe.min_tokens)

    if not _stats_forward(cfgs, mine):
        run(mine, None)
    elif not true_sequential:
        stats = collect_stats(block, mine, inputs, want_xtx, device, outputs=targets, act_device=act_device, moe=moe)
        _check_observed(mine, stats)
        run(mine, stats)
    else:
        # true_sequential: re-collect statistics before each group of layers that share
        # an input, so that o_proj calibrates on the output of the compressed q/k/v.
        first = collect_stats(block, mine, inputs, False, device, max_batches=1, moe=moe)
        _check_observed(mine, first)
        for group in input_groups(first):   # never empty: each holds the layer that owns its stats
            sub = {n: linears[n] for n in group}
            run(sub, collect_stats(block, sub, inputs, want_xtx, device, moe=moe))


@torch.no_grad()
def compress_block(block, linears: dict, masters: dict, inputs: list[BlockInput], sweep: list[PassConfig],
                   device, true_sequential: bool, act_device=None, dtype=None,
                   moe: Optional[MoEOptions] = None, params: Optional[dict] = None) -> tuple[list[dict], dict]:
    """Statistics, layer passes, block passes (in recipe order, `segments`) and report
    rows for one block (already on `device`). linears {qualified name: module} are the
    targeted layers, masters their fp32 weights [out, in]; params the fp32 copies of the
    block's parameters the caller restores after reduced-precision forwards (block
    passes write a changed norm there: BlockContext.masters). Returns (report rows,
    {name: packed result} of packing passes)."""
    layers = {n: ExpertLayer(n, masters[n].clone(), masters[n].clone(), None, names=m.names)
              if isinstance(m, ExpertLinear) else Layer(n, masters[n].clone(), masters[n].clone(), None)
              for n, m in linears.items()}
    parts = segments(sweep)
    targets = None   # the dense block's outputs, for block passes
    share = False    # whether the first statistics forward records them
    if any(c.trains_blocks for c in sweep):
        targets = []
        share = not true_sequential and _stats_forward(parts[0], _targeted(linears, parts[0]))
        if not share:
            targets += [forward_block(block, inp, device).to(act_device) for inp in inputs]
    for k, seg in enumerate(parts):
        _layer_stage(block, linears, layers, seg, inputs, device, true_sequential,
                     targets if share and k == 0 else None, act_device, moe)
        cfg = seg[-1]
        mine = _block_targets(linears, cfg)
        if cfg.name in BLOCK_FNS and mine:
            ctx = BlockContext(block, {n: layers[n] for n in mine}, mine, targets, device, dtype,
                               forward=lambda b: forward_block(block, inputs[b], device), masters=params)
            BLOCK_FNS[cfg.name](ctx, cfg)
            for n in mine:   # what later segments and the propagation see
                set_weight(linears[n], layers[n].W)
    rows = []
    for n, m in linears.items():
        row = finish_linear(layers[n], m, masters[n], sweep)
        rows += row if isinstance(row, list) else [row]
    return rows, {n: L.packed for n, L in layers.items() if L.packed is not None}


def _block_targets(linears: dict, cfg: PassConfig) -> dict:
    """The linears a block pass trains. Fused experts have no module of their own to
    train through: they keep what the layer passes made of them, said once per block."""
    mine = _targeted(linears, [cfg])
    experts = [n for n, m in mine.items() if isinstance(m, ExpertLinear)]
    if experts and cfg.name in BLOCK_FNS:
        log.warning("%s: the block stage of %s trains the linear layers only; the fused experts %s keep its layer "
                    "stage", experts[0].rsplit(".", 2)[0], cfg.name, ", ".join(e.rsplit(".", 1)[1] for e in experts))
    return {n: m for n, m in mine.items() if not isinstance(m, ExpertLinear)}


def _check_observed(linears: dict, stats: dict) -> None:
    """Every targeted linear must have been called as a module in the statistics forward.
    One whose weight the model reads directly (Jamba's mamba.dt_proj) has no inputs to
    observe, and a packed replacement would break that forward: refused, naming it."""
    for n in linears:
        if n not in stats:
            rel = re.sub(r"^.*?\.\d+\.", "", n)   # the name inside the block
            raise CompressError(f"model: {n} is never called as a layer (the model reads its weight directly), so "
                                f"its inputs cannot be observed; add '{re.escape(rel)}' to the passes' ignore")
