"""The Python API: `compress.run(model, [Wanda(sparsity=0.5, pattern="2:4")], calib=...)`."""
from __future__ import annotations

import hashlib
import json
import logging
import platform
import resource
import time
from typing import Optional, Union

import torch

from compress import dist, survey
from compress.collect import MoEOptions
from compress.config import build_config
from compress.coverage import bits_per_weight, coverage, inventory, log_coverage, parameter_count
from compress.errors import CompressError
from compress.nn import ArmorLinear
from compress.offload import lazy_of
from compress.passes.base import PassConfig, make_config
from compress.routing import MODES
from compress.runner import preflight, resolve, run_sweep
from compress.training import retrain

log = logging.getLogger(__name__)


def as_configs(passes) -> list[PassConfig]:
    """Accept configs or recipe-style entries `{name: {args}}`; validate each, the
    training data section of a model-level pass, and what a pass needs from the passes
    after it (`PassConfig.link`)."""
    out = []
    for i, p in enumerate(passes):
        if isinstance(p, PassConfig):
            p.validate()
            out.append(p)
        elif isinstance(p, dict) and len(p) == 1:
            (name, args), = p.items()
            if args is not None and not isinstance(args, dict):
                raise CompressError(f"passes.{i}.{name}: expected a mapping of arguments, got {args!r}")
            out.append(make_config(name, args))
        else:
            raise CompressError(f"passes.{i}: expected {{pass_name: {{arguments}}}}, got {p!r}")
        if getattr(out[-1], "data", None) is not None:
            check_data(out[-1])
    for i, cfg in enumerate(out):   # passes that read the recipe after them (AWQ: the quant grid)
        cfg.link(out[i + 1:])
    return out


def check_data(cfg) -> None:
    """A pass's `data` section (what PERP retrains on) is a calibration section."""
    from calib import CalibConfig

    try:
        build_config(CalibConfig, cfg.data, f"{cfg.name}.data").validate()
    except CompressError as e:
        raise CompressError(str(e).replace("calib.", f"{cfg.name}.data.", 1)) from None


def stages(configs: list[PassConfig]) -> list:
    """The run's order of work: runs of layer / block passes form one sequential sweep
    (a list); a model-level pass (PERP's retraining) stands alone between sweeps."""
    out: list = []
    for cfg in configs:
        if cfg.model_level:
            out.append(cfg)
        elif out and isinstance(out[-1], list):
            out[-1].append(cfg)
        else:
            out.append([cfg])
    return out


def training_ids(cfg, calib_cfg, tokenizer, model, check_only: bool = False):
    """Token ids [n, seq] a model-level pass trains on: its `data` section, by default the
    calibration source with as many windows as the steps consume; text the calibration
    windows came from is left out. check_only: validate without loading anything."""
    import dataclasses

    from calib import CalibConfig, load_training

    need = cfg.steps * cfg.batch_size * cfg.grad_accum
    if calib_cfg is not None:  # unset fields follow the calibration section
        data = build_config(CalibConfig, {**dataclasses.asdict(calib_cfg), "nsamples": need, **(cfg.data or {})},
                            f"{cfg.name}.data")
    elif cfg.data is not None:
        data = build_config(CalibConfig, {"nsamples": need, **cfg.data}, f"{cfg.name}.data")
    else:
        raise CompressError(f"{cfg.name}.data: required when the calibration is given as token ids "
                            "(e.g. {source: c4, nsamples: 512, seqlen: 512})")
    if tokenizer is None:
        raise CompressError(f"{cfg.name}: training data needs tokenizer=...")
    if check_only:
        data.validate()
        return None
    return load_training(data, tokenizer, exclude=calib_cfg, model=model)


def check_training(model, configs: list[PassConfig], calib_cfg, tokenizer) -> None:
    """Fail on a model-level pass's missing training data, or on PERP's armor_* sets with
    no ARMOR layer to train (neither an armor pass before it nor one in the loaded
    model), before the sweep, not after it."""
    for k, cfg in enumerate(configs):
        if not cfg.model_level:
            continue
        sets = getattr(cfg, "armor_sets", [])
        if sets and not any(c.name == "armor" for c in configs[:k]) and not any(
                isinstance(m, ArmorLinear) for m in model.modules()):
            raise CompressError(f"perp.train: {sets[0]} trains ARMOR's layers, but no armor pass runs before perp "
                                f"and the model has none")
        if lazy_of(model) is not None:
            raise CompressError(f"runner.offload: {cfg.name} trains the whole model at once; it cannot run offloaded")
        training_ids(cfg, calib_cfg, tokenizer, None, check_only=True)


