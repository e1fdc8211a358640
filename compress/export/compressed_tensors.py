"""compressed-tensors, the checkpoint format vLLM loads (as its library 0.20 writes it).

Quantized layers (QuantLinear, int4 / int8, per group or per channel) become
`pack-quantized`; for a layer `m` [out, in] with codes u in [0, 2^b) and zero points z:

    m.weight_packed      int32 [out, ceil(in*b/32)]  u bit-packed along the input, low bits
                                                      first (our QuantLinear's own layout)
    m.weight_scale       fp16  [out, in/g] or [out, 1]
    m.weight_shape       int64 [2] = [out, in]
    m.weight_zero_point  int32 [ceil(out*b/32), in/g] z packed along the output (asymmetric only)

    W = (u - 2^(b-1) - (z - 2^(b-1))) * s = (u - z) * s      (the same numbers as ours)

Sparsity is recorded in `sparsity_config`. With `sparse_format: dense` the zeros stay in
place (any model; the only sparse form vLLM and transformers still read). With
`sparse_format: bitmask`, unquantized 2:4 layers are stored as `sparse-24-bitmask`:

    m.compressed  [out, in/2]  the kept values, row by row
    m.bitmask     uint8 [out, ceil(in/8)]  kept positions, bit k of byte j = column 8j + k
    m.shape       int64 [2, 1]

which only compressed-tensors <= 0.14 (and vLLM releases of that time) read.

Floating-point layers (FPLinear, compress.fp_formats) are written in the library's own
layouts, which FPLinear already keeps:

    nvfp4-pack-quantized  weight_packed uint8 [out, in/2] (two E2M1 codes, low nibble first),
                          weight_scale float8_e4m3fn [out, in/16], weight_global_scale fp32 [1]
                          W = E2M1[u] * (weight_scale / weight_global_scale)
    mxfp4-pack-quantized  weight_packed as nvfp4, weight_scale uint8 [out, in/32] = 127 + e
                          W = E2M1[u] * 2^e
    float-quantized       weight float8_e4m3fn [out, in], weight_scale fp32 [out, 1]
                          W = weight * weight_scale
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from compress.errors import CompressError
from compress.experts import published_names
from compress.export.fold import fold_packed
from compress.masks import follows_nm
from compress.models import block_linears, find_blocks, get_weight
from compress.nn.fp_linear import FPLinear
from compress.nn.quant_linear import QuantLinear
from compress.nn.sparse_quant_linear import pattern_of, positions_of
from compress.packing import pack_bits

log = logging.getLogger(__name__)

CT_VERSION = "0.20.0"          # the release whose config.json layout we write
BITMASK_VERSION = "0.14.0.1"   # the last release with sparse-24-bitmask


class _Stored(nn.Module):
    """Holds a layer's tensors under the names the format uses (saved as buffers)."""

    def __init__(self, tensors: dict, bias=None):
        super().__init__()
        for k, v in tensors.items():
            self.register_buffer(k, v)
        self.bias = bias


def _why_not(m: QuantLinear) -> str:
    """'' if compressed-tensors can hold this QuantLinear, else the reason."""
    if m.spec.bits not in (4, 8):
        return f"has {m.spec.bits}-bit codes (vLLM's pack-quantized runs 4 and 8 bits)"
    if m.g_idx is not None:
        return "has a per-column group index (act_order without static_groups), which compressed-tensors 0.20 lacks"
    if m.spec.group_size is not None and m.in_features % m.spec.group_size:
        return (f"has {m.in_features} inputs, not a multiple of group_size {m.spec.group_size} "
                "(compressed-tensors needs whole groups)")
    return ""


def pack_quantized(m: QuantLinear) -> dict:
    """The pack-quantized tensors of one QuantLinear (see the module docstring)."""
    t = {"weight_packed": pack_bits(m.codes(), m.spec.bits), "weight_scale": m.scales.to(torch.float16).clone(),
         "weight_shape": torch.tensor([m.out_features, m.in_features], dtype=torch.int64)}
    if m.qzeros is not None:
        z = m.zeros().to(torch.uint8)                                  # [out, G]
        t["weight_zero_point"] = pack_bits(z.T.contiguous(), m.spec.bits).T.contiguous()
    return t


# FPLinear format -> (compressed-tensors format, its weights' QuantizationArgs, as the
# library's presets NVFP4A16 / MXFP4A16 and a per-channel FP8 W8A16 write them)
FP_SCHEMES = {
    "nvfp4": ("nvfp4-pack-quantized", {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
                                       "symmetric": True, "dynamic": False, "scale_dtype": "torch.float8_e4m3fn"}),
    "mxfp4": ("mxfp4-pack-quantized", {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32,
                                       "symmetric": True, "dynamic": False, "scale_dtype": "torch.uint8"}),
    "fp8": ("float-quantized", {"num_bits": 8, "type": "float", "strategy": "channel", "group_size": None,
                                "symmetric": True, "dynamic": False}),
}


