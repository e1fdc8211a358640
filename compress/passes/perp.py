"""PERP: parameter-efficient retraining after pruning (Zimmer, Andoni, Spiegel, Pokutta,
"PERP: Rethinking the Prune-Retrain Paradigm in the Era of LLMs", 2023).

After pruning, training a tiny expressive subset of the parameters recovers most of
what full retraining would. The trainable sets (combinable, `train: [...]`):

    bias       every bias of the model (Llama-style models have none)
    norm       every normalization weight (and bias): LayerNorm / RMSNorm
    masklora   W' = W + s * (B A ⊙ M)      on the targeted linears, M = (W != 0)
    scalelora  W' = W ⊙ (B A)               on the targeted linears, B A = 1 at the start
    lm_head    an ordinary LoRA W' = W + s * B A on the output head
    armor_wrappers, armor_core   after ARMOR: its layers' own factors A, B or kept core
               values (compress.passes.perp_armor); the adapters above then go on the
               dense linears ARMOR left

B [out, r], A [r, in], s = alpha / r. MaskLoRA and ScaleLoRA change only kept weights,
so merging W' into the layer leaves the sparsity mask exactly as it was (a 2:4 layer
stays 2:4); `merge` also guards the rare kept weight that would round to exactly 0.

ScaleLoRA init: the paper sets B = A = 1/sqrt(r). Then every column of B (and row of A)
gets the same gradient forever, so the adapter stays rank 1. We set the first column of
B and row of A to ones and the rest like LoRA (B = 0, A random): B A = 1 still, and all
r components can learn.

Two modes:
    retrain      (default) a model-level stage: compress.training trains the whole
                 model on next-token loss over `data` (disjoint from the calibration
                 windows, loaded by the api), after the sweep before it, then merges.
    reconstruct  a block pass: in the sequential sweep, each block's adapters are fitted
                 so the compressed block's output matches the dense block's output on the
                 calibration batches (mean squared error), then merged.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import CompressError
from compress.models import get_weight, is_linear, set_weight
from compress.optim import fit
from compress.passes.base import BlockContext, PassConfig, register, register_block
from compress.passes.perp_armor import SETS as ARMOR_SETS
from compress.passes.perp_armor import ArmorTrain, attach_armor, merge_armor
from compress.passes.perp_experts import ExpertsLoRA, attach_experts, merge_experts
from compress.passes.perp_lora import Adapter

log = logging.getLogger(__name__)

# ARMOR's factors are the layer's own weights, trained outright, where an adapter is a
# low-rank update from zero: as full fine-tuning takes about a tenth of LoRA's rate.
ARMOR_LR = 0.1
TRAINABLE = ("bias", "norm", "masklora", "scalelora", "lm_head", *ARMOR_SETS)


@dataclass
class PerpConfig(PassConfig):
    """`perp:` in a recipe. targets / ignore pick the linears that get adapters."""

    train: list = field(default_factory=lambda: ["bias", "norm", "masklora"])
    mode: str = "retrain"          # retrain | reconstruct
    rank: int = 16                 # r of the adapters (the paper's default)
    alpha: Optional[float] = None  # s = alpha / r; default 2 r (s = 2), as the paper
    lr: float = 5e-4               # peak learning rate (AdamW)
    armor_lr: Optional[float] = None  # of armor_wrappers / armor_core; default lr / 10 (see ARMOR_LR)
    steps: int = 100               # optimizer steps (retrain); per block (reconstruct)
    batch_size: int = 4            # sequences per forward
    grad_accum: int = 1            # forwards per optimizer step
    warmup: float = 0.1            # fraction of the steps with linearly rising lr
    schedule: str = "linear"       # linear | cosine decay to 0 after warmup
    weight_decay: float = 0.0
    grad_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto (bf16 where fast) | bf16 | fp16 | no
    seed: int = 0
    data: Optional[dict] = None    # retrain: a calib section (source, nsamples, seqlen...), read by the api

    needs_stats = False

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.train, list) or not self.train or any(t not in TRAINABLE for t in self.train):
            raise CompressError(f"perp.train: expected a non-empty list of {', '.join(TRAINABLE)}, got {self.train!r}")
        if "masklora" in self.train and "scalelora" in self.train:
            raise CompressError("perp.train: masklora and scalelora both adapt the same layers; choose one")
        choices = {"mode": ("retrain", "reconstruct"), "schedule": ("linear", "cosine"),
                   "mixed_precision": ("auto", "bf16", "fp16", "no")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise CompressError(f"perp.{key}: expected one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        for key in ("rank", "steps", "batch_size", "grad_accum"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise CompressError(f"perp.{key}: expected an integer >= 1, got {v!r}")
        for key, lo, hi in (("lr", 0, math.inf), ("warmup", 0, 1), ("weight_decay", 0, math.inf)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi or (key == "lr" and v == 0):
                raise CompressError(f"perp.{key}: expected a number in {'(' if key == 'lr' else '['}{lo}, {hi}], got {v!r}")
        if self.armor_lr is not None and (isinstance(self.armor_lr, bool) or not isinstance(self.armor_lr, (int, float))
                                          or not self.armor_lr > 0):
            raise CompressError(f"perp.armor_lr: expected a positive number, got {self.armor_lr!r}")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))):
            raise CompressError(f"perp.alpha: expected a number, got {self.alpha!r}")
        if self.mode == "reconstruct" and (self.adapter is None or len(self.train) > 1):
            raise CompressError("perp.train: mode reconstruct fits one adapter per linear layer of each block; "
                                f"expected [masklora] or [scalelora], got {self.train!r}")
        if self.data is not None and not isinstance(self.data, dict):
            raise CompressError(f"perp.data: expected a calibration section (a mapping), got {self.data!r}")

    @property
    def adapter(self) -> Optional[str]:
        """The adapter kind on the targeted linears: masklora, scalelora or None."""
        return next((t for t in self.train if t in ("masklora", "scalelora")), None)

    @property
    def armor_sets(self) -> list[str]:
        return [t for t in self.train if t in ARMOR_SETS]

    def trains_packed(self, packer: PassConfig) -> bool:
        """Whether this run trains the layers `packer` packs (ARMOR's, with armor_*), so
        that its adapters go on the other linears only."""
        return packer.name == "armor" and bool(self.armor_sets)

    @property
    def model_level(self) -> bool:
        return self.mode == "retrain"

    @property
    def uses_layers(self) -> bool:
        return self.adapter is not None

    @property
    def armor_learning_rate(self) -> float:
        return self.lr * ARMOR_LR if self.armor_lr is None else float(self.armor_lr)

    @property
    def scaling(self) -> float:
        return (2.0 * self.rank if self.alpha is None else float(self.alpha)) / self.rank

    def applies_to(self, name: str) -> bool:
        return self.adapter is not None and super().applies_to(name)


def _adapt(root: nn.Module, names: list[str], kind: str, cfg: PerpConfig, gen, experts=()) -> dict:
    """Adapters on the linears `names`; names of fused experts' layers (of `experts`,
    compress.experts.Experts) get batched ones on their fused parameters."""
    adapters = {}
    inside = set()
    for ex in experts:
        mine = {ex.layer_name(e, p) for p in ex.projs for e in range(ex.num)} & set(names)
        for lora in attach_experts(ex, mine, kind, cfg.rank, cfg.scaling, gen):
            adapters[f"{ex.name}.{len(adapters)}"] = lora
        inside |= mine
    for n in names:
        if n in inside:
            continue
        base = root.get_submodule(n)
        if not is_linear(base):
            raise CompressError(f"perp: {n} is a {type(base).__name__}, not a dense linear layer; "
                                f"PERP's adapters must run before packing passes (quant, gqsa, armor)")
        adapters[n] = Adapter(base, kind, cfg.rank, cfg.scaling, gen)
        root.set_submodule(n, adapters[n])
    return adapters


def attach(root: nn.Module, cfg: PerpConfig, linears: list[str], head: Optional[str] = None, experts=(),
           armor=()):
    """Freeze `root`, wrap `linears` (qualified names under root; fused experts' layers
    of `experts` included) in adapters, ARMOR's layers `armor` in trainable factors
    (armor_*), and mark the chosen biases and norm weights trainable. Returns (adapters,
    trainable params)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    for p in root.parameters():
        p.requires_grad_(False)
    adapters = _adapt(root, linears, cfg.adapter, cfg, gen, experts) if cfg.adapter else {}
    if cfg.adapter and not adapters:
        raise CompressError(f"perp.train: {cfg.adapter} selects no dense linear layer (targets {cfg.targets}, "
                            f"ignore {cfg.ignore}); layers ARMOR packed train with armor_wrappers / armor_core")
    if cfg.armor_sets:
        adapters.update(attach_armor(root, list(armor), cfg.armor_sets))
    if head is not None and "lm_head" in cfg.train:
        adapters.update(_adapt(root, [head], "lora", cfg, gen))
    params = [p for a in adapters.values() for p in a.parameters_to_train()]
    for name, m in root.named_modules():
        is_norm = "norm" in type(m).__name__.lower()
        for pname, p in m.named_parameters(recurse=False):
            if isinstance(m, (Adapter, ExpertsLoRA, ArmorTrain)) or "parametrizations" in name:
                continue
            if (is_norm and "norm" in cfg.train) or (pname == "bias" and "bias" in cfg.train):
                p.requires_grad_(True)
                params.append(p)
    if not params:
        raise CompressError(f"perp.train: {cfg.train} selects no parameter of this model "
                            f"(e.g. Llama-style models have no biases)")
    return adapters, params


