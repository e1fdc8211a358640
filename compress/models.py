"""The structure of a causal LM: its decoder blocks, their linear layers and routers,
and the weights of those layers, found generically. Loading a model is compress.loading;
this module imports nothing else from the package but its error type.

Works on any Hugging Face causal LM or vision-language wrapper: the decoder blocks are
the layer list of the model's own decoder (`get_decoder()`), ``model.layers`` in
Llama/Qwen/Mistral/Gemma, ``model.decoder.layers`` in OPT, ``transformer.h`` in GPT-2,
``model.language_model.layers`` in Qwen2.5-VL and Gemma 3. GPT-2's `Conv1D` stores its
weight as [in, out]; `get_weight` / `set_weight` hide that.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from compress.errors import CompressError


# ----------------------------------------------------------------------------- structure

def is_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, Conv1D))


def stands_for_linear(m: nn.Module) -> bool:
    """A linear layer, or a module that replaced one: compress.nn's packed runtime
    modules declare `replaces_linear = True` (this module cannot import them)."""
    return is_linear(m) or getattr(type(m), "replaces_linear", False) is True


def decoder_of(model: nn.Module) -> nn.Module:
    """The language model's decoder, as the model itself names it: `get_decoder()`
    (which also finds the text model inside a `*ForConditionalGeneration` wrapper), or
    the model when it has none. Vision towers and projectors sit outside it."""
    get = getattr(model, "get_decoder", None)
    dec = get() if callable(get) else None
    return dec if isinstance(dec, nn.Module) else model


def _n_layers(model: nn.Module) -> Optional[int]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(text, "num_hidden_layers", None)
    return n if isinstance(n, int) else None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the decoder blocks.

    The blocks are the decoder's own layer list (`decoder_of`): the outermost
    ModuleList in it with `config.num_hidden_layers` entries (text config for a
    multimodal wrapper) whose blocks hold linear layers. Layer classes may differ
    (hybrid attention / state-space stacks); lists nested inside a block (experts) are
    never taken for the decoder. Anything else is refused, naming what was found."""
    decoder = decoder_of(model)
    n = _n_layers(model)
    where = {id(m): name for name, m in model.named_modules()}
    lists, inner = [], set()
    for name, m in decoder.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and id(m) not in inner:
            lists.append(m)
            inner.update(id(x) for x in m.modules() if x is not m)
    holds = [m for m in lists if all(any(stands_for_linear(x) for x in b.modules()) for b in m)]
    found = [m for m in holds if n is None or len(m) == n]
    if n is None and len(found) > 1:
        found = [max(found, key=len)]
    if len(found) != 1:
        seen = ", ".join(f"{where.get(id(m), '?')} ({len(m)})" for m in holds) or "none"
        raise CompressError(f"model: cannot find the decoder blocks of {type(model).__name__}: expected one list of "
                            f"{n} blocks with linear layers in {type(decoder).__name__}, found: {seen}")
    return where[id(found[0])], found[0]


def auto_class(config):
    """The transformers Auto class that builds a model for `config`: a causal LM, or
    for a vision-language model that is not registered as one (Qwen2.5-VL), the
    image-text-to-text wrapper, whose decoder we compress on text."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as vl

    kind = getattr(config, "model_type", None)
    return AutoModelForImageTextToText if kind not in causal and kind in vl else AutoModelForCausalLM


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Linear layers of one block by name relative to the block, in module order: the
    layers passes target. Packed runtime modules are not linear layers a pass can edit,
    and routers are not targets (`is_router`)."""
    return {n: m for n, m in block.named_modules() if n and is_linear(m) and not is_router(block, n)}


def _n_experts(experts: nn.Module) -> Optional[int]:
    if isinstance(experts, nn.ModuleList):
        return len(experts)
    n = getattr(experts, "num_experts", None)
    if isinstance(n, int):
        return n
    fused = next((p for p in experts.parameters(recurse=False) if p.dim() >= 3), None)
    return fused.shape[0] if fused is not None else None


def is_router(block: nn.Module, name: str) -> bool:
    """Whether module `name` of `block` routes tokens: a router class (transformers 5's
    `*TopKRouter`), or a linear beside an `experts` module whose outputs are one score per
    expert (Mixtral-style `gate`) or a single gate (Qwen's `shared_expert_gate`)."""
    m = block.get_submodule(name)
    if "Router" in type(m).__name__:
        return True
    parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
    experts = getattr(parent, "experts", None)
    if not is_linear(m) or not isinstance(experts, nn.Module) or experts is m:
        return False
    out = get_weight(m).shape[0]
    return out == 1 or out == _n_experts(experts)


def get_weight(m: nn.Module) -> torch.Tensor:
    """[out, in] view of the layer's weight (Conv1D stores [in, out])."""
    return m.weight.T if isinstance(m, Conv1D) else m.weight


@torch.no_grad()
def set_weight(m: nn.Module, W: torch.Tensor) -> None:
    """Write an [out, in] weight back in the layer's own layout and dtype."""
    get_weight(m).copy_(W.to(m.weight.dtype))


def file_names(model: nn.Module, tensors: dict) -> dict[str, str]:
    """{state-dict key: the name transformers stores it under}, for `tensors` {key: the
    tensor (meta is fine) of that shape}. transformers 5 saves some models in their
    original checkpoint layout (Qwen2.5-VL's ``model.language_model.layers.*`` is stored
    as ``model.layers.*``): the whole dict goes through transformers' own reverse
    conversion once, and a tensor that comes out under another name was renamed. A key
    that a converter merges or splits (per-expert checkpoints of fused experts) keeps its
    own name."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:   # older transformers: keys are stored as they are
        return {k: k for k in tensors}
    where = {id(t): new for new, t in revert_weight_conversion(model, dict(tensors)).items()}
    return {k: where.get(id(t), k) for k, t in tensors.items()}


def name_of(model: nn.Module, module: Optional[nn.Module]) -> Optional[str]:
    """The qualified name of `module` inside `model` (None if it is not there)."""
    return next((n for n, m in model.named_modules() if m is module), None) if module is not None else None


def head_of(model: nn.Module) -> Optional[str]:
    """The name of the output head (lm_head, GPT-2's lm_head, OPT's lm_head, a wrapper's
    ...): what the model itself reports as its output embeddings, if that is a linear."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return name_of(model, head) if head is not None and is_linear(head) else None


# The linears a serving engine loads as one (vLLM's packed_modules_mapping: qkv_proj,
# gate_up_proj), which must then share a per-tensor scale (NVFP4's global scale).
SERVING_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def serving_groups(names) -> list[list[str]]:
    """The qualified linear names that a serving engine fuses into one layer, grouped:
    siblings of one parent module whose leaf names form one of SERVING_FUSED's sets
    (only those present; a lone member is a group of one)."""
    groups: dict = {}
    for n in names:
        parent, _, leaf = n.rpartition(".")
        fused = next((i for i, g in enumerate(SERVING_FUSED) if leaf in g), None)
        groups.setdefault((parent, leaf) if fused is None else (parent, fused), []).append(n)
    return list(groups.values())

