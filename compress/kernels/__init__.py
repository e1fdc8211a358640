"""Kernels: functions on tensors that compute what the runtime modules compute, fast.
They take codes, scales and activations and return activations; they know no module
class (compress.deploy binds them onto the modules).

    reference.py            the meaning of every op in plain torch (tests compare against it)
    quant_matmul.py         Triton W4A16 / W8A16 group-quantized matmul (GEMV and GEMM paths)
    sparse_quant_matmul.py  Triton 2:4 + int4 fused matmul (SparseQuantLinear storage)
    fp_matmul.py            Triton NVFP4 / MXFP4 / FP8 weight-only matmul (FPLinear storage)
    gemm.py                 the loop, launch shapes and launcher those three share
    tiles.py                the weight-tile functions of the three Triton kernels
    sparse24.py             2:4 fp16 / bf16 through torch's semi-structured sparse tensors
    armor.py                ARMOR's batched block matmuls around the 2:4 core

Triton is imported only by the Triton files, so the package works without it.
"""
from __future__ import annotations

import importlib.util

import torch


def triton_available(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None
