"""SparseLinear: an nn.Linear whose exact 2:4 weight is kept compressed for the sparse
tensor cores (compress/kernels/sparse24.py). Built by `compress.deploy.deploy` on a
CUDA device from a plain nn.Linear; a 2:4 model is saved as plain linears with zeros in
place, so there is nothing of its own to save or load.
"""
from __future__ import annotations

import torch
from torch import nn

from compress.kernels.sparse24 import compress_weight, sparse24_matmul


class SparseLinear(nn.Module):
    kernel = "2:4"      # the instance's: "cusparselt-2:4" or "cutlass-2:4", whichever torch chose

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        W = compress_weight(linear.weight)
        self.kernel = ("cutlass" if "CUTLASS" in type(W).__name__ else "cusparselt") + "-2:4"
        self.weight = nn.Parameter(W, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse24_matmul(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"
