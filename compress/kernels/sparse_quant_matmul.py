"""2:4 + int4 fused matmul in Triton: y = x W_hat^T from SparseQuantLinear storage, where
only the two kept codes of every group of four inputs and a 3-bit pattern index are
stored (about 3 bits per weight at int4 g64, against 16 for fp16).

    qweight [N, (K/2)*b/32] int32   the kept codes, two per group of 4, in column order
    pattern [N, (K/4)*3/32] int32   index into PAIRS per group of 4, 3 bits each; an index
                                    may straddle two words
    scales, qzeros                  as QuantLinear (groups of g dense input columns)

For dense input k in group q = k // 4 at slot k % 4, with kept slots (p0, p1) = PAIRS[idx[q]]
and kept codes u0 = u[2q], u1 = u[2q+1]:

    W_hat[n, k] = (u0 - z) s  if k % 4 == p0;   (u1 - z) s  if k % 4 == p1;   else 0

The kernel rebuilds each [BK, BN] weight tile in registers from these (the four inputs
of a group load the same words, which the cache serves: every byte comes from memory
once) and feeds it to tl.dot in the loop it shares with quant_matmul (gemm.py). The saving is in
bytes read, which is what bounds decode; the tensor cores still see a dense tile.
"""
from __future__ import annotations

from typing import Optional

import torch

from compress.kernels.gemm import launch


def sparse24_quant_matmul(x: torch.Tensor, qweight: torch.Tensor, pattern: torch.Tensor, scales: torch.Tensor,
                          qzeros: Optional[torch.Tensor], bits: int, group_size: Optional[int],
                          bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [..., N] = x [..., K] W_hat^T; the same arguments as reference.sparse24_quant_matmul."""
    if x.shape[-1] % 4:
        raise ValueError(f"sparse24_quant_matmul: {x.shape[-1]} inputs are not a multiple of 4")
    return launch(x, qweight, pattern, scales, qzeros, bits, group_size, bias)
