"""Writing and reading compressed checkpoints.

An output folder is what plain transformers loads (`AutoModelForCausalLM.from_pretrained`,
safetensors, zeros in place), plus the tokenizer, the resolved recipe and report.json.
It is written into a temporary sibling folder and renamed into place, so a failure never
leaves a half-written output.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
import yaml

from compress.errors import CompressError

log = logging.getLogger(__name__)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def check_output_dir(out_dir: str) -> Path:
    """The resolved output path; an existing non-folder there is a CompressError."""
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise CompressError(f"output.dir: {out_dir!r} exists and is not a folder")
    return out


def save(out_dir: str, model, tokenizer=None, recipe: Optional[dict] = None, report: Optional[dict] = None,
         dtype: Optional[str] = None) -> Path:
    """Save atomically to `out_dir` (replacing an existing folder only once the new one
    is complete)."""
    out = check_output_dir(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if dtype is not None:
            model = model.to(getattr(torch, dtype))
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if recipe is not None:
            (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        if report is not None:
            write_json(tmp / "report.json", report)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            out.rename(old / "x")
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %s", out)
    return out


def load(path: str, dtype: Optional[torch.dtype] = None):
    """(model, tokenizer) from an output folder written by `save`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not (p / "config.json").is_file():
        raise CompressError(f"load: {path!r} is not a compress output folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(p, **({"dtype": dtype} if dtype else {}))
    tokenizer = AutoTokenizer.from_pretrained(p) if (p / "tokenizer_config.json").is_file() else None
    return model.eval(), tokenizer
