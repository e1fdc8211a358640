"""GGUF for llama.cpp (Llama-architecture models), written with the `gguf` package.

Tensors, in llama.cpp's names: token_embd, blk.N.{attn_norm, attn_q, attn_k, attn_v,
attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}, output_norm, and output unless the
head is tied to the embedding (llama.cpp then reuses token_embd). 2-D weights whose
rows are whole blocks of 32 take `gguf_type`; norms and the rest stay F32.

    F16   half precision
    Q8_0  blocks of 32: fp16 d = max|x| / 127, int8 q = round(x / d)       8.5 bits
    Q4_0  blocks of 32: fp16 d = x_absmax / -8, 4-bit q = x / d + 8        4.5 bits
    Q4_1  blocks of 32: fp16 d and min m, 4-bit q = (x - m) / d            5 bits

Q8_0 and Q4_0 map 0 to the code of 0, so pruned weights stay exactly zero; Q4_1's
offset grid does not, so a sparse model gets a warning. llama.cpp rotates q and k with
interleaved pairs where transformers' Llama rotates halves, so their rows are permuted
(as llama.cpp's own converter does): per head, GGUF row 2i is HF row i and row 2i+1 is
HF row i + head_dim/2.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from compress.errors import CompressError
from compress.export.fold import fold_packed

log = logging.getLogger(__name__)

BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def permute_qk(W: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows [n_head * hd, in] -> llama.cpp's interleaved pairs."""
    rows = W.shape[0]
    return W.reshape(n_head, 2, rows // n_head // 2, *W.shape[1:]).transpose(1, 2).reshape(W.shape)


def unpermute_qk(W: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute_qk` (for reading a GGUF back)."""
    rows = W.shape[0]
    return W.reshape(n_head, rows // n_head // 2, 2, *W.shape[1:]).transpose(1, 2).reshape(W.shape)


def gguf_tensors(model) -> dict:
    """{gguf name: fp32 tensor} of a Llama model, q / k permuted. The embedding, head,
    final norm and blocks are found as the runner finds them, not by their names."""
    from compress.models import decoder_of, find_blocks, name_of

    cfg = model.config
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    norm = name_of(model, getattr(decoder_of(model), "norm", None))
    if norm is None:
        raise CompressError("output.format: gguf: the decoder has no final `norm` to write as output_norm")
    out = {"token_embd.weight": sd[f"{name_of(model, embed)}.weight"], "output_norm.weight": sd[f"{norm}.weight"]}
    if head.weight.data_ptr() != embed.weight.data_ptr():   # tied: llama.cpp reuses token_embd
        out["output.weight"] = sd[f"{name_of(model, head)}.weight"]
    prefix, blocks = find_blocks(model)
    for i in range(len(blocks)):
        for hf, gg in BLOCK.items():
            W = sd[f"{prefix}.{i}.{hf}.weight"]
            if gg == "attn_q":
                W = permute_qk(W, cfg.num_attention_heads)
            elif gg == "attn_k":
                W = permute_qk(W, cfg.num_key_value_heads)
            out[f"blk.{i}.{gg}.weight"] = W
    return out


def _tokenizer(writer, tokenizer, config) -> None:
    """BPE vocabulary, merges and special ids, as llama.cpp's converter writes them."""
    import gguf

    vocab = tokenizer.get_vocab()
    n = config.vocab_size
    by_id = {i: t for t, i in vocab.items()}
    special = set(tokenizer.all_special_ids)
    added = set(tokenizer.get_added_vocab().values())
    tokens, types = [], []
    for i in range(n):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else
                         gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    pre = getattr(config, "gguf_tokenizer_pre", None)
    if pre is None:
        log.warning("export: the source model names no llama.cpp pre-tokenizer; writing 'default'")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        gguf.SpecialVocab(d, load_merges=True, n_vocab=n).add_to_gguf(writer)


def _metadata(writer, model, qtype) -> None:
    import gguf

    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or getattr(c, "rope_theta", 10000.0)
    writer.add_name(getattr(c, "_name_or_path", "") or "model")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(float(rope))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(c.vocab_size)
    if head_dim != c.hidden_size // c.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    ftype = {"F16": gguf.LlamaFileType.MOSTLY_F16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[qtype]
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def encode(W: torch.Tensor, qtype: str):
    """(array, raw dtype or None) that GGUFWriter.add_tensor takes for W in `qtype`;
    1-D tensors and rows that are not whole blocks of 32 stay F32."""
    import gguf

    a = W.float().cpu().numpy()
    if a.ndim == 1 or (qtype != "F16" and a.shape[-1] % 32):
        return a.astype(np.float32), None
    if qtype == "F16":
        return a.astype(np.float16), None
    t = getattr(gguf.GGMLQuantizationType, qtype)
    return gguf.quants.quantize(a, t), t


def write(model, tokenizer, folder: Path, cfg) -> dict:
    import gguf

    if getattr(model.config, "model_type", None) != "llama":
        raise CompressError(f"output.format: gguf export supports Llama-architecture models; this one is "
                            f"{getattr(model.config, 'model_type', '?')!r} (use hf or compressed-tensors)")
    fold_packed(model, torch.float32, fold=cfg.fold,
                why="GGUF cannot hold as it is (it has its own block formats: F16, Q8_0, Q4_0, Q4_1)")
    tensors = gguf_tensors(model)
    if cfg.gguf_type == "Q4_1":
        blocks = [W for k, W in tensors.items() if k.startswith("blk.") and W.dim() == 2]
        if sum(int((W == 0).sum()) for W in blocks) > 0.2 * sum(W.numel() for W in blocks):
            log.warning("export: Q4_1 stores an offset grid on which 0 is usually not a code: the pruned "
                        "weights of this sparse model will not stay exactly zero (Q8_0 and Q4_0 keep them)")
    path = folder / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    _metadata(writer, model, cfg.gguf_type)
    if tokenizer is not None:
        _tokenizer(writer, tokenizer, model.config)
    for name, W in tensors.items():
        data, raw = encode(W, cfg.gguf_type)
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"file": path.name, "gguf_type": cfg.gguf_type, "tensors": len(tensors)}