@torch.no_grad()
def merge(root: nn.Module, adapters: dict[str, Adapter], write: bool = True) -> dict:
    """Write each adapter's W' into its base layer and put the base back (write=False:
    only put it back). Pruned weights stay exactly 0; a kept weight whose merged value
    rounds to 0 keeps its old value, so the mask after merging equals the mask before,
    bit for bit. Returns merge notes."""
    fused = [a for a in adapters.values() if isinstance(a, ExpertsLoRA)]
    kept_back = merge_experts(fused, write)
    merge_armor(root, {n: a for n, a in adapters.items() if isinstance(a, ArmorTrain)}, write)
    for n, a in adapters.items():
        if isinstance(a, (ExpertsLoRA, ArmorTrain)):
            continue
        if not write:
            root.set_submodule(n, a.base)
            continue
        W = get_weight(a.base)                             # [out, in] view
        new = a.weight().to(W.dtype)
        if a.kind != "lora":
            mask = W != 0
            stuck = mask & (new == 0)
            kept_back += int(stuck.sum())
            new = torch.where(mask, torch.where(stuck, W, new), torch.zeros((), dtype=W.dtype, device=W.device))
        if a.kind == "lora" and any(W is p for m in root.modules() if isinstance(m, nn.Embedding) for p in m.parameters()):
            log.warning("perp: %s is tied to the input embedding; merging its LoRA unties it "
                        "(the checkpoint stores both matrices)", n)
            a.base.weight = nn.Parameter(new, requires_grad=False)
            if hasattr(root, "config"):
                root.config.tie_word_embeddings = False
        else:
            W.copy_(new)
        root.set_submodule(n, a.base)
    for p in root.parameters():
        p.requires_grad_(False)
    return {"adapters": len(adapters) if write else 0, "kept_weights_guarded": kept_back}


