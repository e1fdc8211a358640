"""The runner's training loops: the model-level one (PERP's retraining, through
`accelerate`, so `accelerate launch` spreads it over several GPUs) and the block-level
one that reconstruct-style block passes call. Both use AdamW on the given parameters
only (frozen weights get no optimizer state), linear warm-up then linear or cosine
decay to 0, gradient accumulation, and a tqdm bar that shows the loss.

Schedule (t = optimizer step, T = steps, w = warm-up steps):
    lr(t) = lr * (t + 1) / w                                  t < w
    lr(t) = lr * d((t - w) / (T - w)),  d(u) = 1 - u  or  (1 + cos(pi u)) / 2
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable

import torch
from tqdm.auto import tqdm

from compress.errors import CompressError
from compress.models import block_linears, find_blocks, head_of

log = logging.getLogger(__name__)


def lr_factor(cfg, total: int) -> Callable[[int], float]:
    """The multiplier of cfg.lr at optimizer step t (see the module docstring)."""
    warm = int(round(cfg.warmup * total))

    def f(t: int) -> float:
        if t < warm:
            return (t + 1) / warm
        u = (t - warm) / max(total - warm, 1)
        return 1 - u if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * u))
    return f


def mixed_precision(cfg, device: torch.device) -> str:
    """accelerate's name of the autocast dtype: 'auto' is bf16 where it is fast (CUDA
    with bf16, a CPU with native bf16 matmuls), else no autocast."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no"


def _optimizer(params, cfg, total: int):
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, total))


def fit(params: list, loss_fn: Callable[[int], torch.Tensor], n_items: int, cfg, device: torch.device,
        dtype: torch.dtype, desc: str = "perp block") -> list[float]:
    """Minimize the mean of loss_fn(k) over items k < n_items on one device: cfg.steps
    optimizer steps of cfg.grad_accum items each, items in a seeded order reshuffled
    every pass. Forwards run under autocast in `dtype` when it is a half type.
    Returns the loss of each optimizer step."""
    opt, sched = _optimizer(params, cfg, cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    curve = []
    half = dtype in (torch.float16, torch.bfloat16)
    with torch.enable_grad(), torch.autocast(device.type, dtype=dtype, enabled=half):
        for _ in range(cfg.steps):
            total = 0.0
            for _ in range(cfg.grad_accum):
                if not order:
                    order = torch.randperm(n_items, generator=gen).tolist()
                loss = loss_fn(order.pop()) / cfg.grad_accum
                loss.backward()
                total += loss.item()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            curve.append(total)
    return curve


def _loop(acc, wrapped, opt, sched, loader, cfg) -> tuple[list[float], int]:
    """cfg.steps optimizer steps over `loader` (cycled), each of cfg.grad_accum batches
    per process. Returns (loss per step, averaged over processes; tokens seen)."""
    curve, tokens, running = [], 0, 0.0
    with tqdm(total=cfg.steps, desc="perp", unit="step", disable=not acc.is_local_main_process) as bar:
        while len(curve) < cfg.steps:
            for batch in loader:                               # [batch, seq] token ids
                with acc.accumulate(wrapped):
                    loss = wrapped(input_ids=batch, labels=batch, use_cache=False).loss
                    acc.backward(loss)
                    opt.step()                                 # a no-op until the step's last batch
                    opt.zero_grad(set_to_none=True)
                running += acc.reduce(loss.detach(), "mean").item() / cfg.grad_accum
                tokens += batch.numel() * acc.num_processes
                if acc.sync_gradients:
                    sched.step()
                    curve.append(running)
                    bar.set_postfix(loss=f"{running:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
                    bar.update(1)
                    running = 0.0
                    if len(curve) >= cfg.steps:
                        break
    return curve, tokens


def _checkpointing(model, on: bool) -> None:
    """Recompute each block's activations in the backward (transformers >= 5.x names it
    activation checkpointing; older releases gradient checkpointing)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def retrain(model, ids: torch.LongTensor, cfg, device: torch.device) -> dict:
    """PERP's retraining of `model` (in place) on token ids [n, seq] with next-token
    loss; the adapters are merged at the end. Returns the report entry: trainable
    parameters, steps, tokens seen, seconds and the loss curve."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from compress.passes.perp import attach, merge

    prefix, blocks = find_blocks(model)
    linears = [f"{prefix}.{i}.{n}" for i, b in enumerate(blocks) for n in block_linears(b)]
    head = head_of(model)   # the model's own output embeddings, whatever their name
    if "lm_head" in cfg.train and head is None:
        raise CompressError("perp.train: lm_head asked for, but the model's output head is not a linear layer")
    total_params = sum(p.numel() for p in model.parameters())
    adapters, params = attach(model, cfg, [n for n in linears if cfg.applies_to(n)], head)
    trainable = sum(p.numel() for p in params)
    # accelerate keeps one process-wide state; a second run in this process (other
    # mixed precision) must reset it. The distributed part (PartialState) stays.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    acc = Accelerator(mixed_precision=mixed_precision(cfg, device), gradient_accumulation_steps=cfg.grad_accum,
                      cpu=device.type == "cpu")
    loader = torch.utils.data.DataLoader(ids, batch_size=cfg.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(cfg.seed), drop_last=len(ids) >= cfg.batch_size)
    opt, sched = _optimizer(params, cfg, cfg.steps)
    was_training = model.training
    if cfg.grad_checkpointing:
        _checkpointing(model, True)
    model.train()
    # The scheduler is not prepared: accelerate would step it once per process per step.
    wrapped, opt, loader = acc.prepare(model, opt, loader)
    t0, done = time.perf_counter(), False
    try:
        curve, tokens = _loop(acc, wrapped, opt, sched, loader, cfg)
        done = True
    finally:  # after an error the base layers go back unchanged
        acc.wait_for_everyone()
        model = acc.unwrap_model(wrapped, keep_fp32_wrapper=False)
        acc.free_memory()
        if cfg.grad_checkpointing:
            _checkpointing(model, False)
        model.train(was_training)
        notes = merge(model, adapters, write=done)
    seconds = time.perf_counter() - t0
    log.info("perp: %d steps, %d tokens, %.1f s, loss %.3f -> %.3f", len(curve), tokens, seconds, curve[0], curve[-1])
    return {"trainable_params": trainable, "trainable_pct": 100 * trainable / total_params, "steps": len(curve),
            "tokens": tokens, "seconds": round(seconds, 1), "mixed_precision": acc.mixed_precision,
            "loss_curve": [round(v, 5) for v in curve], **notes}


def plot_loss(curve: list[float], path, title: str) -> None:
    """The loss per optimizer step as a PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(range(1, len(curve) + 1), curve, lw=1.2)
    ax.set(xlabel="optimizer step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
