"""GQSA: group quantization and group sparsity (Zeng et al., 2024, "GQSA: Group
Quantization and Sparsity for Accelerating Large Language Model Inference").

Weights are cut into groups of g consecutive inputs per row (Sec. 3.1). The same
groups carry the sparsity and the quantization: whole groups are pruned, every row
keeps the same number of groups (a row-balanced group-sparse layout the GEMV kernel
can split evenly), and each kept group gets its own b-bit scale / zero point. Storage:
the kept groups' packed codes plus their group indices (`GQSALinear`).

Layer stage (one-shot initialization). The loss of removing group G of row i jointly,
with the rest of the row optimally re-fitted, is the OBS saliency of a set of weights

    eps_iG = w_iG^T [(H^-1)_GG]^-1 w_iG,     H = (2/n) X X^T   (damped)

and each row drops its round(sparsity * n_groups) least salient groups (`pruned_count`).
GPTQ then quantizes the kept groups and compensates for the pruned ones (`quant.gptq` with the
mask; `method: rtn` skips the compensation).

Block stage, BQPO ("block quantization-pruning optimization", Sec. 3.2): with the
group mask M fixed, the block's latent weights W, scales s and zero points z are
trained with Adam to make the block's output match the dense block's output on the
calibration batches, through the fake quantizer

    W_hat = M * (clamp(round(W / s) + round(z), 0, 2^b - 1) - round(z)) * s

whose roundings pass gradients straight through; both learning rates decay to 0 on a
cosine over the run. The result is kept only if it lowers
the block's output error (else the one-shot solution stays).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import CompressError
from compress.linalg import handle_dead_inputs, inverse_cholesky
from compress.masks import pruned_count
from compress.nn.gqsa_linear import GroupSparseResult
from compress.passes.base import BlockContext, Layer, register, register_block
from compress.passes.quant import QuantConfig, gptq
from compress.quantize import QuantSpec, grouped, round_scale, rtn


@dataclass
class GQSAConfig(QuantConfig):
    """Quantization fields as in `quant` (bits, group_size, symmetric, method,
    clip_search, blocksize, percdamp; groups stay contiguous, so act_order needs
    static_groups; all three default to off here), plus
    sparsity  fraction of each row's groups pruned (rounded per row: `pruned_count`)
    epochs    BQPO passes over the calibration batches (0: one-shot only)
    lr        Adam learning rate of the latent weights; lr_quant: of scales and zero points
    seed      order of the batches in BQPO"""

    batched = False               # class-level: runs once per expert (its saliency is per layer)
    group_size: int = 16
    act_order: bool = False       # the one-shot GPTQ start as measured in benchmarks/RESULTS.md
    static_groups: bool = False
    clip_search: bool = False
    sparsity: float = 0.5
    epochs: int = 2
    lr: float = 3e-3
    lr_quant: float = 1e-4
    seed: int = 0

    needs_stats = True
    needs_xtx = True

    @property
    def trains_blocks(self) -> bool:
        return self.epochs > 0   # epochs 0: the one-shot layer stage only

    def validate(self) -> None:
        super().validate()
        n = self.name
        if self.group_size == "channel":
            raise CompressError(f"{n}.group_size: expected a positive integer (groups are the unit of sparsity)")
        if self.act_order and not self.static_groups:
            raise CompressError(f"{n}.act_order: needs static_groups: true (group-sparse storage needs "
                                "contiguous groups)")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1:
            raise CompressError(f"{n}.sparsity: expected a number in [0, 1), got {self.sparsity!r}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise CompressError(f"{n}.epochs: expected an integer >= 0, got {self.epochs!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise CompressError(f"{n}.seed: expected an integer, got {self.seed!r}")
        for key in ("lr", "lr_quant"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise CompressError(f"{n}.{key}: expected a positive number, got {v!r}")


GQSA = GQSAConfig


def group_saliency(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, percdamp: float, name: str,
                   info: dict) -> torch.Tensor:
    """eps [out, G]: OBS loss of pruning each group of each row (W [out, in], H [in, in])."""
    H, W = H.clone(), W.clone()
    handle_dead_inputs(H, W)
    U = inverse_cholesky(H, percdamp, name, info)
    Hinv = U.T @ U                                                   # [in, in]
    d_in, g, G = W.shape[1], spec.group_size, spec.n_groups(W.shape[1])
    pad = G * g - d_in
    if pad:  # padded inputs: unit diagonal, zero weights -> they add nothing
        Hinv = torch.block_diag(Hinv, torch.eye(pad, device=W.device))
    blocks = Hinv.reshape(G, g, G, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)   # [G, g, g] (H^-1)_GG
    M = torch.cholesky_inverse(torch.linalg.cholesky(blocks))                      # [(H^-1)_GG]^-1
    Wg = grouped(W, spec)                                            # [out, G, g]
    return torch.einsum("ogk,gkl,ogl->og", Wg, M, Wg)


@register("gqsa", GQSAConfig)
def gqsa(layer: Layer, cfg: GQSAConfig) -> None:
    W, spec = layer.W, cfg.spec
    G = spec.n_groups(W.shape[1])
    H = layer.stats.hessian().to(W.device)
    eps = group_saliency(W, H, spec, cfg.percdamp, layer.name, layer.info)          # [out, G]
    keep_groups = torch.zeros_like(eps, dtype=torch.bool)
    keep_groups.scatter_(1, eps.topk(G - pruned_count(G, cfg.sparsity), dim=1).indices, True)
    keep = grouped(keep_groups[..., None].expand(-1, -1, spec.group_size).reshape(W.shape[0], -1), spec)
    keep = keep.reshape(W.shape[0], -1)[:, :W.shape[1]] & (W != 0)  # an earlier pass's zeros stay zero
    if cfg.method == "rtn":
        res = rtn(W, keep, spec)
    else:
        res = gptq(W, H, keep, spec, blocksize=cfg.blocksize, percdamp=cfg.percdamp, act_order=cfg.act_order,
                   static_groups=cfg.static_groups, name=layer.name, info=layer.info)
    layer.packed = GroupSparseResult.from_dense(res, keep_groups, keep)
    layer.W.copy_(layer.packed.dequantize())


# ----------------------------------------------------------------------------- BQPO

def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class FakeQuantGroups(nn.Module):
    """Differentiable stand-in for one GQSA layer during BQPO. Parameters: latent
    weights W [out, in], scales s [out, G] and zero points z [out, G] (fp32)."""

    def __init__(self, res: GroupSparseResult, bias):
        super().__init__()
        self.spec, self.d_in = res.spec, res.d_in
        out, G = res.codes.shape[0], res.spec.n_groups(res.d_in)
        full = lambda v, fill: torch.full((out, G), fill, device=v.device).scatter(1, res.idx, v)  # noqa: E731
        self.register_buffer("keep", full(torch.ones_like(res.scale), 0.0))              # [out, G] group mask
        # [out, in] weights that may be non-zero (an earlier pass's zeros stay zero)
        self.register_buffer("keep_w", None if res.keep is None else res.keep.float())
        self.W = nn.Parameter(res.dequantize())
        self.s = nn.Parameter(full(res.scale, 1.0))
        self.z = nn.Parameter(full(res.zero, 0.0), requires_grad=not res.spec.symmetric)
        self.bias = bias
        self.idx = res.idx

    def codes(self):
        """(u [out, G, g], s [out, G], z [out, G]) with straight-through rounding."""
        s = self.s.clamp_min(2.0 ** -24)
        s = s + (round_scale(s) - s).detach()             # the fp16 value that will be stored
        z = _round_ste(self.z).clamp(0, self.spec.qmax)
        u = torch.clamp(_round_ste(grouped(self.W, self.spec) / s[..., None]) + z[..., None], 0, self.spec.qmax)
        return u, s, z

    def weight(self) -> torch.Tensor:
        u, s, z = self.codes()
        W = (u - z[..., None]) * s[..., None] * self.keep[..., None]
        W = W.reshape(W.shape[0], -1)[:, :self.d_in]
        return W if self.keep_w is None else W * self.keep_w

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight().to(x.dtype), bias)

    @torch.no_grad()
    def result(self) -> GroupSparseResult:
        u, s, z = self.codes()
        g = u.shape[2]
        keep = None if self.keep_w is None else self.keep_w.bool()
        if keep is not None:             # a masked weight is stored as the code of 0
            u = torch.where(grouped(keep, self.spec, fill=False), u, z[..., None])
        return GroupSparseResult(self.spec, u.gather(1, self.idx[..., None].expand(-1, -1, g)).to(torch.uint8),
                                 s.gather(1, self.idx), z.gather(1, self.idx), self.idx, self.d_in, keep)


def _block_loss(ctx: BlockContext) -> float:
    with torch.no_grad():
        total = sum(F.mse_loss(ctx.forward(k).float(), t.to(ctx.device).float()).item()
                    for k, t in enumerate(ctx.targets))
    return total / len(ctx.targets)


@register_block("gqsa")
def bqpo(ctx: BlockContext, cfg: GQSAConfig) -> None:
    if cfg.epochs == 0 or not ctx.targets:
        return
    t0 = time.perf_counter()
    path = {id(m): p for p, m in ctx.block.named_modules()}
    fakes = {n: FakeQuantGroups(L.packed, getattr(ctx.modules[n], "bias", None)) for n, L in ctx.layers.items()}
    frozen = [p for p in ctx.block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for n, f in fakes.items():
        ctx.block.set_submodule(path[id(ctx.modules[n])], f)
    half = ctx.dtype in (torch.float16, torch.bfloat16)
    try:
        with torch.autocast(ctx.device.type, dtype=ctx.dtype, enabled=half):
            before = _block_loss(ctx)
            opt = torch.optim.Adam([{"params": [f.W for f in fakes.values()], "lr": cfg.lr},
                                    {"params": [p for f in fakes.values() for p in (f.s, f.z) if p.requires_grad],
                                     "lr": cfg.lr_quant}])
            gen = torch.Generator().manual_seed(cfg.seed)
            total = cfg.epochs * len(ctx.targets)   # cosine decay of both learning rates to 0
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))
            with torch.enable_grad():
                for _ in range(cfg.epochs):
                    for k in torch.randperm(len(ctx.targets), generator=gen).tolist():
                        loss = F.mse_loss(ctx.forward(k).float(), ctx.targets[k].to(ctx.device).float())
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        sched.step()
            after = _block_loss(ctx)
    finally:
        for n, m in ctx.modules.items():
            ctx.block.set_submodule(path[id(m)], m)
        for p in frozen:
            p.requires_grad_(True)
    for n, L in ctx.layers.items():
        if after < before:
            L.packed = fakes[n].result()
            L.W.copy_(L.packed.dequantize())
        L.info["bqpo_loss"] = [before, min(after, before)]
        L.info["bqpo_seconds"] = round(time.perf_counter() - t0, 2)
