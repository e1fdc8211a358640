"""Export a compressed model to a serving format; one file per format.

    compress export IN_DIR --format compressed-tensors OUT_DIR
    output: {dir: out/x, format: gguf, gguf_type: Q8_0}          (in a recipe)

    hf                  plain transformers safetensors, every layer a dense weight in
                        `dtype` (fp16 by default): what any loader reads
    compressed-tensors  what vLLM loads: group / channel int4 and int8 as pack-quantized,
                        sparsity as metadata (`dense`) or, for 2:4, `sparse-24-bitmask`
    gguf                llama.cpp: F16, Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K (Q4_1, Q5_1)
                        tensors with the architecture and tokenizer metadata; layers
                        quantized on a llama.cpp grid keep their own blocks

A format that cannot express a layer (an ArmorLinear in compressed-tensors, say) is
refused with the layer's name, unless `fold: true` asks to store its effective weight
densely (export/fold.py). Output folders are written atomically, with an `export.json`
that records what was written and its size.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from compress.errors import CompressError

log = logging.getLogger(__name__)

FORMATS = ("hf", "compressed-tensors", "gguf")
GGUF_TYPES = ("F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


@dataclass
class ExportConfig:
    """`output: {format: ..., ...}` in a recipe; the options of `compress export`."""

    format: str = "hf"
    dtype: str = "float16"           # dense tensors: float16 | bfloat16 | float32
    fold: bool = False               # store layers the format cannot express as dense weights
    sparse_format: str = "dense"     # compressed-tensors, unquantized 2:4 layers: dense | bitmask
    gguf_type: str = "Q8_0"          # gguf: F16 | Q8_0 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q4_K | Q5_K | Q6_K

    def validate(self) -> None:
        allowed = {"format": FORMATS, "dtype": ("float16", "bfloat16", "float32"),
                   "sparse_format": ("dense", "bitmask"), "gguf_type": GGUF_TYPES}
        for key, values in allowed.items():
            if getattr(self, key) not in values:
                raise CompressError(f"output.{key}: expected one of {', '.join(values)}, got {getattr(self, key)!r}")
        if not isinstance(self.fold, bool):
            raise CompressError(f"output.fold: expected true or false, got {self.fold!r}")


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def export(model, tokenizer, out_dir: str, cfg: ExportConfig, report: Optional[dict] = None,
           recipe: Optional[dict] = None, inplace: bool = False) -> Path:
    """Write `model` in format cfg.format to out_dir. The writers fold, cast and swap
    layers; that happens on a copy unless `inplace` (for a model no longer needed)."""
    import copy

    from compress.checkpoint import atomic_dir
    from compress.reporting import write_extras, write_json

    cfg.validate()
    started = time.perf_counter()
    if not inplace:
        model = copy.deepcopy(model)
    if cfg.format == "gguf":
        from compress.export.gguf import write
    elif cfg.format == "compressed-tensors":
        from compress.export.compressed_tensors import write
    else:
        from compress.export.hf import write
    with atomic_dir(out_dir) as tmp:
        info = write(model, tokenizer, tmp, cfg)
        write_extras(tmp, recipe, report, started)
        info = {"format": cfg.format, **asdict(cfg), **info, "bytes": folder_bytes(tmp)}
        write_json(tmp / "export.json", info)
    log.info("exported %s (%s, %.1f MiB)", out_dir, cfg.format, info["bytes"] / 2**20)
    return Path(out_dir).resolve()


def export_folder(in_dir: str, out_dir: str, cfg: ExportConfig) -> Path:
    """`compress export IN_DIR`: load a compress output folder (or any model spec) and export it."""
    import json

    from compress.checkpoint import load
    from compress.loading import load_model

    cfg.validate()
    src = Path(in_dir)
    if (src / "config.json").is_file():
        model, tokenizer = load(str(src))
    else:
        model, tokenizer = load_model(in_dir)
    report = json.loads((src / "report.json").read_text()) if (src / "report.json").is_file() else None
    return export(model, tokenizer, out_dir, cfg, report=report, inplace=True)
