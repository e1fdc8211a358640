"""NVFP4 / MXFP4 / FP8 weight-only matmul in Triton: y = x W_hat^T with the weight read
in FPLinear's storage (compress/nn/fp_linear.py, compressed-tensors' layouts) and
decoded in registers, never written out.

    format  qweight                        scales                       global_scale
    nvfp4   uint8 [N, K/2]: two E2M1       uint8 [N, K/16]: E4M3 bits   fp32 [1]: g
            codes a byte, even column low  of S = scale * g
    mxfp4   as nvfp4                       uint8 [N, K/32]: 127 + e     -
    fp8     uint8 [N, K]: E4M3 bits        fp32 [N, 1]: s               -

    W_hat[n, k] = value(u[n, k]) * scale[n, k // group],  scale = e4m3(S) / g | 2^(e-127) | s

The weight tile is tiles.fp_tile: it decodes E2M1 and E4M3 codes by exponent / mantissa
arithmetic (tiles.minifloat), not a table. The loop, the launch shapes (GEMV with
split-K for decode, GEMM for prefill) and the launcher are the integer kernels'
(gemm.py); the K-step is 16 for NVFP4's groups of 16, 32 for MXFP4's, and unbounded
by fp8's per-row scales.
"""
from __future__ import annotations

from typing import Optional

import torch

from compress.fp_formats import FORMATS
from compress.kernels.gemm import launch


def fp_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, global_scale: Optional[torch.Tensor],
              fmt: str, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [..., N] = x [..., K] W_hat^T; the same arguments as reference.fp_matmul."""
    if fmt not in FORMATS:
        raise ValueError(f"fp_matmul: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    bits, group, _ = FORMATS[fmt]
    K = x.shape[-1]
    if qweight.dtype != torch.uint8 or qweight.shape[1] * 8 != K * bits:
        raise ValueError(f"fp_matmul: {fmt} qweight {tuple(qweight.shape)} {qweight.dtype} does not hold {K} inputs")
    if (fmt == "nvfp4") != (global_scale is not None):
        raise ValueError("fp_matmul: nvfp4, and only nvfp4, takes a global scale")
    return launch(x, qweight, None, scales, global_scale, bits, group, bias, fmt=fmt)
