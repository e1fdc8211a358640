"""Deploying a loaded model on a device: each compressed layer gets the fastest kernel
the device runs.

Kernels (compress/kernels) are functions on tensors and know no module; the runtime
modules (compress/nn) know no kernel. This module joins them: `choose` names the kernel
a module can run on a device, and `bind` makes the module's forward call it, through
`module.impl(module, x)`, with `module.kernel` naming it for reports. On CUDA that is
the Triton and sparse tensor-core paths; on CPU every module keeps its own plain-torch
forward ("reference"). Triton is imported only when a bound Triton kernel first runs,
so the package works without it.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Callable, Optional

import torch
from torch import nn

from compress.errors import CompressError
from compress.kernels import triton_available
from compress.kernels.sparse24 import compress_weight, why_not
from compress.models import find_blocks
from compress.nn import ArmorLinear, FPLinear, PackedLinear, QuantLinear, SparseQuantLinear
from compress.nn.sparse_linear import SparseLinear

log = logging.getLogger(__name__)

REFERENCE = "reference"


def _quant(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    from compress.kernels.quant_matmul import quant_matmul
    return quant_matmul(x, m.qweight, m.scales, m.qzeros, m.spec.bits, m.spec.group_size, m.bias)


def _sparse_quant(m: SparseQuantLinear, x: torch.Tensor) -> torch.Tensor:
    from compress.kernels.sparse_quant_matmul import sparse24_quant_matmul
    return sparse24_quant_matmul(x, m.qweight, m.pattern, m.scales, m.qzeros, m.spec.bits, m.spec.group_size, m.bias)


def _fp(m: FPLinear, x: torch.Tensor) -> torch.Tensor:
    from compress.kernels.fp_matmul import fp_matmul
    return fp_matmul(x, m.qweight, m.scales, m.global_scale, m.fmt, m.bias)


def _armor(m: ArmorLinear, x: torch.Tensor) -> torch.Tensor:
    from compress.kernels.armor import armor_matmul
    return armor_matmul(x, m.A, m.prepared_core, m.B, m.bias)


# kernel name -> impl(module, x): what a bound module's forward runs
KERNELS: dict[str, Callable] = {"triton-wNa16": _quant, "triton-2:4+wNa16": _sparse_quant, "triton-fp": _fp,
                                "armor-bmm": _armor, "armor-bmm+2:4": _armor}


def _quant_ok(module) -> bool:
    """The Triton kernels take 2/4/8-bit codes with contiguous groups that a K-step of 16 divides."""
    g = module.spec.group_size or module.in_features
    return module.spec.bits in (2, 4, 8) and module.g_idx is None and g % 16 == 0


def choose(module: nn.Module, device: torch.device) -> str:
    """The kernel a runtime module runs on `device`."""
    if isinstance(module, SparseQuantLinear):
        return "triton-2:4+wNa16" if triton_available(device) and _quant_ok(module) else REFERENCE
    if isinstance(module, QuantLinear):
        return "triton-wNa16" if triton_available(device) and _quant_ok(module) else REFERENCE
    if isinstance(module, FPLinear):                  # NVFP4 / MXFP4 / FP8: every shape FPLinear stores
        return "triton-fp" if triton_available(device) else REFERENCE
    if isinstance(module, ArmorLinear):
        return "armor-bmm" if device.type == "cuda" else REFERENCE
    return REFERENCE


def bind(module: PackedLinear, kernel: str, dtype: Optional[torch.dtype] = None) -> str:
    """Make `module`'s forward run `kernel` (REFERENCE: its own plain-torch forward).
    ARMOR's kernels need the 2:4 core unpacked once, in the activation dtype `dtype`:
    it becomes the module's `prepared_core` buffer, compressed for the sparse tensor
    cores where the device takes it ("armor-bmm+2:4"), dense otherwise. Returns the
    kernel bound."""
    if kernel != REFERENCE and kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; known: {', '.join(KERNELS)}")
    if kernel.startswith("armor-bmm"):
        S = module.core().to(dtype or module.A.dtype)                # [out, in], exact 2:4
        sparse = why_not(S) is None
        module.prepared_core = compress_weight(S) if sparse else S
        kernel = "armor-bmm+2:4" if sparse else "armor-bmm"
    module.impl = KERNELS.get(kernel)
    module.kernel = kernel
    return kernel


def _decoder_prefix(model: nn.Module) -> Optional[str]:
    """The name prefix of the decoder blocks' modules (compress.models.find_blocks), e.g.
    "transformer.h." or "model.layers."; None when the model has no recognisable decoder
    (e.g. a bare nn.Module without a list of blocks)."""
    try:
        prefix, _ = find_blocks(model)
    except CompressError as e:
        log.info("deploy: no decoder blocks, dense linears stay nn.Linear (%s)", e)
        return None
    return prefix + "."


def _is_24(linear: nn.Linear) -> bool:
    return why_not(linear.weight) is None


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
    CUDA, unchanged on CPU) and bind each compressed layer's kernel. Exact 2:4 linears in
    the decoder blocks become SparseLinear where the device has sparse tensor cores.
    Returns {module name: kernel} for every compressed layer."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None and device.type == "cuda":
        dtype = torch.float16
    model.to(device=device, **({"dtype": dtype} if dtype else {}))   # packed buffers keep their dtype
    act = dtype or next(model.parameters()).dtype
    chosen = {name: bind(mod, choose(mod, device), act)
              for name, mod in list(model.named_modules()) if isinstance(mod, PackedLinear)}
    if device.type == "cuda":                         # sparse tensor cores for plain 2:4 linears
        for name in sparse24_candidates(model):
            fast = SparseLinear(model.get_submodule(name))
            model.set_submodule(name, fast)
            chosen[name] = fast.kernel
    for (cls, kernel), n in sorted(Counter((type(model.get_submodule(k)).__name__, v)
                                           for k, v in chosen.items()).items()):
        log.info("deploy on %s: %d %s -> %s", device, n, cls, kernel)
    return chosen
