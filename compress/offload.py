"""Offloaded models: the decoder blocks' weights stay on disk until the runner needs one.

`load_lazy(folder)` builds the model with its blocks' parameters on the meta device
(no memory) and everything else (embeddings, final norm, head, rotary tables) real.
The runner asks `LazyBlocks.load(i)` for block i just before compressing it, and
`release(i)` after its compressed state is saved to the run folder, which then becomes
that block's source. So only one block is ever materialized, beside the calibration
activations, and host memory stays flat in the model's depth. `save_lazy` writes the
output one block per shard, reading each back from its source.

    sources[i] = (safetensors file, {tensor name in file: name in block}, runtime metas)
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compress.errors import CompressError

log = logging.getLogger(__name__)


class LazyBlocks:
    def __init__(self, model, prefix: str, blocks, sources: dict, dtype: torch.dtype, fused: Optional[dict] = None):
        self.model, self.prefix, self.blocks, self.sources, self.dtype = model, prefix, blocks, sources, dtype
        self.fused = fused or {}   # {block: [fused parameter stored per expert in the source]}

    def point(self, i: int, file: Path, names: dict, metas: dict) -> None:
        """Block i's current weights are `names` {name in file: name in block} in `file`."""
        self.sources[i] = (Path(file), names, metas)
        self.fused[i] = []   # a saved block stores its tensors under the block's own names

    def state(self, i: int) -> dict:
        """Block i's tensors {name in block: tensor}, read from its source. Fused experts
        that the checkpoint stores per expert (Mixtral's ...experts.{e}.w1.weight) are
        put together as transformers' loading does (`_fused`)."""
        file, names, _ = self.sources[i]
        with safe_open(str(file), framework="pt") as f:
            out = {dst: f.get_tensor(src) for src, dst in names.items()}
            for rel in self.fused.get(i, ()):
                out[rel] = _fused(self.model, f"{self.prefix}.{i}.{rel}", self.blocks[i].get_parameter(rel).shape, f)
        return out

    def load(self, i: int) -> None:
        """Materialize block i (on the CPU) from its source, in the model's dtype
        (packed buffers of runtime modules keep theirs)."""
        from compress.resume import swap_in
        swap_in(self.model, self.sources[i][2])
        block = self.blocks[i]
        state = {k: v if _packed(block, k) else _as(v, self.dtype) for k, v in self.state(i).items()}
        block.load_state_dict(state, strict=True, assign=True)

    def release(self, i: int) -> None:
        """Drop block i's memory: its parameters and buffers go back to the meta device."""
        self.blocks[i].to("meta")


def _fused(model, key: str, shape, f) -> torch.Tensor:
    """The fused tensor `key` [E, ...] from its per-expert pieces in the open file `f`:
    a tensor of element indices goes through transformers' own reverse conversion, so
    each piece comes out holding the positions its values take in the fused tensor."""
    from transformers.core_model_loading import revert_weight_conversion

    where = torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)
    pieces = revert_weight_conversion(model, {key: where})
    out = None
    for name, idx in pieces.items():
        t = f.get_tensor(name)
        out = torch.empty(math.prod(shape), dtype=t.dtype) if out is None else out
        out[idx.flatten()] = t.flatten()
    return out.reshape(shape)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors in the model's dtype; integer ones (ids, codes) as they are."""
    return t.to(dtype) if t.is_floating_point() else t


def _packed(block, key: str) -> bool:
    """Whether `key` is a packed buffer of a runtime module (whose dtype never changes)."""
    from compress.nn import PackedLinear
    mod, _, name = key.rpartition(".")
    m = block.get_submodule(mod) if mod else block
    return isinstance(m, PackedLinear) and name in m.PACKED


