"""Plain transformers safetensors: every layer a dense weight, zeros in place.

`AutoModelForCausalLM.from_pretrained(out)` loads it with no code of ours. Runtime
modules (quantized, ARMOR, GQSA) become nn.Linear holding their effective weight in
`dtype`: this format's whole point is that it holds nothing but dense tensors.
"""
from __future__ import annotations

from pathlib import Path

import torch

from compress.export.fold import fold_packed


def write(model, tokenizer, folder: Path, cfg) -> dict:
    dtype = getattr(torch, cfg.dtype)
    folded = fold_packed(model, dtype)
    model.to(dtype)
    if hasattr(model.config, "compress"):
        del model.config.compress             # no runtime modules are left
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return {"folded": folded}