def moe_options(calibration, min_tokens) -> MoEOptions:
    if calibration not in MODES:
        raise CompressError(f"runner.moe_calibration: expected one of {', '.join(MODES)}, got {calibration!r}")
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
        raise CompressError(f"runner.moe_min_tokens: expected a non-negative integer, got {min_tokens!r}")
    return MoEOptions(calibration, min_tokens)


def join_processes(device, configs: list[PassConfig], ids: torch.Tensor, moe: MoEOptions, settings: tuple) -> None:
    """Under torchrun / accelerate launch: join the process group (compress.dist) and
    refuse what the ranks cannot share, on every rank, before any work. settings:
    (batch_size, true_sequential, compute_dtype) of the run."""
    dist.init(device)
    if not dist.active():
        return
    n = dist.world_size()
    if n > ids.shape[0]:
        raise CompressError(f"calib.nsamples: {ids.shape[0]} calibration samples for {n} processes; every process "
                            f"needs at least one (run at most {ids.shape[0]} processes, or calibrate on more samples)")
    for cfg in configs:
        if cfg.trains_blocks:
            raise CompressError(f"{cfg.name}: its block stage trains on every calibration batch of a block, which "
                                "is not split across processes; run it in one process (or gqsa.epochs: 0)")
    what = json.dumps({"passes": [{c.name: c.to_dict()} for c in configs], "moe": [moe.calibration, moe.min_tokens],
                       "settings": list(settings), "ids": hashlib.sha256(ids.numpy().tobytes()).hexdigest()},
                      sort_keys=True, default=str)
    dist.check_same("recipe and calibration set", what)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def versions() -> dict:
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def restore(model, plan: list, state) -> tuple[list, dict]:
    """Bring `model` to where an interrupted run stood after its finished stages: the
    newest model-level snapshot, then the finished sweeps after it. Returns their
    (report rows, training summaries)."""
    from compress.models import find_blocks

    done = [s for s in range(len(plan)) if state.is_done(s)]
    snap = max((s for s in done if not isinstance(plan[s], list)), default=-1)
    layers, training = [], {}
    if snap >= 0:
        training[plan[snap].name] = state.restore_model(snap, model)
    prefix, blocks = find_blocks(model)
    for s in done:   # sweeps before the snapshot: only their report rows
        if isinstance(plan[s], list):
            layers += state.restore_blocks(s, model, blocks, prefix, len(blocks) - 1, lazy_of(model)) if s > snap \
                else state.block_rows(s, len(blocks))
    if done:
        log.info("resumed after stage %d of %d", done[-1] + 1, len(plan))
    return layers, training


def allocate(model, configs: list[PassConfig], ids, state, **kw) -> dict:
    """Non-uniform sparsity allocations (compress.survey), measured on the dense model
    before the first sweep; a resumed run takes the ones it saved instead."""
    if not survey.wants(configs):
        return {}
    saved = state.path / "allocation.json" if state is not None else None
    if saved is not None and saved.is_file():
        section = json.loads(saved.read_text())
        survey.restore(configs, section)
        return section
    section = survey.survey(model, configs, ids, **kw)
    if saved is not None and dist.rank() == 0:
        saved.write_text(json.dumps(section))
    return section


def calibration(model, calib, tokenizer, calib_config) -> tuple:
    """(calibration config or None, token ids [nsamples, seqlen]) of `run`'s calib argument."""
    if isinstance(calib, torch.Tensor):
        ids = calib
    else:
        from calib import load_calibration

        if tokenizer is None:
            raise CompressError("calib: a CalibConfig needs tokenizer=...; or pass token ids [nsamples, seqlen]")
        calib_config, ids = calib, load_calibration(calib, tokenizer, model)
    if ids.dim() != 2:
        raise CompressError(f"calib: expected token ids of shape [nsamples, seqlen], got {tuple(ids.shape)}")
    return calib_config, ids