def weight_files(folder: Path) -> dict:
    """{tensor name: safetensors file} of a model folder (sharded or not)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise CompressError(f"runner.offload: {folder} has no model.safetensors; offloading reads safetensors "
                            "folders (convert GGUF or .bin models with `compress export --format hf` first)")
    with safe_open(str(single), framework="pt") as f:
        return {k: single for k in f.keys()}


def load_lazy(folder: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) with the decoder blocks left on disk (see the module docstring)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoTokenizer

    from compress.models import auto_class, file_names, find_blocks

    p = Path(folder)
    if not (p / "config.json").is_file():
        raise CompressError(f"runner.offload: model {folder!r} must be a local Hugging Face folder")
    files = weight_files(p)
    config = AutoConfig.from_pretrained(p)
    if getattr(config, "compress", None):
        raise CompressError("runner.offload: the model already holds packed layers; offload a dense model")
    with init_empty_weights(include_buffers=False):
        model = auto_class(config).from_config(config, dtype=dtype)
    prefix, blocks = find_blocks(model)
    stored = file_names(model, model.state_dict())   # {key in the model: name in the files}
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix + ".")}
    by_file: dict = {}
    for k in rest:
        if stored[k] in files:
            by_file.setdefault(files[stored[k]], []).append(k)
    state = {}
    for f, keys in by_file.items():
        with safe_open(str(f), framework="pt") as st:
            state.update({k: _as(st.get_tensor(stored[k]), dtype) for k in keys})
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still = [n for n, t in model.named_parameters() if t.is_meta and not n.startswith(prefix + ".")]
    if still:
        raise CompressError(f"runner.offload: {folder} lacks {still[0]}")
    sources, fused = {}, {}
    for i in range(len(blocks)):
        head = f"{prefix}.{i}."
        names = {stored[k]: k[len(head):] for k in stored if k.startswith(head) and stored[k] in files}
        fused[i] = [k[len(head):] for k, t in model.state_dict().items()
                    if k.startswith(head) and stored[k] not in files and t.dim() >= 3]
        names.update({n: None for k in fused[i] for n in _pieces(model, head + k, model.get_parameter(head + k))})
        lacking = next((k for k in names if k not in files), None)
        if lacking:
            raise CompressError(f"runner.offload: {folder} lacks {lacking}")
        by = {files[k] for k in names}
        if len(by) != 1:   # sources are one file per block
            raise CompressError(f"runner.offload: block {i} is split over several files in {folder}")
        sources[i] = (by.pop(), {k: v for k, v in names.items() if v is not None}, {})
    model._compress_lazy = LazyBlocks(model, prefix, blocks, sources, dtype, fused)
    tokenizer = AutoTokenizer.from_pretrained(p) if (p / "tokenizer_config.json").is_file() else None
    return model.eval(), tokenizer


def _pieces(model, key: str, t: torch.Tensor) -> list:
    """The file names a fused parameter is stored under, per expert (the files must hold them)."""
    from transformers.core_model_loading import revert_weight_conversion

    return list(revert_weight_conversion(model, {key: torch.empty(t.shape, device="meta")}))


def lazy_of(model) -> Optional[LazyBlocks]:
    return getattr(model, "_compress_lazy", None)


def save_lazy(folder: Path, model, lazy: LazyBlocks, dtype: Optional[torch.dtype] = None) -> None:
    """Write an offloaded model's weights into `folder` (cast to `dtype`, packed buffers
    excepted), one shard per block plus one for the rest, with the index transformers
    reads; at most one block is in memory."""
    def cast(block, k, v):
        keep = dtype is None or not v.is_floating_point() or (block is not None and _packed(block, k))
        return (v if keep else v.to(dtype)).contiguous()

    n = len(lazy.blocks)
    name = lambda k: f"model-{k + 1:05d}-of-{n + 1:05d}.safetensors"  # noqa: E731
    weight_map, total = {}, 0
    rest, seen = {}, set()
    for k, t in model.state_dict().items():
        ptr = t.untyped_storage().data_ptr()
        if k.startswith(lazy.prefix + ".") or ptr in seen:   # tied head: stored once, as transformers does
            continue
        seen.add(ptr)
        rest[k] = cast(None, k, t.detach())
    for i in range(n + 1):
        tensors = rest if i == 0 else {f"{lazy.prefix}.{i - 1}.{k}": cast(lazy.blocks[i - 1], k, v)
                                       for k, v in lazy.state(i - 1).items()}
        save_file(tensors, str(folder / name(i)), metadata={"format": "pt"})
        weight_map.update({k: name(i) for k in tensors})
        total += sum(v.numel() * v.element_size() for v in tensors.values())
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
