"""Writing and reading compressed checkpoints.

An output folder is what plain transformers loads (`AutoModelForCausalLM.from_pretrained`,
safetensors, zeros in place), plus the tokenizer, the resolved recipe and report.json.
A model with runtime modules (QuantLinear, ...) is saved in our native format: their
packed buffers go into the same safetensors files and config.json gains a `compress`
entry naming each module's class and shape, which `load` uses to rebuild them.
It is written into a temporary sibling folder and renamed into place, so a failure never
leaves a half-written output.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from contextlib import contextmanager
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


@contextmanager
def atomic_dir(out_dir: str):
    """Yield a temporary sibling folder of `out_dir`; on success it replaces `out_dir`
    (an existing one only once the new one is complete), on failure it is removed."""
    out = check_output_dir(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
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


def save(out_dir: str, model, tokenizer=None, recipe: Optional[dict] = None, report: Optional[dict] = None,
         dtype: Optional[str] = None) -> Path:
    """Save atomically to `out_dir` (replacing an existing folder only once the new one
    is complete)."""
    from compress.offload import lazy_of, save_lazy

    lazy = lazy_of(model)
    with atomic_dir(out_dir) as tmp:
        record_runtime_modules(model)
        if lazy is not None:   # offloaded: stream the blocks from their sources, one shard each
            if dtype is not None:
                model.config.dtype = getattr(torch, dtype)
            model.config.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            save_lazy(tmp, model, lazy, getattr(torch, dtype) if dtype else None)
        else:
            if dtype is not None:
                model = model.to(getattr(torch, dtype))  # packed codes and scales keep their dtype
            model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_extras(tmp, recipe, report)
    log.info("saved %s", out_dir)
    return check_output_dir(out_dir)


def write_extras(folder: Path, recipe: Optional[dict], report: Optional[dict]) -> None:
    """recipe.yaml, report.json and the training loss curves beside the weights."""
    if recipe is not None:
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    if report is not None:
        write_json(folder / "report.json", report)
        for name, entry in (report.get("training") or {}).items():
            from compress.trainer import plot_loss

            plot_loss(entry["loss_curve"], folder / f"{name}_loss.png", f"{name}: training loss")


def record_runtime_modules(model) -> None:
    """Describe the model's runtime modules in `config.compress` (or drop the entry)."""
    from compress.nn.base import PackedLinear

    modules = {n: m.meta() for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    if modules:
        model.config.compress = {"format": "compress-native", "version": 1, "modules": modules}
    elif hasattr(model.config, "compress"):
        del model.config.compress


def runtime_modules_of(folder: Path) -> dict:
    """{module name: meta} of the packed runtime modules a saved folder's config.json lists."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        return {}
    return (json.loads(cfg.read_text()).get("compress") or {}).get("modules", {})


def _read_tensors(folder: Path, names: set) -> dict:
    """The named tensors from the folder's safetensors file(s) (sharded or not)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    out = {}
    for f in files:
        with safe_open(str(folder / f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys() if k in names})
    return out


def _restore_runtime_modules(model, folder: Path, modules: dict) -> None:
    from compress.nn import RUNTIME

    wanted = {}
    for name, meta in modules.items():
        if meta.get("type") not in RUNTIME:
            raise CompressError(f"load: {name} has unknown module type {meta.get('type')!r}")
        m = RUNTIME[meta["type"]].empty(meta)
        wanted[name] = m
    from compress.models import file_names

    names = file_names(model, {f"{n}.{k}": t for n, m in wanted.items() for k, t in m.state_dict().items()})
    stored = _read_tensors(folder, set(names.values()))
    tensors = {k: stored[f] for k, f in names.items() if f in stored}
    for name, m in wanted.items():
        state = {k: tensors[f"{name}.{k}"] for k in m.state_dict() if f"{name}.{k}" in tensors}
        missing = sorted(set(m.state_dict()) - set(state))
        if missing:
            raise CompressError(f"load: {folder} lacks {name}.{missing[0]}")
        m.load_state_dict(state)
        old = model.get_submodule(name)
        model.set_submodule(name, m.to(next(old.parameters()).device))


def load(path: str, dtype: Optional[torch.dtype] = None, device=None):
    """(model, tokenizer) from an output folder written by `save`; runtime modules
    (QuantLinear, ...) are rebuilt packed, as they were saved.

    With `device`, the model is made deployable there (compress.kernels.deploy): moved
    (in fp16 on CUDA unless `dtype` says otherwise), exact 2:4 linears compressed for
    the sparse tensor cores, and each packed layer given the fastest kernel the device
    runs (the plain-torch reference on CPU)."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from compress.models import auto_class

    p = Path(path)
    if not (p / "config.json").is_file():
        raise CompressError(f"load: {path!r} is not a compress output folder (no config.json)")
    modules = runtime_modules_of(p)
    # With runtime modules, transformers finds no `weight` for those layers (and does not
    # know their packed buffers): silence its report, then swap the modules in.
    verbosity = hf_logging.get_verbosity()
    if modules:
        hf_logging.set_verbosity_error()
    try:
        model = auto_class(AutoConfig.from_pretrained(p)).from_pretrained(p, use_safetensors=True, **({"dtype": dtype} if dtype else {}))
    finally:
        hf_logging.set_verbosity(verbosity)
    _restore_runtime_modules(model, p, modules)
    if device is not None:
        from compress.kernels import deploy
        deploy(model, device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(p) if (p / "tokenizer_config.json").is_file() else None
    return model.eval(), tokenizer
