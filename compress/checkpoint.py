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
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from compress.errors import CompressError
from compress.reporting import write_extras

log = logging.getLogger(__name__)


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
    is complete). With `dtype`, the weights are written in it as `model.to(dtype)` would
    cast them; the model itself is left as it is."""
    from compress.offload import lazy_of, save_lazy

    started, lazy = time.perf_counter(), lazy_of(model)
    cast = getattr(torch, dtype) if dtype else None
    with atomic_dir(out_dir) as tmp:
        record_runtime_modules(model)
        if lazy is not None:   # offloaded: stream the blocks from their sources, one shard each
            with recorded_dtype(model.config, cast):
                model.config.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            save_lazy(tmp, model, lazy, cast)
        else:
            with recorded_dtype(model.config, cast):
                model.save_pretrained(tmp, safe_serialization=True, state_dict=cast_state(model, cast))
                if cast is not None:   # save_pretrained recorded the model's own dtype, not the one written
                    model.config.dtype = cast
                    model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_extras(tmp, recipe, report, started)
    log.info("saved %s", out_dir)
    return check_output_dir(out_dir)


@contextmanager
def recorded_dtype(config, dtype: Optional[torch.dtype]):
    """`config.dtype` reads `dtype` inside the block (when given), and after it what it read
    before: saving records the saved dtype in the folder, not in the caller's config."""
    was = getattr(config, "dtype", None)
    if dtype is not None:
        config.dtype = dtype
    try:
        yield config
    finally:
        config.dtype = was


def cast_state(model, dtype: Optional[torch.dtype]) -> Optional[dict]:
    """The model's state dict with the tensors `model.to(dtype)` converts (floating ones,
    except the packed buffers of runtime modules) as new tensors in `dtype`; None without
    a dtype. Only what changes dtype is copied, and save_pretrained drops each copy once its
    shard is written. Tensors that share storage (a tied head) share one copy, so
    transformers still sees them tied and stores them once."""
    if dtype is None:
        return None
    from compress.nn.base import PackedLinear

    packed = {f"{n}.{k}" for n, m in model.named_modules() if isinstance(m, PackedLinear) for k in m.PACKED}
    state, copies = {}, {}
    for k, t in model.state_dict().items():
        if k in packed or not t.is_floating_point() or t.dtype == dtype:
            state[k] = t
            continue
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if view not in copies:
            copies[view] = t.detach().to(dtype)
        state[k] = copies[view]
    return state


def record_runtime_modules(model) -> None:
    """Describe the model's runtime modules in `config.compress` (or drop the entry)."""
    from compress.nn import runtime_modules

    modules = {n: m.meta() for n, m in runtime_modules(model).items()}
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


def check_module_types(modules: dict) -> None:
    from compress.nn import RUNTIME

    for name, meta in modules.items():
        if meta.get("type") not in RUNTIME:
            raise CompressError(f"load: {name} has unknown module type {meta.get('type')!r}")


def with_packed_layers(cls, modules: dict):
    """A stand-in subclass of model class `cls` whose __init__ ends by putting empty runtime
    modules where `modules` {name: meta} says. from_pretrained runs __init__ on the meta
    device, so the dense weights of those layers never exist, and then loads the packed
    buffers like any other tensor (renamed as the checkpoint layout needs, and in their own
    dtypes, since they differ from the model's)."""
    from compress.nn import empty_module

    def __init__(self, *args, **kwargs):
        cls.__init__(self, *args, **kwargs)
        for name, meta in modules.items():
            empty = empty_module(meta, self.get_submodule(name))
            self.set_submodule(name, empty)
            for m in [self.get_submodule(name.rpartition(".")[0]), *empty.modules()]:
                skip_init(m)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def skip_init(parent) -> None:
    """Mark the parent of a packed layer as initialized, so from_pretrained never runs the
    model's weight init on it: that init may reach into the layer it held (GPT-2 rescales
    `mlp.c_proj.weight`), which a packed layer does not have. Skipping it loses nothing
    when all the parent's own tensors come from the checkpoint (init skips loaded tensors);
    a parent with a non-persistent buffer, which only init fills, keeps its init."""
    if not parent._non_persistent_buffers_set:
        parent._is_hf_initialized = True


def check_packed_layers(model, folder: Path, modules: dict, missing: set) -> None:
    """Every packed buffer came from the checkpoint, in the dtype the module stores it in."""
    from compress.nn import RUNTIME

    for name, meta in modules.items():
        top = model.get_submodule(name)
        lacking = sorted(k for k in top.state_dict() if f"{name}.{k}" in missing)
        if lacking:
            raise CompressError(f"load: {folder} lacks {name}.{lacking[0]}")
        for sub, m in top.named_modules():
            if not hasattr(m, "PACKED"):
                continue
            with torch.device("meta"):
                like = RUNTIME[m.meta()["type"]].empty(m.meta()).state_dict()
            for k in m.PACKED:
                # A model's keep-in-fp32 rule may have upcast a matching fp16 buffer; fp16
                # values are exact in fp32, so casting back restores them bit for bit.
                if k in like and m._buffers[k].dtype != like[k].dtype:
                    m._buffers[k] = m._buffers[k].to(like[k].dtype)


def load_packed(folder: Path, modules: dict, dtype: Optional[torch.dtype]):
    """The model of a folder with runtime modules, built so that peak memory is about the
    checkpoint's size: no dense weight is made (and randomly initialised) for a packed layer."""
    from transformers import AutoConfig
    from transformers.models.auto.auto_factory import _get_model_class

    from compress.models import auto_class

    check_module_types(modules)
    config = AutoConfig.from_pretrained(folder)
    cls = _get_model_class(config, auto_class(config)._model_mapping)   # what the Auto class would build
    model, info = with_packed_layers(cls, modules).from_pretrained(
        folder, use_safetensors=True, output_loading_info=True, **({"dtype": dtype} if dtype else {}))
    model.__class__ = cls   # the stand-in only built the skeleton; it adds no state
    check_packed_layers(model, folder, modules, set(info["missing_keys"]))
    return model


def load(path: str, dtype: Optional[torch.dtype] = None, device=None):
    """(model, tokenizer) from an output folder written by `save`; runtime modules
    (QuantLinear, ...) are rebuilt packed, as they were saved, without ever building the
    dense layers they replace.

    With `device`, the model is made deployable there (compress.deploy): moved
    (in fp16 on CUDA unless `dtype` says otherwise), exact 2:4 linears compressed for
    the sparse tensor cores, and each packed layer given the fastest kernel the device
    runs (the plain-torch reference on CPU)."""
    from transformers import AutoConfig, AutoTokenizer

    from compress.models import auto_class

    p = Path(path)
    if not (p / "config.json").is_file():
        raise CompressError(f"load: {path!r} is not a compress output folder (no config.json)")
    modules = runtime_modules_of(p)
    if modules:
        model = load_packed(p, modules, dtype)
    else:
        model = auto_class(AutoConfig.from_pretrained(p)).from_pretrained(
            p, use_safetensors=True, **({"dtype": dtype} if dtype else {}))
    if device is not None:
        from compress.deploy import deploy
        deploy(model, device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(p) if (p / "tokenizer_config.json").is_file() else None
    return model.eval(), tokenizer
