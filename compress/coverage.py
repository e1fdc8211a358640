"""What a run compressed, and what it left alone: a model compressed only in part must
say so. Every run reports it in report.json and in the end-of-run log.

The decoder's weights are every parameter of two or more dimensions inside the decoder
blocks: linear weights, and also fused experts [E, out, in], convolutions, routers and
state-space matrices, which no pass edits. Each one is either compressed (a pass ran on
it: it has a report row), ignored (a pass's `ignore` excluded it on purpose), or
untouched, with the reason. Untouched weights are grouped by their name inside the
block, e.g. ``mlp.experts.gate_up_proj in 24 blocks``, and logged as warnings.

`summary.sparsity` counts zeros over all decoder weights; `targeted_sparsity` only
over the compressed layers.
"""
from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from typing import Optional

import torch
from torch import nn

from compress.experts import find_experts
from compress.models import find_blocks, is_linear, is_router
from compress.nn.base import dense_parameters

log = logging.getLogger(__name__)


def _why(block: nn.Module, module_name: str, param: str, p: torch.Tensor) -> str:
    """Why a pass never edits this weight (kind of parameter), or 'linear'."""
    m = block.get_submodule(module_name) if module_name else block
    if module_name and is_router(block, module_name):
        return "router (never a target)"
    if is_linear(m) and param == "weight":
        return "linear"
    if isinstance(m, nn.modules.conv._ConvNd):
        return "convolution (never a target)"
    if p.dim() >= 3:
        return f"fused experts in {type(m).__name__} (a {p.dim()}-D parameter, not nn.Linear: no pass compresses it)"
    return f"{type(m).__name__}.{param} (not a linear layer: never a target)"


def inventory(model) -> dict[str, dict]:
    """{qualified name: {'numel', 'kind', 'zeros'}} of every decoder weight (>= 2 dims),
    taken before the run: untouched weights keep these zero counts (None while the
    block is offloaded on the meta device)."""
    prefix, blocks = find_blocks(model)
    out = {}
    for i, block in enumerate(blocks):
        fused = _expert_weights(block, f"{prefix}.{i}", i)
        out.update(fused)
        for n, p in block.named_parameters():
            if p.dim() < 2 or n.endswith("bias"):   # weight matrices only (fused experts' [E, out] biases are not)
                continue
            if f"{prefix}.{i}.{n.rpartition('.')[0]}" in _modules_of(fused):
                continue
            mod, _, param = n.rpartition(".")
            zeros = None if p.is_meta else int((p == 0).sum())
            out[f"{prefix}.{i}.{n}"] = {"numel": p.numel(), "kind": _why(block, mod, param, p), "zeros": zeros,
                                        "block": i, "rel": n}
    return out


def _expert_weights(block, prefix: str, i: int) -> dict[str, dict]:
    """Each expert's projection of the fused experts modules this toolkit understands,
    as its own weight ``<experts>.<e>.<proj>.weight`` [out, in]: an expert is a layer."""
    out = {}
    for name, ex in find_experts(block, prefix, refuse=lambda n: False).items():
        for p in ex.projs:
            W = ex.weights(p)                                            # [E, out, in]
            zeros = None if W.is_meta else (W == 0).flatten(1).sum(1).tolist()
            for e in range(ex.num):
                rel = f"{ex.layer_name(e, p)}.weight"[len(prefix) + 1:]
                out[f"{prefix}.{rel}"] = {"numel": W[e].numel(), "kind": "linear", "block": i, "rel": rel,
                                          "zeros": None if zeros is None else zeros[e], "experts": name}
    return out


def _modules_of(fused: dict) -> set:
    return {w["experts"] for w in fused.values()}


def _ignored(name: str, configs) -> bool:
    layer = name.rpartition(".")[0]
    return any(any(re.search(p, layer) for p in c.ignore) for c in configs)


def _groups(items: list[tuple[str, dict]]) -> list[dict]:
    by = defaultdict(list)
    for _, w in items:
        by[(w["rel_key"], w["why"])].append(w)
    return [{"weights": k, "blocks": len({w["block"] for w in ws}), "parameters": sum(w["numel"] for w in ws),
             "why": why} for (k, why), ws in by.items()]


def _rel_key(rel: str) -> str:
    """A block-relative name with expert indices folded (mlp.experts.3.w1 -> mlp.experts.*.w1)."""
    return re.sub(r"\.\d+\.", ".*.", rel)


