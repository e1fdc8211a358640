"""W4A16 (and W8A16) group-quantized matmul in Triton: y = x W_hat^T with the weight
read as packed codes and dequantized in registers, never written out.

Storage is QuantLinear's, unchanged (compress/nn/quant_linear.py):

    qweight [N, K*b/32] int32   32/b codes per word along K, lowest bits first
    scales  [N, G] fp16         one per group of `group_size` inputs
    qzeros  [N, G*b/32] int32   packed like qweight (asymmetric), or None: z = 2^(b-1)

    W_hat[n, k] = (u[n, k] - z[n, k // g]) * s[n, k // g]

The loop, the launch shapes (a GEMV path for decode, M <= 16, and a GEMM path for
prefill) and the launcher are shared with the 2:4 kernel: compress/kernels/gemm.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, z_ptr, rk, rn, k0, N, K, stride_qn, stride_sn, stride_zn,
                  GROUP: tl.constexpr, BITS: tl.constexpr, SYM: tl.constexpr):
    """W_hat^T tile [BK, BN] fp32 for inputs rk [BK] and outputs rn [BN]; k0 starts the step."""
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    inside = (rk < K)[:, None] & (rn < N)[None, :]
    words = tl.load(qw_ptr + rn[None, :] * stride_qn + (rk // PER)[:, None], mask=inside, other=0)
    u = (words >> ((rk % PER) * BITS)[:, None]) & MASK                       # [BK, BN] codes
    g = k0 // GROUP                                                         # one group per step
    s = tl.load(s_ptr + rn * stride_sn + g, mask=rn < N, other=0.0).to(tl.float32)   # [BN]
    if SYM:
        z = tl.full(s.shape, 1 << (BITS - 1), tl.int32)
    else:
        zw = tl.load(z_ptr + rn * stride_zn + g // PER, mask=rn < N, other=0)
        z = (zw >> ((g % PER) * BITS)) & MASK
    return (u - z[None, :]).to(tl.float32) * s[None, :]


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: Optional[torch.Tensor],
                 bits: int, group_size: Optional[int], bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [..., N] = x [..., K] W_hat^T; the same arguments as reference.quant_matmul."""
    from compress.kernels.gemm import launch
    return launch(x, qweight, None, scales, qzeros, bits, group_size, bias)
