"""2:4 sparse fp16 / bf16 matmul on NVIDIA sparse tensor cores, through PyTorch's
semi-structured sparse tensors (cuSPARSELt where torch ships it, CUTLASS otherwise).

`compress_weight` turns an exact 2:4 weight W [out, in] into its compressed form once,
at load: the kept half of the values [out, in/2] plus 2-bit position metadata, which
the sparse tensor cores read directly. F.linear with it computes y = x W^T at up to
twice the dense math rate (prefill) and reads about 9/16 of the bytes (decode).
The meaning is reference.sparse24_matmul.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def why_not(W: torch.Tensor) -> Optional[str]:
    """None if W can be compressed for the sparse tensor cores, else the reason."""
    if W.device.type != "cuda":
        return "needs a CUDA device"
    return why_not_layout(W)


def why_not_layout(W: torch.Tensor) -> Optional[str]:
    """`why_not` without the device: dtype, shape and the 2:4 pattern, checkable on CPU."""
    if W.dtype not in (torch.float16, torch.bfloat16):
        return f"needs fp16 or bf16 weights, not {W.dtype}"
    out, d_in = W.shape
    if out % 64 or d_in % 64:
        return f"shape {out}x{d_in} is not a multiple of 64 in both dimensions"
    if d_in % 4 or int((W.reshape(out, d_in // 4, 4) != 0).sum(-1).max()) > 2:
        return "weight is not 2:4 sparse"
    return None


def compress_weight(W: torch.Tensor) -> torch.Tensor:
    """Exact 2:4 W [out, in] (CUDA, fp16/bf16) -> a semi-structured sparse tensor."""
    from torch.sparse import to_sparse_semi_structured

    reason = why_not(W)
    if reason:
        raise ValueError(f"2:4 compression: {reason}")
    return to_sparse_semi_structured(W.detach().contiguous())


def sparse24_matmul(x: torch.Tensor, Ws: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [..., out] = x [..., in] W^T for a weight compressed by compress_weight."""
    lead = x.shape[:-1]
    y = F.linear(x.reshape(-1, x.shape[-1]), Ws, bias)
    return y.reshape(*lead, y.shape[-1])
