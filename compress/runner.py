"""The sequential runner: the one loop in the repo that walks the decoder blocks.

First capture what the model gives every block (compress.capture: each block its own
masks and rotary tables). Then for each block: put it on the device, compress it on
its own inputs (compress.block: statistics once per distinct linear input, the sweep's
layer and block passes in recipe order), run the *compressed* block to produce the next
block's inputs (so later blocks calibrate on what they will really see), swap in the
runtime modules of packing passes (compress.nn.module_for), and free the block.

    hidden [batch, seq, d_model] per calibration batch, kept on `act_device`
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from compress import dist
from compress.block import compress_block, hits
from compress.capture import CalibInputs, capture_inputs, forward_block
from compress.collect import MoEOptions
from compress.errors import CompressError
from compress.experts import ExpertLinear, expert_linears
from compress.models import block_linears, find_blocks, get_weight, set_weight
from compress.nn import PackedExperts, module_for
from compress.offload import lazy_of
from compress.passes.base import BLOCK_FNS, PassConfig

log = logging.getLogger(__name__)


@contextmanager
def run_in_dtype(block: nn.Module, dtype: torch.dtype):
    """Run `block` in `dtype` (e.g. bf16 forwards on a CPU with native bf16), then put
    its own parameters back exactly. Passes always see fp32 master weights. Yields the
    copies that are put back ({state-dict key: tensor}; None when `dtype` is the block's
    own), where a block pass writes a parameter it changes (BlockContext.masters)."""
    own = next(block.parameters()).dtype
    if dtype == own:
        yield None
        return
    saved = {k: v.clone() for k, v in block.state_dict().items()}
    block.to(dtype)
    try:
        yield saved
    finally:
        block.to(own)
        block.load_state_dict(saved)


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:   # not glibc (macOS, musl): nothing to trim
        return None


def trim_heap() -> None:
    """Hand freed heap memory back to the OS. glibc keeps freed chunks of the per-block
    tensors in its arenas, fragmented, so without this the resident size creeps up by
    about a block's size per block even though nothing is alive (measured: +11 MiB per
    SmolLM2 block); with it the host memory stays flat in the model's depth."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _move_all_but(module: nn.Module, blocks: nn.Module, device) -> None:
    """Move every parameter and buffer outside `blocks` to `device` (embeddings, rotary
    tables, final norm), leaving the blocks where they are."""
    for child in module.children():
        if child is blocks:
            continue
        if any(m is blocks for m in child.modules()):
            _move_all_but(child, blocks, device)
        else:
            child.to(device)
    for p in module.parameters(recurse=False):
        p.data = p.data.to(device)
    for name, b in module.named_buffers(recurse=False):
        setattr(module, name, b.to(device))


def _check_finite(hidden: torch.Tensor, where: str) -> None:
    if not torch.isfinite(hidden).all():
        raise FloatingPointError(f"non-finite activations at the output of {where}")


