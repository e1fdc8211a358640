"""SparseGPT (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be
Accurately Pruned in One-Shot"), Algorithm 1.

Columns are processed left to right. Pruning weight w_j of a row and compensating with
the optimal-brain-surgeon update (Eq. 3)

    delta = -(w_j / [H^-1]_jj) * H^-1_{:, j}

restricted to the not-yet-processed columns is the rank-1 update with row j of U, the
upper Cholesky factor of H^-1 (Sec. 3.2). H = (2/n) sum x x^T is the layer Hessian.
Updates are applied lazily: within a block of `blocksize` columns immediately, to the
columns right of the block once per block (Sec. 3.3, "lazy batch updates"), and the
same once more inside the block, per sub-block of 32 columns (compress.linalg.sub_blocks).

Mask selection is adaptive (Sec. 3.3): at the start of each block the mask for its
columns is chosen by the OBS saliency w^2 / [H^-1]_jj^2 of the current (already
updated) weights. With an N:M pattern, each group of M columns is masked when the loop
reaches it (Sec. 3.4). `scope: layer` (default, the paper's rule) ranks saliencies over
all rows of the block; `scope: row` prunes the same fraction within every row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.errors import CompressError
from compress.linalg import handle_dead_inputs, inverse_cholesky, sub_blocks
from compress.masks import check_nm_fits, nm_mask, topk_mask
from compress.passes.base import Layer, register, second_order_cost
from compress.passes.sparsity import SparsityConfig


@dataclass
class SparseGPTConfig(SparsityConfig):
    """blocksize: columns per lazy-update block; percdamp: damping lambda as a fraction
    of mean(diag H), grown tenfold on a failed Cholesky."""

    default_scope = "layer"   # the paper's rule (class-level, not a YAML field)
    blocksize: int = 128
    percdamp: float = 0.01

    needs_xtx = True
    batched = True

    def cost(self, out: int, d_in: int) -> float:
        return second_order_cost(out, d_in)

    def validate(self) -> None:
        super().validate()
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise CompressError(f"sparsegpt.blocksize: expected a positive integer, got {self.blocksize!r}")
        if not isinstance(self.percdamp, (int, float)) or not 0 < self.percdamp < 1:
            raise CompressError(f"sparsegpt.percdamp: expected a number in (0, 1), got {self.percdamp!r}")


SparseGPT = SparseGPTConfig


@register("sparsegpt", SparseGPTConfig)
@torch.no_grad()
def sparsegpt(layer: Layer, cfg: SparseGPTConfig) -> None:
    """W [out, in], or a batch of experts [E, out, in] with H [E, in, in]: every step
    below broadcasts over the leading dimension (`...`)."""
    W = layer.W                                           # [..., out, in] fp32, edited in place
    d_in = W.shape[-1]
    nm = cfg.nm
    if nm:
        check_nm_fits(layer.name, d_in, nm)
        layer.nm = nm
        # Blocks must hold whole N:M groups.
        B = max(nm[1], cfg.blocksize // nm[1] * nm[1])
    else:
        B = cfg.blocksize
    H = layer.stats.hessian().to(W.device)                # [..., in, in]
    layer.info["dead_inputs"] = handle_dead_inputs(H, W)
    U = inverse_cholesky(H, cfg.percdamp, layer.name, layer.info)  # [..., in, in] upper
    del H
    already_zero = W == 0  # an earlier pass's mask stays pruned

    for i1 in range(0, d_in, B):
        i2 = min(i1 + B, d_in)
        W1 = W[..., i1:i2].clone()                        # [..., out, b]
        U1 = U[..., i1:i2, i1:i2]                         # [..., b, b]
        d = U1.diagonal(dim1=-2, dim2=-1)                 # [..., b]  [H^-1]_jj^(1/2) terms
        Err1 = torch.zeros_like(W1)                       # [..., out, b] scaled errors
        prune = already_zero[..., i1:i2].clone()          # [..., out, b] True = pruned
        if not nm:
            saliency = W1.square() / d.square().unsqueeze(-2)
            prune |= ~topk_mask(saliency, cfg.sparsity_for(layer.name), cfg.rank_scope)
        for k1, k2 in sub_blocks(i2 - i1, nm[1] if nm else 1):
            for i in range(k1, k2):
                if nm and i % nm[1] == 0:
                    g = slice(i, i + nm[1])
                    saliency = W1[..., g].square() / d[..., g].square().unsqueeze(-2)
                    prune[..., g] |= ~nm_mask(saliency, *nm)
                w = W1[..., i]                            # [..., out]
                err = torch.where(prune[..., i], w, 0.0) / d[..., i, None]  # q = w with pruned set to 0
                W1[..., i:k2] -= err.unsqueeze(-1) * U1[..., i, None, i:k2]
                Err1[..., i] = err
            W1[..., k2:] -= Err1[..., k1:k2] @ U1[..., k1:k2, k2:]
        W1.masked_fill_(prune, 0.0)  # exact zeros (the update leaves rounding residue)
        W[..., i1:i2] = W1
        W[..., i2:] -= Err1 @ U[..., i1:i2, i2:]