Perp = PerpConfig


@register("perp", PerpConfig)
def perp(layer, cfg: PerpConfig) -> None:
    """Nothing happens per layer: PERP trains blocks (reconstruct) or the whole model."""


@register_block("perp")
def reconstruct(ctx: BlockContext, cfg: PerpConfig) -> None:
    """Fit the block's adapters so its output matches the dense block's on the
    calibration batches (mean squared error), and merge them into the layers only if
    that error went down (measured on all batches before and after)."""
    if cfg.mode != "reconstruct" or not ctx.targets:
        return
    path = {id(m): p for p, m in ctx.block.named_modules()}
    names = [path[id(m)] for m in ctx.modules.values()]
    own = next(ctx.block.parameters()).dtype
    ctx.block.float()                     # fp32 masters (the runner's block is in its compute dtype)
    for L, n in zip(ctx.layers.values(), names):
        set_weight(ctx.block.get_submodule(n), L.W)
    adapters, params = attach(ctx.block, cfg, names)
    # 'auto' fits in fp32: in bf16 the residual sum rounds away the small changes being fit.
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision, torch.float32)

    def loss(k: int) -> torch.Tensor:
        return F.mse_loss(ctx.forward(k).float(), ctx.targets[k].to(ctx.device).float())

    def total() -> float:
        with torch.no_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return sum(loss(k).item() for k in range(len(ctx.targets))) / len(ctx.targets)

    before = after = math.inf
    try:
        before = total()
        fit(params, loss, len(ctx.targets), cfg, ctx.device, dtype)
        after = total()
    finally:  # on an error too: the base layers go back (unchanged)
        notes = merge(ctx.block, adapters, write=after < before)  # never worse on the calibration batches
        if after < before:   # the fp32 merged weights, read before the block goes back to its dtype
            for L, n in zip(ctx.layers.values(), names):
                L.W.copy_(get_weight(ctx.block.get_submodule(n)))
        ctx.block.to(own)    # rejected: L.W (the fp32 masters) is untouched, bit for bit
    for L in ctx.layers.values():
        L.info["perp_loss"] = [before, min(before, after)]
    ctx.layers[next(iter(ctx.layers))].info["perp_merge"] = notes
