"""PERP's trainable sets on ARMOR's layers (compress.nn.ArmorLinear, W_hat = A (W' * M) B).

After ARMOR, every targeted linear is already a factorization; PERP's retraining can
train its factors end to end instead of adding an adapter:

    armor_wrappers   the diagonal blocks of A [out/b, b, b] and B [in/b, b, b]
    armor_core       the kept core values [out, in/2]; the positions are fixed, so the
                     core stays exactly 2:4 whatever the values become

Training keeps fp32 masters of the trained tensors (the layer stores fp16) and forms
the core from the kept values on every forward, as ArmorLinear's reference forward
does. Merging rounds the masters back into the layer's fp16 buffers; `positions` is
never written, so the 2-bit metadata after merging equals the metadata before, bit for
bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.nn import ArmorLinear

SETS = ("armor_wrappers", "armor_core")


def kept_index(positions: torch.Tensor, out: int, d_in: int) -> torch.Tensor:
    """[out, in/2] int64: the flat index into the core [out, in] of every kept value, in
    the order of ArmorLinear.values (compress.nn.armor_linear.unpack_core's layout)."""
    nib = torch.stack([positions & 15, positions >> 4], -1).reshape(out, -1)[:, :d_in // 4].long()   # [out, in/4]
    pos = torch.stack([nib & 3, nib >> 2], -1)                                                     # [out, in/4, 2]
    col = torch.arange(d_in // 4, device=positions.device)[None, :, None] * 4 + pos
    row = torch.arange(out, device=positions.device)[:, None, None] * d_in
    return (row + col).reshape(out, d_in // 2)


class ArmorTrain(nn.Module):
    """An ArmorLinear `base` with fp32 copies of A, B and its kept values, of which the
    sets named in `train` are trainable."""

    def __init__(self, base: ArmorLinear, train: list[str]):
        super().__init__()
        self.base = base
        wrap, core = "armor_wrappers" in train, "armor_core" in train
        self.A = nn.Parameter(base.A.detach().float(), requires_grad=wrap)              # [out/b, b, b]
        self.B = nn.Parameter(base.B.detach().float(), requires_grad=wrap)              # [in/b, b, b]
        self.values = nn.Parameter(base.values.detach().float(), requires_grad=core)    # [out, in/2]
        self.register_buffer("index", kept_index(base.positions, base.out_features, base.in_features),
                             persistent=False)

    def core(self) -> torch.Tensor:
        """S [out, in]: the kept values scattered into their 2:4 positions, zero elsewhere."""
        out, d_in = self.base.out_features, self.base.in_features
        S = self.values.new_zeros(out * d_in)
        return S.scatter(0, self.index.reshape(-1), self.values.reshape(-1)).reshape(out, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # y = A (S (B x)) in rows, as ArmorLinear.forward: x [.., in] -> [.., out]
        lead, dt, b = x.shape[:-1], x.dtype, self.base.block_size
        d_in, out = self.base.in_features, self.base.out_features
        h = torch.einsum("nkc,kdc->nkd", x.reshape(-1, d_in // b, b), self.B.to(dt)).reshape(-1, d_in)
        h = F.linear(h, self.core().to(dt))
        h = torch.einsum("njc,jdc->njd", h.reshape(-1, out // b, b), self.A.to(dt)).reshape(*lead, out)
        bias = self.base.bias
        return h if bias is None else h + bias.to(dt)

    def parameters_to_train(self) -> list[nn.Parameter]:
        return [p for p in (self.A, self.B, self.values) if p.requires_grad]

    @torch.no_grad()
    def merge(self) -> None:
        """Round the trained masters into the layer's buffers; positions stay as they are."""
        for p, buf in ((self.A, self.base.A), (self.B, self.base.B), (self.values, self.base.values)):
            if p.requires_grad:
                buf.copy_(p.to(buf.dtype))
        self.base.prepared_core = None    # a deploy binding made from the old values is stale


def attach_armor(root: nn.Module, names: list[str], train: list[str]) -> dict[str, ArmorTrain]:
    """Swap the ArmorLinear layers `names` of `root` for trainable ArmorTrain wrappers."""
    wrapped = {}
    for n in names:
        wrapped[n] = ArmorTrain(root.get_submodule(n), train)
        root.set_submodule(n, wrapped[n])
    return wrapped


def merge_armor(root: nn.Module, wrapped: dict[str, ArmorTrain], write: bool) -> None:
    """Put the ArmorLinear layers back, with the trained values when `write`."""
    for n, w in wrapped.items():
        if write:
            w.merge()
        root.set_submodule(n, w.base)
