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
from torch import nn

from compress.errors import CompressError
from compress.experts import Experts, Proj, fused_params, view_of
from compress.export.fold import fold_packed
from compress.export.gguf_arch import arch_of, metadata, rope_of
from compress.ggml import FORMATS, GGMLSpec, format_for
from compress.ggml_blocks import pack
from compress.nn.ggml_linear import GGMLLinear
from compress.quantize import rtn

log = logging.getLogger(__name__)

KEEP_F32 = ("ffn_gate_inp",)    # routers (and Qwen2-MoE's shared-expert gate): llama.cpp does not quantize them


def permute_qk(W: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows [n_head * hd, ...] -> llama.cpp's interleaved pairs."""
    rows = W.shape[0]
    return W.reshape(n_head, 2, rows // n_head // 2, *W.shape[1:]).transpose(1, 2).reshape(W.shape)


def unpermute_qk(W: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute_qk` (for reading a GGUF back)."""
    rows = W.shape[0]
    return W.reshape(n_head, rows // n_head // 2, 2, *W.shape[1:]).transpose(1, 2).reshape(W.shape)


def _stacked(name: str, mods: list):
    """One GGUF tensor of an experts projection [E, out, in]: the experts' GGMLLinear
    bytes stacked, when all hold one format, or their effective weights when none does."""
    fmts = {m.fmt if isinstance(m, GGMLLinear) else None for m in mods}
    if len(fmts) > 1:
        raise CompressError(f"output.format: gguf: the experts of {name} are in {len(fmts)} formats "
                            f"({', '.join(sorted(f or 'dense' for f in fmts))}); a GGUF tensor holds all of them in "
                            "one type: quantize them alike")
    fmt = fmts.pop()
    if fmt is not None:
        return torch.stack([m.blocks for m in mods]), fmt
    return torch.stack([m.weight.detach().float() if isinstance(m, nn.Linear) else m.effective_weight() for m in mods])


def expert_tensors(model) -> tuple[dict, set]:
    """({'<experts>.<gate_proj|up_proj|down_proj>.weight': [E, out, in] tensor or
    (blocks, fmt)}, the state_dict prefixes they replace): transformers' fused experts,
    dense or packed per expert, as llama.cpp's ffn_*_exps."""
    from compress.nn import PackedExperts

    out, prefixes = {}, set()
    for name, m in model.named_modules():
        if any(name.startswith(f"{p}.") for p in prefixes):
            continue
        if isinstance(m, PackedExperts):
            layout, fused, packed = m.layout, fused_params(m.inner), {p.name: p for p in m.projs}
            projs = [Proj("gate_up_proj", "gate_proj", 0), Proj("gate_up_proj", "up_proj", 1)] \
                if "gate_up_proj" in m.shapes or "gate_up_proj" in fused else [Proj("up_proj", "up_proj")]
            for p in projs + [Proj("down_proj", "down_proj")]:
                key = f"{name}.{p.name}.weight"
                out[key] = _stacked(key, [m.expert(e, p) for e in range(m.num)]) if p.name in packed else \
                    view_of(fused[p.param], p, layout["transposed"], layout["concatenated"]).detach().float()
        elif fused_params(m):
            ex = Experts(m, name)
            if ex.biased:
                raise CompressError(f"output.format: gguf: {name} has expert biases, which this exporter does not "
                                    "write; nothing was written")
            out.update({f"{name}.{p.name}.weight": ex.weights(p).detach().float() for p in ex.projs})
        else:
            continue
        prefixes.add(name)
    return out, prefixes


def gguf_tensors(model) -> dict:
    """{gguf name: fp32 tensor, or (uint8 blocks, ggml type) of a GGMLLinear or of
    stacked experts} of the model, as llama.cpp's graph for its architecture reads
    them: q / k permuted where its rotary needs it, Gemma's norms shifted."""
    import gguf

    a = arch_of(model)
    cfg = model.config
    tmap = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[a.name], cfg.num_hidden_layers)
    experts, inside = expert_tensors(model)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, GGMLLinear)
              and not any(n.startswith(f"{p}.") for p in inside)}
    items = {k: v for k, v in model.state_dict().items() if not any(k.startswith(f"{p}.") for p in inside)
             and (k.rsplit(".", 1)[0] not in packed or k.endswith("bias"))}
    items.update({f"{n}.weight": (m.blocks, m.fmt) for n, m in packed.items()})
    items.update(experts)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.weight.data_ptr()
    head_keys = {f"{n}.weight" for n, m in model.named_modules() if m is head} if tied else set()
    out, unknown = {}, []
    for key, v in items.items():
        if key in head_keys:
            continue                              # llama.cpp reuses token_embd
        name = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            unknown.append(key)
            continue
        t = v if isinstance(v, tuple) else v.detach().float()
        if a.norm_shift and key.endswith("norm.weight"):
            t = t + a.norm_shift
        if a.interleaved and name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = cfg.num_attention_heads if name.split(".")[-2] == "attn_q" else cfg.num_key_value_heads
            t = (permute_qk(t[0], heads), t[1]) if isinstance(t, tuple) else permute_qk(t, heads)
        out[name] = t
    if unknown:
        raise CompressError(f"output.format: gguf: {len(unknown)} tensors have no llama.cpp name for {a.name} "
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
    full, _ = rope_of(c)
    rot = int(head_dim * full.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0)))
    writer.add_name(getattr(c, "_name_or_path", "") or "model")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(float(full.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(rot)
    writer.add_vocab_size(c.vocab_size)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    metadata(writer, c, arch_of(model))
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

    arch = arch_of(model).name
    fold_packed(model, torch.float32, keep=(GGMLLinear,), experts_of=(GGMLLinear,), fold=cfg.fold,
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
