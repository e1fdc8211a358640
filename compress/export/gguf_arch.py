"""What each architecture needs in GGUF beyond the common keys: llama.cpp's name for
it, how its graph differs from transformers' code, and the metadata that tells it so.

The keys are `gguf.Keys`' (through GGUFWriter's add_* methods) and the values follow
llama.cpp's converter (convert_hf_to_gguf.py). Where llama.cpp fixes in code what
transformers reads from the config (the MLP activation, Gemma's attention scale, the
renormalization of the top-k routing weights), a config that disagrees is refused by
field rather than written into a file that computes something else.

    norm_shift   Gemma's RMSNorm computes x * (1 + w); llama.cpp computes x * w, so
                 every *norm.weight is written as w + 1 (in fp32, as transformers adds it)
    interleaved  llama.cpp's Llama graph rotates interleaved pairs: q / k rows permuted
    topk_norm    llama.cpp's fixed choice of renormalizing the k routing weights
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from compress.errors import CompressError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arch:
    name: str                          # llama.cpp architecture (gguf.MODEL_ARCH_NAMES)
    interleaved: bool = False
    norm_shift: float = 0.0
    act: str = "silu"                  # the MLP activation llama.cpp's graph applies
    topk_norm: Optional[bool] = None   # None: not a Mixture-of-Experts
    swa: bool = False                  # llama.cpp reads sliding_window and the layer types


GELU = "gelu_pytorch_tanh"             # ggml_gelu: the tanh approximation
ARCHS = {
    "llama": Arch("llama", interleaved=True),
    "mistral": Arch("llama", interleaved=True),
    "mixtral": Arch("llama", interleaved=True, topk_norm=True),
    "qwen2": Arch("qwen2"),
    "qwen2_moe": Arch("qwen2moe", topk_norm=False),
    "qwen3": Arch("qwen3"),
    "qwen3_moe": Arch("qwen3moe", topk_norm=True),
    "gemma": Arch("gemma", norm_shift=1.0, act=GELU),
    "gemma2": Arch("gemma2", norm_shift=1.0, act=GELU, swa=True),
    "gemma3_text": Arch("gemma3", norm_shift=1.0, act=GELU, swa=True),
    "phi3": Arch("phi3"),
    "olmo2": Arch("olmo2"),
    "olmoe": Arch("olmoe", topk_norm=False),
}
# Layer counts at which llama.cpp scales Gemma's queries by (hidden / heads)^-1/2, not head_dim^-1/2.
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}


def arch_of(model) -> Arch:
    mt = getattr(model.config, "model_type", None)
    if mt not in ARCHS:
        raise CompressError(f"output.format: gguf export supports model_type {', '.join(sorted(ARCHS))}; this one "
                            f"is {mt!r} (use hf or compressed-tensors)")
    check(mt, model.config)
    return ARCHS[mt]


def rope_of(c) -> tuple[dict, dict]:
    """(global, sliding) rope parameters; one dict serves both where the config has one."""
    rp = getattr(c, "rope_parameters", None) or {"rope_theta": getattr(c, "rope_theta", 10000.0)}
    if "full_attention" in rp:
        return rp["full_attention"], rp.get("sliding_attention", rp["full_attention"])
    return rp, rp


def _refuse(mt: str, field: str, got, allowed: str) -> None:
    raise CompressError(f"output.format: gguf: {mt} with {field}={got!r} is not what llama.cpp computes "
                        f"({allowed}); nothing was written")


def check(mt: str, c) -> None:
    """Refuse, by field, a config whose model llama.cpp's graph for it would not compute."""
    a = ARCHS[mt]
    act = getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", None)
    if act != a.act:
        _refuse(mt, "hidden_act", act, f"it applies {a.act}")
    full, sliding = rope_of(c)
    for which, rp in (("", full), ("sliding_attention.", sliding)):
        kind = rp.get("rope_type") or "default"
        if kind not in ("default", "linear") or (kind == "linear" and which):
            _refuse(mt, f"rope_parameters.{which}rope_type", kind, "this exporter writes default rope, and linear "
                    "scaling on global layers")
    if a.topk_norm is not None and mt != "mixtral" and bool(getattr(c, "norm_topk_prob", False)) != a.topk_norm:
        _refuse(mt, "norm_topk_prob", getattr(c, "norm_topk_prob", False), f"llama.cpp's {a.name} fixes it to "
                f"{a.topk_norm}")
    if mt in ("qwen2_moe", "qwen3_moe") and (getattr(c, "mlp_only_layers", None) or
                                               getattr(c, "decoder_sparse_step", 1) != 1):
        _refuse(mt, "mlp_only_layers", c.mlp_only_layers, "every block an MoE block")
    if mt in GEMMA_27B_LAYERS:
        hd = c.head_dim if c.num_hidden_layers != GEMMA_27B_LAYERS[mt] else c.hidden_size // c.num_attention_heads
        if c.query_pre_attn_scalar != hd:
            _refuse(mt, "query_pre_attn_scalar", c.query_pre_attn_scalar, f"it scales queries by {hd}^-1/2 "
                    f"at {c.num_hidden_layers} layers")
    if mt == "olmoe" and c.num_key_value_heads != c.num_attention_heads:
        _refuse(mt, "num_key_value_heads", c.num_key_value_heads, f"its OLMoE has {c.num_attention_heads}, one per "
                "query head")
    if getattr(c, "use_bidirectional_attention", False) or getattr(c, "use_sliding_window", False):
        _refuse(mt, "use_bidirectional_attention / use_sliding_window", True, "causal attention over the whole "
                "context")
    window = getattr(c, "sliding_window", None)
    if not a.swa and window and window < c.max_position_embeddings:
        log.warning("export: llama.cpp's %s attends to the whole context; this model's sliding_window=%d "
                    "is not written (outputs agree up to that many tokens)", a.name, window)


def metadata(writer, c, a: Arch) -> None:
    """The keys beyond the common ones (compress.export.gguf._metadata)."""
    full, sliding = rope_of(c)
    if full.get("rope_type") == "linear":
        import gguf
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    if a.swa:
        writer.add_sliding_window(c.sliding_window)
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in c.layer_types])
        writer.add_rope_freq_base_swa(float(sliding.get("rope_theta", 10000.0)))
    if getattr(c, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(c.attn_logit_softcapping)
    if getattr(c, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(c.final_logit_softcapping)
    if a.topk_norm is not None:
        writer.add_expert_count(getattr(c, "num_local_experts", None) or c.num_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
        if getattr(c, "moe_intermediate_size", None):
            writer.add_expert_feed_forward_length(c.moe_intermediate_size)
        if getattr(c, "shared_expert_intermediate_size", None):
            writer.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    if full.get("original_max_position_embeddings"):
        writer.add_rope_scaling_orig_ctx_len(full["original_max_position_embeddings"])
