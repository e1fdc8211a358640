"""Optimization shared by every training loop: AdamW on the given parameters only
(frozen weights get no optimizer state), linear warm-up then linear or cosine decay to
0, and `fit`, the single-device loop that block passes (PERP reconstruct) minimize a
loss with. `cfg` is any config with lr, weight_decay, warmup, schedule, steps,
grad_accum and seed (PerpConfig).

Schedule (t = optimizer step, T = steps, w = warm-up steps):
    lr(t) = lr * (t + 1) / w                                  t < w
    lr(t) = lr * d((t - w) / (T - w)),  d(u) = 1 - u  or  (1 + cos(pi u)) / 2
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def lr_factor(cfg, total: int) -> Callable[[int], float]:
    """The multiplier of cfg.lr at optimizer step t (see the module docstring)."""
    warm = int(round(cfg.warmup * total))

    def f(t: int) -> float:
        if t < warm:
            return (t + 1) / warm
        u = (t - warm) / max(total - warm, 1)
        return 1 - u if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * u))
    return f


def adamw(params, cfg, total: int):
    """AdamW on `params` (tensors, or parameter groups whose own "lr" overrides cfg.lr) with
    the schedule of `lr_factor` over `total` steps: (optimizer, scheduler)."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, total))


def fit(params: list, loss_fn: Callable[[int], torch.Tensor], n_items: int, cfg, device: torch.device,
        dtype: torch.dtype) -> list[float]:
    """Minimize the mean of loss_fn(k) over items k < n_items on one device: cfg.steps
    optimizer steps of cfg.grad_accum items each, items in a seeded order reshuffled
    every pass. Forwards run under autocast in `dtype` when it is a half type.
    Returns the loss of each optimizer step."""
    opt, sched = adamw(params, cfg, cfg.steps)
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
