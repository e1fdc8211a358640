"""Runtime modules: what a compressed layer becomes in the saved and loaded model.

A packing pass leaves a result on its layer (quantize.QuantResult, GroupSparseResult,
ArmorResult): plain tensors, with `dequantize()` equal to the weight the block was
calibrated with. `module_for` turns it into the module that stores it packed.
"""
from typing import Optional

import torch

from compress.nn.armor_linear import ArmorLinear, ArmorResult
from compress.nn.base import RUNTIME, PackedLinear
from compress.nn.gqsa_linear import GQSALinear, GroupSparseResult
from compress.nn.packed_experts import PackedExperts
from compress.nn.quant_linear import QuantLinear
from compress.nn.sparse_quant_linear import SparseQuantLinear
from compress.quantize import QuantResult

__all__ = ["RUNTIME", "ArmorLinear", "GQSALinear", "PackedExperts", "PackedLinear", "QuantLinear",
           "SparseQuantLinear", "module_for"]


def module_for(result, bias: Optional[torch.Tensor] = None) -> PackedLinear:
    """The runtime module that stores a packing pass's result (with the layer's bias).
    An exact 2:4 quantized weight with contiguous groups keeps only its kept half
    (SparseQuantLinear)."""
    if isinstance(result, QuantResult):
        cls = SparseQuantLinear if result.sparse24 and result.g_idx is None else QuantLinear
    elif isinstance(result, GroupSparseResult):
        cls = GQSALinear
    elif isinstance(result, ArmorResult):
        cls = ArmorLinear
    else:
        raise TypeError(f"module_for: no runtime module stores a {type(result).__name__}")
    return cls.from_result(result, bias)
