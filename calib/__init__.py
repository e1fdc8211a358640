"""Calibration data: token windows that compression passes run through the model.

    cfg = CalibConfig(source="c4", nsamples=128, seqlen=2048, seed=0)
    ids = load_calibration(cfg, tokenizer)            # LongTensor [128, 2048]

Sources: c4 | wikitext2 (benchmark text, local folder or hub), text (a plain text
file), jsonl (one JSON object per line, string field `field`), self (the model writes
its own text; data-free). The same config and seed always give the same token ids.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from compress.config import build_config
from compress.errors import CompressError

from .selfgen import generate_self
from .sources import (ENV_VAR, canonical_split, load_rows, load_text, read_jsonl,
                      resolve_data_dir)
from .windows import sample_windows, training_windows

__all__ = ["CalibConfig", "load_calibration", "load_training", "load_text", "resolve_data_dir", "ENV_VAR"]

log = logging.getLogger(__name__)

SOURCES = ("c4", "wikitext2", "text", "jsonl", "self")
_DEFAULT_SPLIT = {"c4": "train", "wikitext2": "train"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class CalibConfig:
    """The `calib:` section of a recipe."""

    source: str = "self"            # c4 | wikitext2 | text | jsonl | self
    nsamples: int = 128             # number of sequences
    seqlen: int = 512               # tokens per sequence
    seed: int = 0
    path: Optional[str] = None      # file for text / jsonl
    field: str = "text"             # jsonl: which string field holds the text
    data_dir: Optional[str] = None  # folder like shared/data; else $COMPRESS_DATA_DIR; else hub
    split: Optional[str] = None     # c4 / wikitext2 split; default 'train'

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]]) -> "CalibConfig":
        """Build from a recipe mapping; unknown keys are an error naming the key."""
        cfg = build_config(cls, None if data is None else dict(data), "calib")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise CompressError (naming the field) on a bad value."""
        if self.source not in SOURCES:
            raise CompressError(f"calib.source: expected one of {', '.join(SOURCES)}, "
                                f"got {self.source!r}")
        for name in ("nsamples", "seqlen"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise CompressError(f"calib.{name}: expected a positive integer, got {value!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise CompressError(f"calib.seed: expected a non-negative integer, got {self.seed!r}")
        if not isinstance(self.field, str) or not self.field:
            raise CompressError(f"calib.field: expected a non-empty string, got {self.field!r}")
        if self.data_dir is not None and not isinstance(self.data_dir, (str, os.PathLike)):
            raise CompressError(f"calib.data_dir: expected a folder path, got {self.data_dir!r}")
        if self.split is not None and not isinstance(self.split, str):
            raise CompressError(f"calib.split: expected a string, got {self.split!r}")
        if self.source in _DEFAULT_SPLIT:
            canonical_split(self.source, self.split or _DEFAULT_SPLIT[self.source], "calib.split")
        elif self.split is not None:
            log.warning("calib.split is ignored for source %r", self.source)
        if self.source in ("text", "jsonl"):
            if not self.path or not isinstance(self.path, (str, os.PathLike)):
                raise CompressError(f"calib.path: required for source {self.source!r} "
                                    f"(the {self.source} file to read), got {self.path!r}")
            if not Path(self.path).expanduser().is_file():
                raise CompressError(f"calib.path: file not found: {self.path}")


def _documents(cfg: CalibConfig) -> list:
    """The documents a non-`self` source samples from."""
    if cfg.source == "c4":
        return load_rows("c4", cfg.split or "train", cfg.data_dir, prefix="calib.")
    if cfg.source == "wikitext2":
        # One document: GPTQ samples windows of the whole "\n\n"-joined split.
        return [load_text("wikitext2", cfg.split or "train", cfg.data_dir, prefix="calib.")]
    path = Path(cfg.path).expanduser()
    if cfg.source == "jsonl":
        return read_jsonl(path, cfg.field, field="calib.field")
    return [path.read_text(encoding="utf-8")]  # text: the whole file is one document


def load_calibration(cfg: CalibConfig, tokenizer, model=None) -> torch.LongTensor:
    """Calibration token ids -> LongTensor [cfg.nsamples, cfg.seqlen] (on the CPU).

    `model` is needed only for source 'self'. Deterministic for a given config.
    """
    cfg.validate()
    if cfg.source == "self":
        if model is None:
            raise CompressError("calib.source: 'self' needs the model to generate text; "
                                "no model was given")
        ids = generate_self(model, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed)
    else:
        name = f"{cfg.source} {cfg.split or _DEFAULT_SPLIT.get(cfg.source, '')}".strip()
        if cfg.source in ("text", "jsonl"):
            name = f"{cfg.source} {Path(cfg.path).name}"
        ids = sample_windows(_documents(cfg), tokenizer, cfg.nsamples, cfg.seqlen,
                             cfg.seed, name)
    assert ids.shape == (cfg.nsamples, cfg.seqlen), ids.shape
    return ids


def _same_text(a: CalibConfig, b: CalibConfig) -> bool:
    keys = ("source", "path", "field", "data_dir")
    return all(getattr(a, k) == getattr(b, k) for k in keys) and \
        (a.split or _DEFAULT_SPLIT.get(a.source)) == (b.split or _DEFAULT_SPLIT.get(b.source))


def load_training(cfg: CalibConfig, tokenizer, exclude: Optional[CalibConfig] = None,
                  model=None) -> torch.LongTensor:
    """Training token ids [<= cfg.nsamples, cfg.seqlen]: documents packed into windows
    (see `training_windows`), leaving out the text that `exclude` (the run's calibration
    config) drew its windows from when both read the same source. Source 'self'
    generates fresh text (seed + 1 when the calibration was generated with the same seed)."""
    cfg.validate()
    if cfg.source == "self":
        if model is None:
            raise CompressError("perp.data.source: 'self' needs the model to generate text")
        clash = exclude is not None and exclude.source == "self" and exclude.seed == cfg.seed
        return generate_self(model, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed + 1 if clash else cfg.seed)
    name = f"{cfg.source} {cfg.split or _DEFAULT_SPLIT.get(cfg.source, '')}".strip()
    skip = None
    if exclude is not None and _same_text(cfg, exclude):
        skip = (exclude.nsamples, exclude.seqlen, exclude.seed)
    return training_windows(_documents(cfg), tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed, name, skip)