def summary(model, layers: list[dict], sparsity: dict, seconds: float, dense_parameters: int) -> dict:
    """report["summary"]: what the end-of-run table shows of the compression, so that the
    table reads report.json alone. The dense model is priced in 16 bits (2 bytes per
    parameter, the size it is published in), beside the bits per weight the compressed
    layers store."""
    return {"layers": len({r["layer"] for r in layers}), **sparsity, "seconds": round(seconds, 2),
            "peak_rss_mib": round(peak_rss_mib(), 1), "bits_per_weight": bits_per_weight(model, layers),
            "dense_parameters": dense_parameters, "dense_bytes": 2 * dense_parameters}


def run(model, passes, calib: Union[torch.Tensor, "object"], tokenizer=None, *,
        device: Optional[str] = None, batch_size: int = 8, true_sequential: bool = False,
        compute_dtype: Optional[str] = None, calib_config=None, state=None, moe_calibration: str = "all",
        moe_min_tokens: int = 16):
    """Compress `model` in place with `passes`; return (model, report).

    calib: token ids [nsamples, seqlen] or a `calib.CalibConfig` (then `tokenizer` is
    needed; source 'self' samples from `model`). compute_dtype: dtype name of the
    calibration forwards; None picks bf16 for an fp32 model on a CPU with native bf16,
    else the model's dtype (statistics and pass math are fp32 either way). state: a
    compress.resume.RunState (progress saved after every block and stage; an interrupted
    run's finished work restored). moe_calibration: 'all' (every fused expert's statistics
    from every calibration token) or 'routed' (from the tokens routed to it); experts that
    saw fewer than moe_min_tokens tokens are compressed data-free (magnitude / RTN).
    Under torchrun / accelerate launch the processes share the work (compress.dist)."""
    moe, configs = moe_options(moe_calibration, moe_min_tokens), as_configs(passes)
    if not configs:
        raise CompressError("passes: expected at least one pass")
    preflight(model, configs)
    calib_cfg, ids = calibration(model, calib, tokenizer, calib_config)
    join_processes(device, configs, ids, moe, (batch_size, true_sequential, compute_dtype))
    check_training(model, configs, calib_cfg, tokenizer)
    weights, dense_parameters = inventory(model), parameter_count(model)   # before any layer is packed
    t0 = time.perf_counter()
    device, dtype = resolve(device, getattr(torch, compute_dtype) if compute_dtype else None, model)
    plan = stages(configs)
    allocation = allocate(model, configs, ids, state, device=device, batch_size=batch_size, compute_dtype=dtype, moe=moe)
    layers, training = restore(model, plan, state) if state is not None else ([], {})
    for s, stage in enumerate(plan):
        if state is not None and state.is_done(s):
            continue
        if isinstance(stage, list):
            layers += run_sweep(model, stage, ids, device=device, batch_size=batch_size,
                                true_sequential=true_sequential, compute_dtype=dtype, state=state, stage=s, moe=moe)
        else:
            training[stage.name] = retrain(model, training_ids(stage, calib_cfg, tokenizer, model), stage, device)
        if state is not None:
            state.stage_done(s, model, not isinstance(stage, list), training.get(getattr(stage, "name", None)))
    seconds = time.perf_counter() - t0
    section, sparsity = coverage(model, weights, layers, configs)
    report = {
        "passes": [{c.name: c.to_dict()} for c in configs],
        "calibration": {"nsamples": ids.shape[0], "seqlen": ids.shape[1]},
        "true_sequential": true_sequential,
        "moe_calibration": moe.calibration,
        "compute_dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "processes": dist.world_size(),
        "summary": summary(model, layers, sparsity, seconds, dense_parameters),
        "coverage": section,
        "allocation": allocation or None,
        "layers": layers,
        "training": training or None,
        "versions": versions(),
    }
    log.info("compressed %d layers in %.1f s, sparsity %.4f of the decoder weights (%.4f of the targeted layers)",
             report["summary"]["layers"], seconds, sparsity["sparsity"], sparsity["targeted_sparsity"])
    log_coverage(section)
    return model, report
