"""Model-level training: PERP's retraining of the whole compressed model on next-token
loss, through `accelerate`, so that `accelerate launch` spreads it over several GPUs.
The api runs it as a stage of its own between sweeps, on token ids the api loaded;
the adapter math (attach, merge) is PERP's (compress.passes.perp), the optimizer and
schedule compress.optim's.
"""
from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from compress.errors import CompressError
from compress.experts import find_experts
from compress.models import block_linears, find_blocks, head_of
from compress.nn import ArmorLinear
from compress.nn.base import dense_parameters
from compress.optim import adamw
from compress.passes.base import PassConfig
from compress.passes.perp import attach, merge
from compress.passes.perp_armor import ArmorTrain

log = logging.getLogger(__name__)


def mixed_precision(cfg, device: torch.device) -> str:
    """accelerate's name of the autocast dtype: 'auto' is bf16 where it is fast (CUDA
    with bf16, a CPU with native bf16 matmuls), else no autocast."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no"


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


def armor_layers(model, cfg, prefix: str, blocks) -> list[str]:
    """Names of the ArmorLinear layers PERP's armor_* sets train (those its targets /
    ignore pick); refused where the sets are asked for and there are none."""
    if not cfg.armor_sets:
        return []
    names = [f"{prefix}.{i}.{n}" for i, b in enumerate(blocks) for n, m in b.named_modules()
             if isinstance(m, ArmorLinear) and PassConfig.applies_to(cfg, f"{prefix}.{i}.{n}")]
    if not names:
        raise CompressError(f"perp.train: {cfg.armor_sets[0]} asked for, but no layer perp targets is an "
                            f"ARMOR layer (targets {cfg.targets}, ignore {cfg.ignore})")
    return names


def retrain(model, ids: torch.LongTensor, cfg, device: torch.device) -> dict:
    """PERP's retraining of `model` (in place) on token ids [n, seq] with next-token
    loss; the adapters are merged at the end. Returns the report entry: trainable
    parameters, steps, tokens seen, seconds and the loss curve."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    prefix, blocks = find_blocks(model)
    linears = [f"{prefix}.{i}.{n}" for i, b in enumerate(blocks) for n in block_linears(b)]
    experts = [ex for i, b in enumerate(blocks) for ex in find_experts(b, f"{prefix}.{i}").values()]
    linears += [ex.layer_name(e, p) for ex in experts for p in ex.projs for e in range(ex.num)]
    head = head_of(model)   # the model's own output embeddings, whatever their name
    if "lm_head" in cfg.train and head is None:
        raise CompressError("perp.train: lm_head asked for, but the model's output head is not a linear layer")
    total_params = dense_parameters(model)   # packed layers (ARMOR's) count as their dense weight
    adapters, params = attach(model, cfg, [n for n in linears if cfg.applies_to(n)], head, experts,
                              armor_layers(model, cfg, prefix, blocks))
    trainable = sum(p.numel() for p in params)
    own = {id(p) for a in adapters.values() if isinstance(a, ArmorTrain) for p in a.parameters_to_train()}
    groups = [g for g in ({"params": [p for p in params if id(p) not in own]},
                          {"params": [p for p in params if id(p) in own], "lr": cfg.armor_learning_rate}) if g["params"]]
    # accelerate keeps one process-wide state; a second run in this process (other
    # mixed precision) must reset it. The distributed part (PartialState) stays.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    acc = Accelerator(mixed_precision=mixed_precision(cfg, device), gradient_accumulation_steps=cfg.grad_accum,
                      cpu=device.type == "cpu")
    loader = torch.utils.data.DataLoader(ids, batch_size=cfg.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(cfg.seed), drop_last=len(ids) >= cfg.batch_size)
    opt, sched = adamw(groups, cfg, cfg.steps)   # ARMOR's own factors at armor_lr
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
