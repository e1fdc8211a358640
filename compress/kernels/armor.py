"""ARMOR's fast path: y = A (S (B x)) as a batched b x b matmul, the 2:4 core matmul,
and another batched b x b matmul; W_hat = A S B is never formed.

The core S [out, in] comes in unpacked, in the activation dtype: compressed for the
sparse tensor cores where the device takes it (compress/kernels/sparse24.py), dense
otherwise (compress.deploy prepares it once per module). The meaning is
reference.armor_matmul.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def block_rows(h: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """h [N, n*b] -> h with each b-slice k multiplied by blocks[k]: (blocks[k] @ h_k^T)^T."""
    N = h.shape[0]
    n, b, _ = blocks.shape
    hk = h.reshape(N, n, b).transpose(0, 1)                        # [n, N, b]
    return torch.bmm(hk, blocks.transpose(1, 2)).transpose(0, 1).reshape(N, n * b)


def armor_matmul(x: torch.Tensor, A: torch.Tensor, core: torch.Tensor, B: torch.Tensor,
                 bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [..., out] = x [..., in] (A S B)^T; core is S, dense or compressed."""
    lead, dt = x.shape[:-1], x.dtype
    h = block_rows(x.reshape(-1, x.shape[-1]), B.to(dt))           # B x        [N, in]
    h = F.linear(h, core)                                          # S (B x)    [N, out]
    h = block_rows(h, A.to(dt))                                    # A S B x    [N, out]
    if bias is not None:
        h = h + bias.to(dt)
    return h.reshape(*lead, h.shape[-1])
