"""The Python API: `compress.run(model, [Wanda(sparsity=0.5, pattern="2:4")], calib=...)`."""
from __future__ import annotations

import logging
import platform
import resource
import time
from typing import Optional, Union

import torch

from compress.errors import CompressError
from compress.passes.base import PassConfig, make_config
from compress.runner import preflight, resolve, run_sweep

log = logging.getLogger(__name__)


def as_configs(passes) -> list[PassConfig]:
    """Accept configs or recipe-style entries `{name: {args}}`."""
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
    return out


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def versions() -> dict:
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def run(model, passes, calib: Union[torch.Tensor, "object"], tokenizer=None, *,
        device: Optional[str] = None, batch_size: int = 8, true_sequential: bool = False,
        compute_dtype: Optional[str] = None):
    """Compress `model` in place with `passes`; return (model, report).

    calib: token ids [nsamples, seqlen] or a `calib.CalibConfig` (then `tokenizer` is
    needed; source 'self' samples from `model`). compute_dtype: dtype name of the
    calibration forwards; None picks bf16 for an fp32 model on a CPU with native bf16,
    else the model's dtype (statistics and pass math are fp32 either way)."""
    configs = as_configs(passes)
    if not configs:
        raise CompressError("passes: expected at least one pass")
    preflight(model, configs)
    if not isinstance(calib, torch.Tensor):
        from calib import load_calibration

        if tokenizer is None:
            raise CompressError("calib: a CalibConfig needs tokenizer=...; or pass token ids [nsamples, seqlen]")
        calib = load_calibration(calib, tokenizer, model)
    if calib.dim() != 2:
        raise CompressError(f"calib: expected token ids of shape [nsamples, seqlen], got {tuple(calib.shape)}")
    t0 = time.perf_counter()
    device, dtype = resolve(device, getattr(torch, compute_dtype) if compute_dtype else None, model)
    layers = run_sweep(model, configs, calib, device=device, batch_size=batch_size,
                       true_sequential=true_sequential, compute_dtype=dtype)
    seconds = time.perf_counter() - t0
    numel = sum(r["shape"][0] * r["shape"][1] for r in layers)
    zeros = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in layers)
    report = {
        "passes": [{c.name: c.to_dict()} for c in configs],
        "calibration": {"nsamples": calib.shape[0], "seqlen": calib.shape[1]},
        "true_sequential": true_sequential,
        "compute_dtype": str(dtype).replace("torch.", ""),
        "summary": {"layers": len(layers), "sparsity": zeros / max(numel, 1),
                    "seconds": round(seconds, 2), "peak_rss_mib": round(peak_rss_mib(), 1)},
        "layers": layers,
        "versions": versions(),
    }
    log.info("compressed %d layers in %.1f s, sparsity %.4f", len(layers), seconds, report["summary"]["sparsity"])
    return model, report
