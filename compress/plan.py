"""`compress plan recipe.yaml`: the peak device and host memory and the run time a recipe
will take, estimated from the model's config alone (built on the meta device: nothing is
loaded) and one short matmul that measures this machine, before anything heavy starts.

Memory, per the runner's loop (compress/runner.py):

    weights     the whole model (host), or with runner.offload the non-block part and
                one block; the device holds one block plus the non-block part. While
                loading, the file's pages and the tensors are partly both resident
    activations calibration hidden states, nsamples x seqlen x d_model in the compute
                dtype, once (twice when a block pass keeps the dense block's outputs)
    statistics  per distinct linear input: X^T X in fp32 (d_in^2) for SparseGPT / GPTQ
    workspace   the largest layer's pass: fp32 copies of W and, with X^T X, H^-1

Time: calibration forwards (2 flops per weight per token, about three forwards of every
block per sweep) plus the passes' own math (SparseGPT / GPTQ: d_in^3 + 2 out d_in^2 per
layer), divided by the measured matmul rate. PERP's training is 6 flops per weight per
token. It is an estimate: the report of a real run has the measured figures.
"""
from __future__ import annotations

import time

import torch

from compress.recipe import Recipe

MiB = 2 ** 20
# Calibrated on SmolLM2-shaped runs on this project's CPU machine (benchmarks/memory.py,
# benchmarks/resume.py); estimates land within about 10 % of those runs' measured peaks.
BASE_MIB = 640     # python and the libraries (338 MiB imported), tokenizer, calibration text, allocator slack
LOAD_COPIES = 1.6  # while a model loads, its file's pages and its tensors are partly resident together
EFFICIENCY = 0.4   # the share of the plain matmul rate a whole run achieves (small matmuls, Cholesky, I/O)


def _meta_model(spec: str):
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from compress.models import auto_class, resolve_model
    where, gguf = resolve_model(spec)
    config = AutoConfig.from_pretrained(where, **({"gguf_file": gguf} if gguf else {}))
    with init_empty_weights():
        model = auto_class(config).from_config(config)
    model.tie_weights()   # a tied head is one matrix, not two
    return model


def matmul_rate(device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """flop/s of a 1024 x 1024 x 1024 matmul on `device` in `dtype`."""
    a = torch.randn(1024, 1024, device=device, dtype=dtype)
    b = torch.randn(1024, 1024, device=device, dtype=dtype)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * 1024 ** 3 * n / (time.perf_counter() - t0)


def plan(recipe: Recipe) -> dict:
    """{'host_mib', 'device_mib', 'seconds', ...} for a validated recipe."""
    from compress.api import as_configs, stages
    from compress.models import block_linears, find_blocks, get_weight
    from compress.runner import fast_dtype

    model = _meta_model(recipe.model)
    prefix, blocks = find_blocks(model)
    wbytes = {"float32": 4, "float16": 2, "bfloat16": 2}[recipe.dtype]
    total = sum(p.numel() for p in model.parameters())
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]   # layer classes may differ (hybrids)
    per_block, rest = max(sizes), total - sum(sizes)
    device = torch.device(recipe.runner.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cdtype = getattr(torch, recipe.runner.compute_dtype) if recipe.runner.compute_dtype else \
        fast_dtype(device, getattr(torch, recipe.dtype))
    cbytes = torch.finfo(cdtype).bits // 8
    configs = as_configs(recipe.passes)
    sweeps = [s for s in stages(configs) if isinstance(s, list)]
    xtx = any(c.needs_xtx for c in configs)
    keeps_targets = any(c.name in ("armor", "gqsa", "perp") and not c.model_level for c in configs)
    n, T, d = recipe.calib.nsamples, recipe.calib.seqlen, model.config.get_text_config().hidden_size
    lins = [{k: tuple(get_weight(m).shape) for k, m in block_linears(b).items()} for b in blocks]   # (out, in)
    # layers reading one tensor share their statistics: approximated as one input per
    # (parent module, input size), e.g. q/k/v/o -> 1, gate/up -> 1, down -> 1 for LLaMA
    inputs = [{(k.rpartition(".")[0], shape[1]) for k, shape in lin.items()} for lin in lins]
    acts = n * T * d * cbytes * (2 if keeps_targets else 1)
    stats = max(sum(i * i * 4 if xtx else 3 * i * 4 for _, i in inp) for inp in inputs)
    work = max((o * i * 4 * 3 + (2 * i * i * 4 if xtx else 0) for lin in lins for o, i in lin.values()), default=0)
    weights_host = (rest + per_block) * wbytes if recipe.runner.offload else total * wbytes
    block_dev = per_block * (4 + cbytes)       # fp32 masters and the compute-dtype copy
    run_peak = weights_host + (0 if device.type == "cuda" else acts + stats + work + block_dev)
    load_peak = int(LOAD_COPIES * ((rest + per_block) if recipe.runner.offload else total) * wbytes)
    host = BASE_MIB * MiB + max(run_peak, load_peak)
    dev = rest * wbytes + block_dev + acts + stats + work if device.type == "cuda" else 0
    fwd = 2 * sum(sizes) * n * T * 3 * len(sweeps)
    pass_flops = sum((i ** 3 + 2 * o * i * i) if xtx else o * i * 8 for lin in lins for o, i in lin.values()) * len(sweeps)
    train = sum(6 * total * c.steps * c.batch_size * (c.data or {}).get("seqlen", T) for c in configs
                if c.model_level)
    rate = matmul_rate(device, cdtype)
    seconds = (fwd + pass_flops + train) / (rate * EFFICIENCY)
    return {"model": recipe.model, "parameters": total, "blocks": len(blocks), "block_parameters": per_block,
            "device": str(device), "compute_dtype": str(cdtype).replace("torch.", ""), "offload": recipe.runner.offload,
            "activations_mib": acts / MiB, "statistics_mib": stats / MiB, "workspace_mib": work / MiB,
            "host_mib": host / MiB, "device_mib": dev / MiB, "matmul_gflops": rate / 1e9, "seconds": seconds}


def table(p: dict) -> str:
    rows = [("model", f"{p['model']}: {p['parameters'] / 1e6:.1f} M parameters, {p['blocks']} blocks of "
                      f"{p['block_parameters'] / 1e6:.2f} M"),
            ("device", f"{p['device']}, calibration forwards in {p['compute_dtype']}"
                       f"{', blocks offloaded to disk' if p['offload'] else ''}"),
            ("calibration activations", f"{p['activations_mib']:.0f} MiB"),
            ("statistics (per block)", f"{p['statistics_mib']:.0f} MiB"),
            ("largest layer's workspace", f"{p['workspace_mib']:.0f} MiB"),
            ("peak host memory", f"{p['host_mib']:.0f} MiB"),
            ("peak device memory", f"{p['device_mib']:.0f} MiB" if p["device_mib"] else "— (CPU run)"),
            ("run time", f"{p['seconds']:.0f} s (at {p['matmul_gflops']:.0f} GFLOP/s measured here)")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