def coverage(model, weights: dict[str, dict], rows: list[dict], configs) -> tuple[dict, dict]:
    """(coverage section, {'sparsity', 'targeted_sparsity'}) from the inventory and the
    run's report rows (the last row of a layer is its final state)."""
    final = {r["layer"]: r for r in rows}
    compressed, ignored, untouched = [], [], []
    for name, w in weights.items():
        layer, _, param = name.rpartition(".")
        w = {**w, "rel_key": _rel_key(w["rel"])}
        if param == "weight" and layer in final:
            compressed.append((name, w))
            continue
        w["why"] = "not targeted by any pass" if w["kind"] == "linear" else w["kind"]
        (ignored if w["kind"] == "linear" and _ignored(name, configs) else untouched).append((name, w))
    total = sum(w["numel"] for w in weights.values())
    done = sum(w["numel"] for _, w in compressed)
    zeros_done = sum(final[n.rpartition(".")[0]]["sparsity"] * w["numel"] for n, w in compressed)
    zeros_rest = _zeros(model, ignored + untouched)
    section = {"decoder_weights": len(weights), "compressed_weights": len(compressed),
               "weight_fraction": len(compressed) / max(len(weights), 1),
               "decoder_parameters": total, "compressed_parameters": done, "parameter_fraction": done / max(total, 1),
               "untouched": _groups(untouched), "ignored": _groups(ignored),
               "outside_decoder_parameters": _outside(model)}
    sparsity = {"sparsity": (zeros_done + zeros_rest) / max(total, 1), "targeted_sparsity": zeros_done / max(done, 1)}
    return section, sparsity


def _zeros(model, items: list[tuple[str, dict]]) -> int:
    """Zeros of the untouched weights: counted at the inventory, or, for an offloaded
    block, read from its source (one file open per block)."""
    known = sum(w["zeros"] for _, w in items if w["zeros"] is not None)
    by_block = defaultdict(list)
    for _, w in items:
        if w["zeros"] is None:
            by_block[w["block"]].append(w["rel"])
    if not by_block:
        return known
    from safetensors import safe_open

    from compress.offload import lazy_of

    lazy = lazy_of(model)
    for i, rels in by_block.items():
        file, names, _ = lazy.sources[i]
        src = {dst: s for s, dst in names.items()}
        with safe_open(str(file), framework="pt") as f:
            known += sum(int((f.get_tensor(src[r]) == 0).sum()) for r in rels)
    return known


def _outside(model) -> int:
    """Parameters outside the decoder blocks (embeddings, head, vision tower), counted once."""
    _, blocks = find_blocks(model)
    inside = {id(p) for p in blocks.parameters()}
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in inside)


def parameter_count(model) -> int:
    """Parameters of the whole model as a dense one, a tied embedding and head counted
    once, a packed layer (a loaded compressed checkpoint) as its in x out weight: taken
    before the run, it prices the dense model (2 bytes each in 16 bits) for the summary."""
    return dense_parameters(model)


def bits_per_weight(model, rows: list[dict]) -> Optional[float]:
    """Storage bits per weight over the compressed layers: a packed runtime module counts
    its codes, scales, zero points and indices (`storage_bits`, as saved); a layer left
    as a plain weight (pruned only, zeros in place) counts 16 bits, what a 16-bit
    checkpoint stores, since the dtype it is saved in is the output's choice. None when
    no layer was compressed."""
    bits = n = 0
    for name, row in {r["layer"]: r for r in rows}.items():
        numel = math.prod(row.get("shape") or [0])
        try:
            m = model.get_submodule(name)
        except AttributeError:   # an expert inside a fused parameter that stayed plain
            m = None
        bits += m.storage_bits() if hasattr(m, "bits_per_weight") else 16 * numel
        n += numel
    return bits / n if n else None


def log_coverage(section: dict) -> None:
    """The end-of-run lines: what was compressed, and a warning per untouched group."""
    log.info("coverage: compressed %d of %d decoder weight matrices, %.2f %% of %s decoder parameters; "
             "%s parameters outside the decoder blocks (embeddings, head, vision tower) left as they are",
             section["compressed_weights"], section["decoder_weights"], 100 * section["parameter_fraction"],
             f"{section['decoder_parameters']:,}", f"{section['outside_decoder_parameters']:,}")
    for g in section["ignored"]:
        log.info("coverage: %s in %d blocks excluded by ignore", g["weights"], g["blocks"])
    for g in section["untouched"]:
        log.warning("not compressed: %s in %d blocks (%s parameters): %s", g["weights"], g["blocks"],
                    f"{g['parameters']:,}", g["why"])
