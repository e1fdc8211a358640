"""GGUF for llama.cpp, written with the `gguf` package: its tensor names
(`gguf.get_tensor_name_map`), its metadata keys, its block formats.

Every tensor of the model is mapped through the architecture's TensorNameMap; one that
has no llama.cpp name is refused by name, never dropped. The head is not written when
it is tied to the embedding (llama.cpp then reuses token_embd). Types:

    F16                     half precision
    Q8_0 Q4_0 Q4_1 Q5_0 Q5_1  blocks of 32 with fp16 scales (Q4_1 / Q5_1 store a min too)
    Q4_K Q5_K Q6_K          256-weight super-blocks (compress/ggml.py)

`gguf_type` applies to the 2-D weights that are still dense (the embedding, the head,
unquantized layers); rows that are not whole blocks get llama.cpp's fallback type, or F32
when not even 32 divides them. Layers the quant pass put on a llama.cpp grid
(GGMLLinear) are written as their own block bytes, unchanged: what GPTQ chose is what
llama.cpp reads. Other packed layers need `fold` and are re-quantized from their
effective weights. Norms, biases and routers stay F32, as llama.cpp keeps them.

The symmetric formats map 0 to a code, so pruned weights stay exactly zero; Q4_1 and
Q5_1 do not, and a sparse model gets a warning. llama.cpp rotates q and k of the
Llama architecture with interleaved pairs where transformers rotates halves, so their
rows are permuted as llama.cpp's converter does (per head, GGUF row 2i is HF row i and
row 2i+1 is HF row i + head_dim/2); the other architectures rotate halves in llama.cpp too.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from compress.errors import CompressError
from compress.export.fold import fold_packed
from compress.ggml import FORMATS, GGMLSpec, format_for
from compress.ggml_blocks import pack
from compress.nn.ggml_linear import GGMLLinear
from compress.quantize import rtn

log = logging.getLogger(__name__)

# transformers model_type -> llama.cpp architecture, for the architectures tested here.
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
INTERLEAVED = ("llama",)        # llama.cpp architectures whose rotary pairs are interleaved
KEEP_F32 = ("ffn_gate_inp",)    # routers: llama.cpp does not quantize them


def permute_qk(W: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows [n_head * hd, ...] -> llama.cpp's interleaved pairs."""
    rows = W.shape[0]
    return W.reshape(n_head, 2, rows // n_head // 2, *W.shape[1:]).transpose(1, 2).reshape(W.shape)


def unpermute_qk(W: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute_qk` (for reading a GGUF back)."""
    rows = W.shape[0]
    return W.reshape(n_head, rows // n_head // 2, 2, *W.shape[1:]).transpose(1, 2).reshape(W.shape)


def arch_of(model) -> str:
    mt = getattr(model.config, "model_type", None)
    if mt not in ARCHS:
        raise CompressError(f"output.format: gguf export supports model_type {', '.join(sorted(ARCHS))}; this one "
                            f"is {mt!r} (use hf or compressed-tensors)")
    return ARCHS[mt]


def gguf_tensors(model) -> dict:
    """{gguf name: fp32 tensor, or (uint8 blocks, ggml type) of a GGMLLinear} of the
    model, q / k permuted where llama.cpp's rotary needs it."""
    import gguf

    arch = arch_of(model)
    cfg = model.config
    tmap = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], cfg.num_hidden_layers)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, GGMLLinear)}
    items = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] not in packed or k.endswith("bias")}
    items.update({f"{n}.weight": m for n, m in packed.items()})
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.weight.data_ptr()
    out, unknown = {}, []
    for key, v in items.items():
        name = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            unknown.append(key)
            continue
        if tied and name == "output.weight":
            continue
        t = (v.blocks, v.fmt) if isinstance(v, GGMLLinear) else v.detach().float()
        if arch in INTERLEAVED and name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = cfg.num_attention_heads if name.split(".")[-2] == "attn_q" else cfg.num_key_value_heads
            t = (permute_qk(t[0], heads), t[1]) if isinstance(t, tuple) else permute_qk(t, heads)
        out[name] = t
    if unknown:
        raise CompressError(f"output.format: gguf: {len(unknown)} tensors have no llama.cpp name for {arch} "
                            f"({', '.join(unknown[:3])}); nothing was written")
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
    ftype = {"F16": "F16", "Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S"}.get(qtype, qtype)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{ftype}"))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def encode(name: str, W, qtype: str):
    """(array, raw ggml type or None) that GGUFWriter.add_tensor takes for tensor `name`:
    a GGMLLinear's own bytes; 1-D tensors and routers F32; 2-D weights in `qtype`, or
    llama.cpp's fallback type for rows that are not whole blocks (F32 if none fits)."""
    import gguf

    if isinstance(W, tuple):                                  # (blocks, fmt): written unchanged
        return W[0].cpu().numpy(), getattr(gguf.GGMLQuantizationType, W[1].upper())
    a = W.float().cpu()
    if a.dim() == 1 or any(k in name for k in KEEP_F32):
        return a.numpy().astype(np.float32), None
    if qtype == "F16":
        return a.numpy().astype(np.float16), None
    fmt = format_for(qtype.lower(), a.shape[-1])
    if fmt is None:
        return a.numpy().astype(np.float32), None
    t = getattr(gguf.GGMLQuantizationType, fmt.upper())
    if fmt[-1] != "k":                                        # gguf.quants quantizes these as ggml's reference
        return gguf.quants.quantize(a.numpy(), t), t
    flat = a.reshape(-1, a.shape[-1])
    res = rtn(flat, None, GGMLSpec(fmt))                      # ggml's reference fit, our packing
    return pack(fmt, res.codes, res.raw).reshape(*a.shape[:-1], -1).numpy(), t


def write(model, tokenizer, folder: Path, cfg) -> dict:
    import gguf

    arch = arch_of(model)
    fold_packed(model, torch.float32, keep=(GGMLLinear,), fold=cfg.fold,
                why="GGUF cannot hold as it is (it has its own block formats: quantize with a gguf format)")
    tensors = gguf_tensors(model)
    dense = [W for k, W in tensors.items() if k.startswith("blk.") and not isinstance(W, tuple) and W.dim() == 2]
    if cfg.gguf_type in ("Q4_1", "Q5_1") and dense and \
            sum(int((W == 0).sum()) for W in dense) > 0.2 * sum(W.numel() for W in dense):
        log.warning("export: %s stores an offset grid on which 0 is usually not a code: the pruned weights of "
                    "this sparse model will not stay exactly zero (Q8_0, Q4_0, Q5_0 and the K-quants keep them)",
                    cfg.gguf_type)
    path = folder / "model.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    _metadata(writer, model, cfg.gguf_type)
    if tokenizer is not None:
        _tokenizer(writer, tokenizer, model.config)
    types: dict = {}
    for name, W in tensors.items():
        data, raw = encode(name, W, cfg.gguf_type)
        writer.add_tensor(name, data, raw_dtype=raw)
        kind = "F32" if raw is None and data.dtype == np.float32 else "F16" if raw is None else raw.name
        types[kind] = types.get(kind, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"file": path.name, "gguf_type": cfg.gguf_type, "arch": arch, "tensors": len(tensors), "types": types}