def fp_tensors(m: FPLinear) -> dict:
    """The tensors of one FPLinear under the format's names (see the module docstring)."""
    if m.fmt == "fp8":
        return {"weight": m.qweight.view(torch.float8_e4m3fn).clone(), "weight_scale": m.scales.clone()}
    t = {"weight_packed": m.qweight.clone(),
         "weight_scale": m.scales.view(torch.float8_e4m3fn).clone() if m.fmt == "nvfp4" else m.scales.clone()}
    if m.fmt == "nvfp4":
        t["weight_global_scale"] = m.global_scale.clone()
    return t


def _scheme(m) -> tuple:
    """(format, weights args) of a quantized layer."""
    if isinstance(m, FPLinear):
        return FP_SCHEMES[m.fmt]
    gs = m.spec.group_size
    return "pack-quantized", {"dynamic": False, "group_size": gs, "num_bits": m.spec.bits,
                              "strategy": "group" if gs else "channel", "symmetric": m.spec.symmetric, "type": "int"}


def bitmask_24(W: torch.Tensor) -> dict:
    """sparse-24-bitmask tensors of a 2:4 weight W [out, in]: exactly two kept slots per
    four (a group with more zeros keeps zero-valued slots, first ones first)."""
    out, d_in = W.shape
    keep = torch.zeros_like(W, dtype=torch.bool).scatter_(1, positions_of(pattern_of(W != 0)), True)
    bits = torch.zeros(out, (d_in + 7) // 8 * 8, dtype=torch.uint8)
    bits[:, :d_in] = keep.to(torch.uint8)
    weights = (1 << torch.arange(8, dtype=torch.int64))               # little bit order
    bitmask = (bits.reshape(out, -1, 8).to(torch.int64) * weights).sum(-1).to(torch.uint8)
    return {"compressed": W[keep].reshape(out, d_in // 2).clone(), "bitmask": bitmask,
            "shape": torch.tensor([[out], [d_in]], dtype=torch.int64)}


def _quant_config(quant: dict, plain: list) -> dict:
    """config_groups: one group per distinct scheme; a single group targets the class
    Linear and ignores the unquantized linears by name; several formats make the
    checkpoint's format "mixed-precision", each group naming its own."""
    specs: dict = {}
    for name, m in quant.items():
        fmt, weights = _scheme(m)
        specs.setdefault(json.dumps([fmt, weights], sort_keys=True), []).append(name)
    groups = {}
    for i, (key, names) in enumerate(sorted(specs.items())):
        fmt, weights = json.loads(key)
        groups[f"group_{i}"] = {"format": fmt, "input_activations": None, "output_activations": None,
                                "targets": ["Linear"] if len(specs) == 1 else names, "weights": weights}
    formats = {g["format"] for g in groups.values()}
    return {"config_groups": groups, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "global_compression_ratio": None, "ignore": plain, "kv_cache_scheme": None,
            "moe_sparsity_config": None, "quantization_status": "compressed", "transform_config": {}}


def _sparsity_config(weights: dict, fmt: str) -> dict:
    """sparsity_config over the decoder linears with at least 25 % zeros (0 if none)."""
    sparse = {n: W for n, W in weights.items() if float((W == 0).float().mean()) >= 0.25}
    if not sparse:
        return {}
    zeros = sum(int((W == 0).sum()) for W in sparse.values())
    structure = "2:4" if all(follows_nm(W, 2, 4) for W in sparse.values()) else "unstructured"
    return {"format": fmt, "global_sparsity": zeros / sum(W.numel() for W in sparse.values()),
            "ignore": sorted(set(weights) - set(sparse)) + ["lm_head"], "registry_requires_subclass": False,
            "sparsity_structure": structure, "targets": ["Linear"]}


def unfuse_experts(model) -> int:
    """Put each PackedExperts' per-expert modules where the model's experts module was,
    as ``<experts>.<e>.<proj>``: the per-expert layout of published checkpoints, which
    vLLM's MoE loader reads (one pack-quantized set of tensors per expert and projection).
    Returns how many experts modules were unfused."""
    from compress.nn import PackedExperts

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, PackedExperts)]
    for name, m in found:
        left = [k for k, p in m.inner.named_parameters() if p.numel()]
        if left:
            raise CompressError(f"export: {name} ({type(m.inner).__name__}) keeps {', '.join(left)} beside its "
                                "packed experts; the compressed-tensors MoE layout has no place for them: use format hf")
        layout = SimpleNamespace(name=name, projs=m.projs, num=m.num, transposed=m.layout["transposed"],
                                 weights=m.weights)
        leaf = published_names(model, layout)     # Mixtral: gate_proj -> w1, up_proj -> w3, down_proj -> w2
        model.set_submodule(name, nn.ModuleList(nn.ModuleDict({leaf[p.name]: m.expert(e, p) for p in m.projs})
                                                for e in range(m.num)))
    return len(found)


