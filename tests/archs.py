"""Tiny random models of every architecture family the runner supports, built from
transformers' own configs (`AutoConfig.for_model`), small enough for CPU tests.

Every attention window is WINDOW = 8 tokens, shorter than the SEQ = 24 calibration
tokens, so sliding and full layers really see different masks. Each family keeps what
makes it different: layer types (Qwen2/3 with sliding layers, Gemma 2/3, gpt-oss,
Cohere2), Gemma 3's local and global rotary bases, fused experts (gpt-oss, Jamba,
Qwen3-Next), state-space and linear-attention layers of another class (Jamba) or
inside one class (Falcon-H1, Qwen3-Next), blocks that return tuples (Falcon-H1), a
vision tower longer than the text decoder (Qwen2.5-VL), GPT-2's Conv1D.
"""
from __future__ import annotations

import torch

VOCAB, SEQ, WINDOW = 128, 24, 8
_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)

CONFIGS = {
    "llama": dict(_BASE),
    "qwen2": dict(_BASE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
    "qwen3": dict(_BASE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
    "mistral": dict(_BASE, sliding_window=WINDOW),
    "gemma2": dict(_BASE, sliding_window=WINDOW),
    "gemma3_text": dict(_BASE, sliding_window=WINDOW, sliding_window_pattern=2),
    "gpt_oss": dict(_BASE, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2),
    "cohere2": dict(_BASE, sliding_window=WINDOW, sliding_window_pattern=2),
    "gpt2": dict(vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, bos_token_id=1, eos_token_id=2),
    "opt": dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, num_hidden_layers=4,
                num_attention_heads=4, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "qwen2_5_vl": dict(text_config=dict(_BASE, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
                       vision_config=dict(depth=6, hidden_size=32, intermediate_size=64, num_heads=2,
                                          out_hidden_size=64, fullatt_block_indexes=[5])),
    "jamba": dict(_BASE, num_experts=2, expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2,
                  attn_layer_offset=1, mamba_d_state=8, mamba_dt_rank=8, use_mamba_kernels=False),
    "falcon_h1": dict(_BASE, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16,
                      mamba_chunk_size=8),
    "qwen3_next": dict(_BASE, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                       linear_value_head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32),
}
ARCHS = list(CONFIGS)

# Mixture-of-Experts families (tests/test_moe.py): fused experts [E, out, in] in
# transformers 5, each with what makes it different: Qwen2-MoE's shared expert and its
# gate, DeepSeek-V3's dense first block (first_k_dense_replace) and grouped routing,
# gpt-oss's biased, clamped, interleaved and transposed experts, Llama 4's experts that
# see every token pre-scaled by the router, in every other block.
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
MOE_CONFIGS = {
    "mixtral": dict(_BASE, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    "qwen2_moe": dict(_BASE, **_MOE, shared_expert_intermediate_size=32),
    "qwen3_moe": dict(_BASE, **_MOE),
    "olmoe": dict(_BASE, **_MOE),
    "gpt_oss": CONFIGS["gpt_oss"],
    "deepseek_v3": dict(_BASE, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, q_lora_rank=32,
                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8),
    "llama4_text": dict(_BASE, num_local_experts=4, num_experts_per_tok=1, intermediate_size=32,
                        intermediate_size_mlp=128, interleave_moe_layer_step=2, no_rope_layers=[1, 1, 1, 0],
                        attention_chunk_size=WINDOW),
    "qwen3_next": CONFIGS["qwen3_next"],
}
MOE_ARCHS = list(MOE_CONFIGS)


def config_of(arch: str, **changes) -> dict:
    """The config fields of `arch`, with `changes` applied (to the text config of a
    vision-language model): e.g. hidden_size=128, sliding_window=16 for benchmarks."""
    fields = dict(CONFIGS[arch] if arch in CONFIGS else MOE_CONFIGS[arch])
    if "text_config" in fields:
        fields["text_config"] = {**fields["text_config"], **changes}
    else:
        fields.update(changes)
    return fields


def tiny(arch: str, seed: int = 0, dtype: torch.dtype = None, **changes):
    """A random model of `arch` (CONFIGS or MOE_CONFIGS) in eval mode; always the same
    weights for a seed, and the global RNG is left as it was. `dtype`: built in that
    dtype as loading does
    (rotary tables stay fp32, unlike after `.to(dtype)`). `changes`: see `config_of`."""
    from transformers import AutoConfig

    from compress.models import auto_class

    config = AutoConfig.for_model(arch, **config_of(arch, **changes))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto_class(config).from_config(config, **({"dtype": dtype} if dtype else {}))
    return model.eval()


def ids(n: int = 4, seq: int = SEQ, seed: int = 0) -> torch.LongTensor:
    """Calibration token ids [n, seq], avoiding the special ids 0..2."""
    return torch.randint(3, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))
