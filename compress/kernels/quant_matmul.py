"""W4A16 (and W8A16) group-quantized matmul in Triton: y = x W_hat^T with the weight
read as packed codes and dequantized in registers, never written out.

Storage is QuantLinear's, unchanged (compress/nn/quant_linear.py):

    qweight [N, K*b/32] int32   32/b codes per word along K, lowest bits first
    scales  [N, G] fp16         one per group of `group_size` inputs
    qzeros  [N, G*b/32] int32   packed like qweight (asymmetric), or None: z = 2^(b-1)

    W_hat[n, k] = (u[n, k] - z[n, k // g]) * s[n, k // g]

The weight tile is tiles.dequant_tile. The loop, the launch shapes (a GEMV path for
decode, M <= 16, and a GEMM path for prefill) and the launcher are shared with the 2:4
kernel: compress/kernels/gemm.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from compress.kernels.gemm import launch


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: Optional[torch.Tensor],
                 bits: int, group_size: Optional[int], bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [..., N] = x [..., K] W_hat^T; the same arguments as reference.quant_matmul."""
    return launch(x, qweight, None, scales, qzeros, bits, group_size, bias)