def write(model, tokenizer, folder: Path, cfg) -> dict:
    dtype = getattr(torch, cfg.dtype)
    unfuse_experts(model)
    fold_packed(model, dtype, keep=(QuantLinear, FPLinear), fold=cfg.fold,
                why="compressed-tensors has no format for (only group / channel int quantization, NVFP4, MXFP4, "
                    "FP8 and sparsity)")
    prefix, blocks = find_blocks(model)
    layers = {f"{prefix}.{i}.{n}": m for i, b in enumerate(blocks) for n, m in b.named_modules()
              if n and (isinstance(m, (QuantLinear, FPLinear)) or n in block_linears(b))}
    conv = next((n for n, m in layers.items() if not isinstance(m, (nn.Linear, QuantLinear, FPLinear))), None)
    if conv:
        raise CompressError(f"export: {conv} is a {type(layers[conv]).__name__}, not nn.Linear; compressed-tensors "
                            "targets Linear modules (GPT-2's Conv1D is not one): use format hf or gguf")
    for name, m in list(layers.items()):
        why = isinstance(m, QuantLinear) and _why_not(m)
        if why and not cfg.fold:
            raise CompressError(f"export: {name} {why}; pass fold: true (--fold) to store it densely")
        if why:
            layers[name] = m.to_linear(dtype)
            model.set_submodule(name, layers[name])
    quant = {n: m for n, m in layers.items() if isinstance(m, (QuantLinear, FPLinear))}
    if cfg.dtype != "float16" and any(isinstance(m, QuantLinear) for m in quant.values()):
        log.warning("export: scales stay fp16 (as stored); dense tensors are %s", cfg.dtype)
    weights = {n: (m.effective_weight() if n in quant else get_weight(m)).detach().float() for n, m in layers.items()}
    bitmask = cfg.sparse_format == "bitmask"
    sparsity = _sparsity_config(weights, "sparse-24-bitmask" if bitmask else "dense")
    if bitmask:
        _check_bitmask(sparsity, weights, quant)
        log.warning("export: sparse-24-bitmask is read only by compressed-tensors <= 0.14 and the vLLM releases of "
                    "that time; current ones (and transformers) need sparse_format: dense")
    model.to(dtype)
    for name, m in layers.items():
        if name in quant:
            model.set_submodule(name, _Stored(fp_tensors(m) if isinstance(m, FPLinear) else pack_quantized(m), m.bias))
        elif bitmask and name not in sparsity["ignore"]:
            model.set_submodule(name, _Stored(bitmask_24(get_weight(m).detach()), m.bias))
    if hasattr(model.config, "compress"):
        del model.config.compress
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    plain = sorted(set(n for n, m in model.named_modules() if isinstance(m, nn.Linear)) | {"lm_head"})
    qc = {**(_quant_config(quant, plain) if quant else {}), "quant_method": "compressed-tensors",
          "sparsity_config": sparsity, "version": BITMASK_VERSION if bitmask else CT_VERSION}
    if not quant:
        qc.setdefault("transform_config", {})
    if quant or sparsity:   # a dense, unquantized model needs no quantization_config
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = dict(sorted(qc.items()))
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"quantized_layers": len(quant), "sparsity": sparsity.get("sparsity_structure"),
            "global_sparsity": sparsity.get("global_sparsity")}


def _check_bitmask(sparsity: dict, weights: dict, quant: dict) -> None:
    if not sparsity:
        raise CompressError("output.sparse_format: bitmask needs 2:4 layers; this model has no sparse decoder linear")
    for name in set(weights) - set(sparsity["ignore"]):
        if name in quant:
            raise CompressError(f"output.sparse_format: {name} is quantized; sparse-24-bitmask holds unquantized "
                                "2:4 layers only (use sparse_format: dense)")
        if not follows_nm(weights[name], 2, 4):
            raise CompressError(f"output.sparse_format: {name} is not 2:4 sparse; sparse-24-bitmask needs every "
                                "sparse layer to keep at most 2 of each 4 inputs")
