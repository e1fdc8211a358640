"""Kernels for the runtime modules, and the choice among them for a device.

    reference.py            the meaning of every op in plain torch (tests compare against it)
    quant_matmul.py         Triton W4A16 / W8A16 group-quantized matmul (GEMV and GEMM paths)
    sparse_quant_matmul.py  Triton 2:4 + int4 fused matmul (SparseQuantLinear storage)
    gemm.py                 the loop, launch shapes and launcher those two share
    sparse24.py             2:4 fp16 / bf16 through torch's semi-structured sparse tensors
    armor.py                ArmorLinear: batched block matmuls around the 2:4 core

`deploy(model, device)` moves a loaded model to the device and gives every compressed
layer the fastest kernel the device supports: on CUDA the Triton and sparse tensor-core
paths, on CPU the modules' own plain-torch forward ("reference"). A module's `kernel`
names what it runs; `forward` dispatches on it. Triton is imported only when a Triton
kernel is chosen, so the package works without it.
"""
from __future__ import annotations

import importlib.util
import logging
from collections import Counter
from typing import Callable, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

REFERENCE = "reference"


def triton_available(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def _quant_ok(module) -> bool:
    """The Triton kernels take 2/4/8-bit codes with contiguous groups that a K-step of 16 divides."""
    g = module.spec.group_size or module.in_features
    return module.spec.bits in (2, 4, 8) and module.g_idx is None and g % 16 == 0


def choose(module: nn.Module, device: torch.device) -> str:
    """The kernel a runtime module runs on `device`."""
    from compress.nn import ArmorLinear, QuantLinear, SparseQuantLinear

    if isinstance(module, SparseQuantLinear):
        return "triton-2:4+wNa16" if triton_available(device) and _quant_ok(module) else REFERENCE
    if isinstance(module, QuantLinear):
        return "triton-wNa16" if triton_available(device) and _quant_ok(module) else REFERENCE
    if isinstance(module, ArmorLinear):
        return "armor-bmm" if device.type == "cuda" else REFERENCE
    return REFERENCE


def run(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """y = module(x) through module.kernel (not the reference)."""
    k = module.kernel
    if k == "triton-wNa16":
        from compress.kernels.quant_matmul import quant_matmul
        return quant_matmul(x, module.qweight, module.scales, module.qzeros, module.spec.bits,
                            module.spec.group_size, module.bias)
    if k == "triton-2:4+wNa16":
        from compress.kernels.sparse_quant_matmul import sparse24_quant_matmul
        return sparse24_quant_matmul(x, module.qweight, module.pattern, module.scales, module.qzeros,
                                     module.spec.bits, module.spec.group_size, module.bias)
    if k.startswith("armor-bmm"):
        from compress.kernels.armor import armor_matmul
        return armor_matmul(x, module.A, module._core_cache, module.B, module.bias)
    raise ValueError(f"unknown kernel {k!r}")


def _is_24(linear: nn.Linear) -> bool:
    from compress.kernels.sparse24 import why_not
    return why_not(linear.weight) is None


def _decoder_prefix(model: nn.Module) -> Optional[str]:
    """The name prefix of the decoder blocks' modules (compress.models.find_blocks), e.g.
    "transformer.h." or "model.layers."; None when the model has no recognisable decoder
    (e.g. a bare nn.Module without a list of blocks)."""
    from compress.errors import CompressError
    from compress.models import find_blocks

    try:
        prefix, _ = find_blocks(model)
    except CompressError as e:
        log.info("deploy: no decoder blocks, dense linears stay nn.Linear (%s)", e)
        return None
    return prefix + "."


def sparse24_candidates(model: nn.Module, accepts: Callable[[nn.Linear], bool] = _is_24) -> list[str]:
    """Names of the plain nn.Linear inside the decoder blocks that `accepts` takes (by
    default: exact 2:4 and compressible on their device). Only the blocks: the head and
    embeddings, vision towers and projectors stay dense. A model whose blocks cannot be
    found gets none, rather than a guess at which of its linears are the decoder's.
    GPT-2's Conv1D is not an nn.Linear: SparseLinear cannot take it, so it is never a candidate."""
    prefix = _decoder_prefix(model)
    if prefix is None:
        return []
    return [name for name, mod in model.named_modules()
            if type(mod) is nn.Linear and name.startswith(prefix) and accepts(mod)]


def deploy(model: nn.Module, device=None, dtype: Optional[torch.dtype] = None) -> dict:
    """Move `model` to `device` (default: CUDA if present) in `dtype` (default: fp16 on
    CUDA, unchanged on CPU) and pick each compressed layer's kernel. Exact 2:4 linears in
    the decoder blocks become SparseLinear where the device has sparse tensor cores.
    Returns {module name: kernel} for every compressed layer."""
    from compress.nn import PackedLinear
    from compress.nn.sparse_linear import SparseLinear

    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None and device.type == "cuda":
        dtype = torch.float16
    model.to(device=device, **({"dtype": dtype} if dtype else {}))   # packed buffers keep their dtype
    act = dtype or next(model.parameters()).dtype
    chosen = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, PackedLinear):
            mod.kernel = choose(mod, device)
            if mod.kernel == "armor-bmm":
                from compress.kernels.armor import prepare
                mod.kernel = prepare(mod, act)
            chosen[name] = mod.kernel
    if device.type == "cuda":                         # sparse tensor cores for plain 2:4 linears
        for name in sparse24_candidates(model):
            model.set_submodule(name, SparseLinear(model.get_submodule(name)))
            chosen[name] = SparseLinear.kernel
    for (cls, kernel), n in sorted(Counter((type(model.get_submodule(k)).__name__, v)
                                           for k, v in chosen.items()).items()):
        log.info("deploy on %s: %d %s -> %s", device, n, cls, kernel)
    return chosen
