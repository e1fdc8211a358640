"""Runtime modules: what a compressed layer becomes in the saved and loaded model.

A packing pass leaves a result on its layer (quantize.QuantResult, GroupSparseResult,
ArmorResult): plain tensors, with `dequantize()` equal to the weight the block was
calibrated with. `module_for` turns it into the module that stores it packed.
"""
from typing import Optional

import torch

from compress.nn.armor_linear import ArmorLinear, ArmorResult
from compress.fp_formats import FPSpec
from compress.nn.base import RUNTIME, PackedLinear
from compress.nn.fp_linear import FPLinear
from compress.nn.ggml_linear import GGMLLinear
from compress.nn.gqsa_linear import GQSALinear, GroupSparseResult
from compress.nn.packed_experts import PackedExperts
from compress.nn.quant_linear import QuantLinear
from compress.nn.sparse_quant_linear import SparseQuantLinear
from compress.quantize import QuantResult

__all__ = ["RUNTIME", "ArmorLinear", "FPLinear", "GGMLLinear", "GQSALinear", "PackedExperts", "PackedLinear", "QuantLinear",
           "SparseQuantLinear", "empty_module", "module_for", "runtime_modules"]


def module_for(result, bias: Optional[torch.Tensor] = None) -> PackedLinear:
    """The runtime module that stores a packing pass's result (with the layer's bias).
    An exact 2:4 quantized weight with contiguous groups keeps only its kept half
    (SparseQuantLinear); a weight on a llama.cpp grid keeps that format's bytes; one in
    a floating-point format (NVFP4, MXFP4, FP8) its codes and scales (FPLinear)."""
    if isinstance(result, QuantResult) and isinstance(result.spec, FPSpec):
        cls = FPLinear
    elif isinstance(result, QuantResult) and result.raw is not None:
        cls = GGMLLinear
    elif isinstance(result, QuantResult):
        cls = SparseQuantLinear if result.sparse24 and result.g_idx is None else QuantLinear
    elif isinstance(result, GroupSparseResult):
        cls = GQSALinear
    elif isinstance(result, ArmorResult):
        cls = ArmorLinear
    else:
        raise TypeError(f"module_for: no runtime module stores a {type(result).__name__}")
    return cls.from_result(result, bias)


def runtime_modules(model: torch.nn.Module) -> dict:
    """{name: module} of the runtime modules in `model`: packed linears, and fused experts
    stored per expert (PackedExperts, whose per-expert modules its own meta records, so
    they are not listed again)."""
    out, inside = {}, []
    for n, m in model.named_modules():
        if isinstance(m, (PackedLinear, PackedExperts)) and not any(n.startswith(f"{p}.") for p in inside):
            out[n] = m
            if isinstance(m, PackedExperts):
                inside.append(n)
    return out


def empty_module(meta: dict, old: torch.nn.Module) -> torch.nn.Module:
    """An unfilled runtime module of `meta` to stand where `old` is; a PackedExperts
    wraps `old`, the model's own experts module (its forward is the model's)."""
    kind = RUNTIME[meta["type"]]
    return kind.empty(meta, old) if getattr(kind, "replaces_experts", False) else kind.empty(meta)