def fast_dtype(device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype calibration forwards run in by default: bf16 for an fp32 model on a
    CPU with native bf16 matmuls (avx512_bf16 / AMX: several times faster than fp32),
    otherwise the model's own dtype. Statistics and pass math stay in fp32."""
    if device.type == "cpu" and model_dtype == torch.float32 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return model_dtype


def resolve(device, compute_dtype, model) -> tuple[torch.device, torch.dtype]:
    """The device (default: cuda if present; under `accelerate launch` / torchrun each
    process's own GPU, cuda:LOCAL_RANK) and calibration-forward dtype of a run."""
    if device is None and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    device = torch.device(device or "cpu")
    return device, compute_dtype or fast_dtype(device, next(model.parameters()).dtype)


def all_linears(block, prefix: str, sweep: list[PassConfig]) -> dict:
    """{name: module} of a block's linear layers, then {group name: ExpertLinear} of its
    fused experts' projections (experts kept as nn.Linear modules are linears). A fused
    experts module of a layout not understood is refused when the sweep targets it."""
    def refuse(name: str) -> bool:   # would a pass target its experts (named <experts>.<e>.<proj>)?
        return any(c.applies_to(f"{name}.0.down_proj") for c in sweep)

    return {**{f"{prefix}.{n}": m for n, m in block_linears(block).items()}, **expert_linears(block, prefix, refuse)}


def targeted_linears(block, prefix: str, sweep: list[PassConfig]) -> dict:
    return {n: m for n, m in all_linears(block, prefix, sweep).items() if any(hits(n, m, c) for c in sweep)}


def _unreached(calib: CalibInputs, i: int, block, prefix: str, linears: dict) -> bool:
    """Whether block i is one the model never calls on text (Mllama's cross-attention
    layers without an image). Passes cannot calibrate its targeted layers: refused."""
    if not calib or calib.reached[i]:
        return False
    if linears:
        raise CompressError(f"model: {prefix}.{i} ({type(block).__name__}) is never run on text-only calibration, "
                            f"so {next(iter(linears))} cannot be calibrated; add {prefix}.{i}\\. to the passes' ignore")
    return True


@torch.no_grad()
def run_sweep(model, sweep: list[PassConfig], ids: torch.LongTensor, *, device=None, batch_size: int = 8,
              true_sequential: bool = False, act_device=None, compute_dtype=None, state=None,
              stage: int = 0, observe=None, moe: Optional[MoEOptions] = None) -> list[dict]:
    """Apply one sweep of passes to every decoder block, in order: layer passes, then
    block passes; layers a packing pass produced become runtime modules.

    ids [nsamples, seqlen] calibration token ids; compute_dtype: dtype of the
    calibration forwards (None: `fast_dtype`). Each block runs on the arguments the
    model gives that block (compress.capture). With `state` (compress.resume.RunState),
    each finished block is saved as sweep number `stage`, and a sweep that was cut off
    continues after its last saved block. `observe(i, hidden)`, if given, sees the
    propagated hidden states [batch, seq, d] after every block (the last one too).
    Returns per-layer report rows."""
    device, dtype = resolve(device, compute_dtype, model)
    act_device = torch.device(act_device or device)
    prefix, blocks = find_blocks(model)
    home = next(model.parameters()).device
    _move_all_but(model, blocks, device)
    rows: list[dict] = []
    need_inputs = any(c.needs_stats or c.name in BLOCK_FNS for c in sweep) or observe is not None
    mine = ids[dist.shard(ids.shape[0])]   # a distributed run: this rank's samples (compress.dist)
    calib = capture_inputs(model, blocks, mine, batch_size, device, act_device, dtype) if need_inputs else CalibInputs()
    lazy = lazy_of(model)   # offloaded: blocks live on disk until needed (compress.offload)
    if lazy is not None and state is None:
        raise CompressError("runner.offload: an offloaded model needs a run folder (compress.resume.RunState)")
    start = 0 if state is None else state.last_block(stage) + 1
    if start:
        rows += _resume(state, stage, start, model, blocks, prefix, lazy, calib, act_device)
    for i in tqdm(range(start, len(blocks)), desc="blocks", unit="block", initial=start, total=len(blocks)):
        if lazy is not None:
            lazy.load(i)
        block_rows = _sweep_block(model, blocks, i, prefix, sweep, calib, device, act_device, dtype, home,
                                  true_sequential, propagate=i + 1 < len(blocks) or observe is not None, moe=moe)
        rows += block_rows
        if observe is not None and calib:
            observe(i, calib.hidden)
        if state is not None:
            state.block_done(stage, i, blocks[i], prefix, calib.hidden if i + 1 < len(blocks) else [], block_rows)
        if lazy is not None:   # the saved block is its source from now on
            lazy.point(i, *state.block_source(stage, i))
            lazy.release(i)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        trim_heap()
    _move_all_but(model, blocks, home)
    return rows


def _resume(state, stage: int, start: int, model, blocks, prefix: str, lazy, calib: CalibInputs, act_device) -> list:
    """Put back the blocks before `start` that an interrupted sweep finished, and the
    hidden states block `start` reads; their report rows."""
    log.info("resuming sweep %d after block %d", stage, start - 1)
    rows = state.restore_blocks(stage, model, blocks, prefix, start - 1, lazy)
    if calib and start < len(blocks):
        calib.hidden = [h.to(act_device) for h in state.restore_hidden(stage)]
    return rows


def _sweep_block(model, blocks, i: int, prefix: str, sweep: list[PassConfig], calib: CalibInputs, device,
                 act_device, dtype, home, true_sequential: bool, propagate: bool,
                 moe: Optional[MoEOptions] = None) -> list[dict]:
    """Compress block i on its own inputs, propagate the calibration batches through the
    compressed block, put it back on `home` with packed layers swapped in; its rows."""
    block = blocks[i].to(device)
    linears = targeted_linears(block, f"{prefix}.{i}", sweep)
    if _unreached(calib, i, block, prefix, linears):
        blocks[i].to(home)
        return []
    masters = {n: get_weight(m).detach().float().contiguous().clone() for n, m in linears.items()}  # [out, in]
    for n, W in masters.items():
        if not torch.isfinite(W).all():
            raise FloatingPointError(f"{n}: non-finite weights (before any pass)")
    inputs = calib.block(i) if calib else []
    with run_in_dtype(block, dtype if calib else next(block.parameters()).dtype) as params:
        rows, packed = compress_block(block, linears, masters, inputs, sweep, device, true_sequential,
                                      act_device, dtype, moe, params)
        if calib and propagate:   # the next block reads the compressed block's outputs
            for b, inp in enumerate(inputs):   # one batch at a time: the old states are freed as we go
                calib.hidden[b] = forward_block(block, inp, device).to(act_device)
                inp.hidden = None
                _check_finite(calib.hidden[b], f"{prefix}.{i}")
    for n, m in linears.items():
        set_weight(m, masters[n])
    blocks[i].to(home)
    experts: dict = {}
    for n, p in packed.items():  # packing passes: swap in the runtime module (QuantLinear...)
        if isinstance(linears[n], ExpertLinear):   # one runtime module per expert
            mods = [None if r is None else module_for(r) for r in p]
            experts.setdefault(linears[n].ex.name, (linears[n].ex, {}))[1][linears[n].proj] = mods
        else:
            model.set_submodule(n, module_for(p, getattr(linears[n], "bias", None)).to(home))
    for name, (ex, parts) in experts.items():   # fused experts: one PackedExperts per module
        model.set_submodule(name, PackedExperts.pack(ex, parts).to(home))
    return rows


def preflight(model, sweep: list[PassConfig]) -> None:
    """Catch configuration errors before any heavy work: every pass must target at
    least one linear layer and accept each targeted layer's shape (`check_layer`: N:M
    patterns must divide the input, ARMOR's blocks both sides), and a packing pass
    (quant, gqsa, armor) must be the last layer pass on its layers."""
    prefix, blocks = find_blocks(model)
    names = {}
    for i, b in enumerate(blocks):
        for n, m in all_linears(b, f"{prefix}.{i}", sweep).items():
            if isinstance(m, ExpertLinear):   # every expert is a layer
                names.update({e: m for e in m.names})
            else:
                names[n] = m
    for k, cfg in enumerate(sweep):
        if cfg.packs:
            later = next(((c, n) for c in sweep[k + 1:] if not c.trains_packed(cfg)
                          for n in names if c.applies_to(n) and cfg.applies_to(n)), None)
            if later:
                raise CompressError(f"passes: {later[0].name} runs after {cfg.name} on {later[1]}, but {cfg.name} "
                                    f"packs the weights; put {cfg.name} last (restrict it with targets/ignore)")
        hit = [n for n in names if cfg.applies_to(n)]
        if not hit and cfg.uses_layers:
            raise CompressError(f"{cfg.name}.targets: no linear layer of the decoder blocks matches {cfg.targets}")
        for n in hit:
            cfg.check_layer(n, *get_weight(names[n]).shape[-2:])
