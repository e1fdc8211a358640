"""ArmorLinear: W_hat = A (W' * M) B with block-diagonal wrappers A [out, out] and
B [in, in] around an exact 2:4 core (Liu et al., ICLR 2026, "ARMOR: High-Performance
Semi-Structured Pruning via Adaptive Matrix Factorization").

    A       [out/b, b, b] fp16  the diagonal blocks of A
    B       [in/b, b, b]  fp16  the diagonal blocks of B
    values  [out, in/2]   fp16  the two kept core values of every group of 4 inputs
    positions [out, in/8] uint8 their positions p0 < p1 in the group, p0 | p1 << 2, two
                                groups per byte (low nibble first): 2 bits per kept value,
                                as in the 2:4 sparse tensor-core format

The forward never forms W_hat: y = A (S (B x)), i.e. two batched b x b matmuls around
a 2:4 matmul (compress/kernels has the fast paths, which compress.deploy binds; this
is the reference).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from compress.nn.base import PackedLinear, runtime

FACTOR_DTYPE = torch.float16


def block_apply(blocks: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """blockdiag(blocks) @ X for blocks [n, b, b] and X [n*b, m]."""
    n, b, _ = blocks.shape
    return torch.bmm(blocks, X.reshape(n, b, -1)).reshape(n * b, -1)


def factor_product(A: torch.Tensor, S: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """W_hat = blockdiag(A) @ S @ blockdiag(B): A [out/b, b, b], S [out, in], B [in/b, b, b]."""
    SB = block_apply(B.transpose(1, 2), S.T).T          # S @ blockdiag(B) = (blockdiag(B)^T S^T)^T
    return block_apply(A, SB)


def pack_positions(keep: torch.Tensor) -> torch.Tensor:
    """Exact 2:4 mask [out, in] -> positions [out, in/8] uint8 (see the module docstring)."""
    out, d_in = keep.shape
    pos = keep.reshape(out, d_in // 4, 4).nonzero()[:, 2].reshape(out, d_in // 4, 2)   # sorted p0 < p1
    nib = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.uint8)                          # [out, in/4]
    if nib.shape[1] % 2:
        nib = F.pad(nib, (0, 1))
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


def unpack_core(values: torch.Tensor, positions: torch.Tensor, d_in: int) -> torch.Tensor:
    """(values [out, in/2], positions [out, in/8]) -> the dense core S [out, in] (fp32)."""
    out = values.shape[0]
    nib = torch.stack([positions & 15, positions >> 4], -1).reshape(out, -1)[:, :d_in // 4].long()   # [out, in/4]
    pos = torch.stack([nib & 3, nib >> 2], -1)                                             # [out, in/4, 2]
    S = torch.zeros(out, d_in // 4, 4, device=values.device)
    S.scatter_(2, pos, values.float().reshape(out, d_in // 4, 2))
    return S.reshape(out, d_in)


@dataclass
class ArmorResult:
    """What the armor pass leaves on a layer: factors already rounded to fp16."""

    A: torch.Tensor       # [out/b, b, b]
    B: torch.Tensor       # [in/b, b, b]
    core: torch.Tensor    # [out, in], zero outside the mask
    mask: torch.Tensor    # [out, in] bool, exact 2:4 (a kept value may be 0)

    def dequantize(self) -> torch.Tensor:
        return factor_product(self.A.float(), self.core.float(), self.B.float())


@runtime
class ArmorLinear(PackedLinear):
    PACKED = ("A", "B", "values", "positions")

    def __init__(self, in_features: int, out_features: int, block_size: int, bias: bool = False):
        super().__init__(in_features, out_features, bias)
        self.block_size = b = block_size
        eye = lambda n: torch.eye(b, dtype=FACTOR_DTYPE).repeat(n, 1, 1)  # noqa: E731
        self.register_buffer("A", eye(out_features // b))
        self.register_buffer("B", eye(in_features // b))
        self.register_buffer("values", torch.zeros(out_features, in_features // 2, dtype=FACTOR_DTYPE))
        self.register_buffer("positions", torch.zeros(out_features, (in_features // 4 + 1) // 2, dtype=torch.uint8))
        # S unpacked once in the activation dtype (dense, or compressed for the sparse
        # tensor cores) for a fast kernel; compress.deploy.bind fills it. Not saved.
        self.register_buffer("prepared_core", None, persistent=False)

    @classmethod
    def from_result(cls, res: ArmorResult, bias: Optional[torch.Tensor] = None) -> "ArmorLinear":
        out, d_in = res.core.shape
        m = cls(d_in, out, res.A.shape[1], bias is not None).to(res.core.device)
        keep = res.mask
        m.positions.copy_(pack_positions(keep))
        m.values.copy_(res.core[keep].reshape(out, d_in // 2).to(FACTOR_DTYPE))
        m.A.copy_(res.A.to(FACTOR_DTYPE))
        m.B.copy_(res.B.to(FACTOR_DTYPE))
        m.set_bias(bias)
        return m

    @classmethod
    def empty(cls, meta: dict) -> "ArmorLinear":
        return cls(meta["in_features"], meta["out_features"], meta["block_size"], meta["bias"])

    def meta(self) -> dict:
        return {"type": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features,
                "block_size": self.block_size, "bias": self.bias is not None}

    def core(self) -> torch.Tensor:
        """S = W' * M, [out, in] fp32, exact 2:4."""
        return unpack_core(self.values, self.positions, self.in_features)

    def effective_weight(self) -> torch.Tensor:
        return factor_product(self.A.float(), self.core(), self.B.float())

    def extra_parameters(self) -> int:
        """Parameters of the wrappers A and B (what ARMOR adds to a 2:4 layer)."""
        return self.A.numel() + self.B.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl is not None:
            return self.impl(self, x)
        # y = A (S (B x)) in rows: x [.., in] -> x B^T -> (x B^T) S^T -> (..) A^T
        lead, dt = x.shape[:-1], x.dtype
        b = self.block_size
        h = x.reshape(-1, self.in_features // b, b)                                   # [N, in/b, b]
        h = torch.einsum("nkc,kdc->nkd", h, self.B.to(dt)).reshape(-1, self.in_features)
        h = F.linear(h, self.core().to(dt))                                           # [N, out]
        h = torch.einsum("njc,jdc->njd", h.reshape(-1, self.out_features // b, b), self.A.to(dt))
        h = h.reshape(*lead, self.out_features)
        return h if self.bias is None else h + self.bias.to(dt)
