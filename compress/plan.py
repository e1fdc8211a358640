"""`compress plan recipe.yaml`: the peak device and host memory and the run time a recipe
will take, estimated from the model's config alone (built on the meta device: nothing is
loaded) and one short matmul that measures this machine, before anything heavy starts.

Memory, per the runner's loop (compress/runner.py):

    weights     the whole model (host), or with runner.offload the non-block part and
                one block; the device holds one block plus the non-block part. While
                loading, the file's pages and the tensors are partly both resident
    activations calibration hidden states, nsamples x seqlen x d_model in the compute
                dtype, once (twice when a block pass keeps the dense block's outputs)
    statistics  per distinct linear input (found by a forward on the meta device): X^T X
                in fp32 (d_in^2) for SparseGPT / GPTQ, and the fp64 sums; fused experts
                one [E, d_in, d_in] X^T X per input (gate/up, down)
    block       the fp32 masters and two fp32 working copies of every linear of the block,
                and the block in the compute dtype beside the model's own
    workspace   the largest layer's pass: fp32 copies of W and, with X^T X, H^-1 (for
                fused experts, of all E experts of a projection: they run batched)

Time: calibration forwards (2 flops per weight per token, about three forwards of every
block per sweep) plus the passes' own math (SparseGPT / GPTQ: d_in^3 + 2 out d_in^2 per
layer), divided by the measured matmul rate. PERP's training is 6 flops per weight per
token. It is an estimate: the report of a real run has the measured figures.
"""
from __future__ import annotations

import logging
import time

import torch

from compress.models import get_weight
from compress.recipe import Recipe

log = logging.getLogger(__name__)

MiB = 2 ** 20
# Calibrated on SmolLM2-shaped runs on this project's CPU machine (benchmarks/memory.py,
# benchmarks/resume.py); estimates land within about 10 % of those runs' measured peaks.
BASE_MIB = 640     # python and the libraries (338 MiB imported), tokenizer, calibration text, allocator slack
LOAD_COPIES = 1.6  # while a model loads, its file's pages and its tensors are partly resident together
EFFICIENCY = 0.4   # the share of the plain matmul rate a whole run achieves (small matmuls, Cholesky, I/O)


def _meta_model(spec: str):
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from compress.loading import resolve_model
    from compress.models import auto_class
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


def block_inputs(model, blocks) -> tuple[int, list[list[int]]]:
    """(d_model, per block the input size of each distinct linear input), found the way
    the runner finds them: one forward of the meta model (no memory, no math) with
    hooks on every block's linears, layers reading the very same tensor sharing an
    input (q/k/v -> 1, o -> 1, gate/up -> 1, down -> 1 for LLaMA). bf16 because some
    fused-expert kernels refuse fp32 on meta. If the model cannot run on meta, every
    linear counts as its own input (an upper bound)."""
    from compress.models import block_linears

    seen: list[dict] = [{} for _ in blocks]
    d = []
    def width(m, args, kwargs):
        d.append((args[0] if args else kwargs["hidden_states"]).shape[-1])

    hooks = [blocks[0].register_forward_pre_hook(width, with_kwargs=True)]
    def record(i, n):
        def hook(m, args, out):   # returns None: the output stays as it is
            seen[i].setdefault(n, args[0])
        return hook

    for i, b in enumerate(blocks):
        for n, m in block_linears(b).items():
            hooks.append(m.register_forward_hook(record(i, n)))
    try:
        with torch.no_grad():
            model.to(torch.bfloat16)(torch.zeros(1, 8, dtype=torch.long, device="meta"))
    except Exception as e:   # noqa: BLE001 - a model code path that needs real data
        log.warning("plan: the model does not run on the meta device (%s); counting every linear as its own "
                    "input", e)
        seen = []
    finally:
        for h in hooks:
            h.remove()
    if seen and all(s for s in seen):
        return d[0], [list({id(t): t.shape[-1] for t in s.values()}.values()) for s in seen]
    d_model = model.get_input_embeddings().weight.shape[-1]
    return d_model, [[get_weight(m).shape[1] for m in block_linears(b).values()] for b in blocks]


def _experts(lins: list[dict], blocks, prefix: str) -> list[list]:
    """Each block's fused experts modules; every expert's projections join `lins`."""
    from compress.experts import find_experts

    experts = [list(find_experts(b, f"{prefix}.{i}", refuse=lambda n: False).values()) for i, b in enumerate(blocks)]
    for lin, exs in zip(lins, experts):   # every expert is a layer
        lin.update({ex.layer_name(e, p): tuple(ex.weights(p).shape[1:]) for ex in exs for p in ex.projs
                    for e in range(ex.num)})
    return experts


def plan(recipe: Recipe) -> dict:
    """{'host_mib', 'device_mib', 'seconds', ...} for a validated recipe."""
    from compress.api import as_configs, stages
    from compress.models import block_linears, find_blocks
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
    lins = [{k: tuple(get_weight(m).shape) for k, m in block_linears(b).items()} for b in blocks]   # (out, in)
    experts = _experts(lins, blocks, prefix)
    n, T = recipe.calib.nsamples, recipe.calib.seqlen
    d, inputs = block_inputs(model, blocks)
    acts = n * T * d * cbytes * (2 if keeps_targets else 1)
    # InputStats per distinct input: fp64 sum and sum of squares, fp32 X^T X; fused
    # experts: one [E, in, in] X^T X per input (gate/up share one, down has its own)
    stat = lambda i, E=1: E * (2 * i * 8 + (i * i * 4 if xtx else 0))   # noqa: E731
    stats = max(sum(stat(i) for i in inp) + sum(stat(ex.weights(p).shape[-1], ex.num) for ex in exs
                                                for p in ex.projs if p.name != "up_proj")
                for inp, exs in zip(inputs, experts))
    # the largest layer pass: fp32 copies of W and H^-1; batched over the experts of one projection
    work = max([o * i * 4 * 3 + (2 * i * i * 4 if xtx else 0) for lin in lins for o, i in lin.values()] +
               [ex.num * (o * i * 4 * 3 + (2 * i * i * 4 if xtx else 0)) for exs in experts for ex in exs
                for o, i in (tuple(ex.weights(p).shape[1:]) for p in ex.projs)] or [0])
    weights_host = (rest + per_block) * wbytes if recipe.runner.offload else total * wbytes
    # Per block: the fp32 masters and each layer's two fp32 working copies (Layer.W,
    # W_dense) of its linears, plus the block in the compute dtype when that differs
    # from the model's (run_in_dtype keeps the original beside it).
    lin_params = max(sum(o * i for o, i in lin.values()) for lin in lins)
    other = cdtype != getattr(torch, recipe.dtype)
    block_host = lin_params * 12 + (per_block * cbytes if other else 0)
    block_dev = block_host + per_block * wbytes   # on a GPU the block itself is a copy too
    run_peak = weights_host + (0 if device.type == "cuda" else acts + stats + work + block_host)
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
            "block_mib": block_host / MiB, "host_mib": host / MiB, "device_mib": dev / MiB,
            "matmul_gflops": rate / 1e9, "seconds": seconds}


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
