"""Where and how AWQ's per-input scales fold (compress.passes.awq): for each group of
linears that read one input, the op before them that absorbs 1/s, read from the block's
own structure and checked on calibration batch 0 (`place`), and the fold (`apply`).

One observed forward records every module the block calls, in order, with the tensors
it read and returned. The candidates for a group's input X, in this order:

- a norm: the module whose output *is* X (the very tensor) and whose parameters are a
  weight (and bias) of one value per channel of X: weight and bias are divided by s;
- a linear called before the group, not in it, whose outputs feed the inputs of X one
  to one, nearest first: its output rows (and bias) are divided by s. Which output
  feeds which input follows the shapes: as many outputs as inputs (v_proj -> o_proj,
  up_proj -> down_proj, fc1 -> fc2), the last or the first d_in outputs of a fused
  projection (the v part of a fused qkv), or under grouped-query attention each kv
  output repeated for the `num_key_value_groups` query heads that read it (the
  attention module's `head_dim`), whose inputs then share one scale.

A candidate is kept only if folding test scales into it leaves the block's output, and
the output of every module that holds parameters except the producer, unchanged on the
batch. The test scales are powers of two, which every float format multiplies exactly,
so a right fold leaves those outputs unchanged to the bit. This refuses, by
measurement: a norm whose output also feeds a router, a layer awq does not target, or
a residual; an activation between two linears that is not positively homogeneous
(SiLU, GELU: gate_proj -> down_proj, GPT-2's c_fc -> c_proj); a norm that computes
x * (1 + w) (Gemma). The first candidate kept is the fold; the folds of all groups are
tried together first (one forward), then one by one. A group with no fold gets the
reason, which the pass reports.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from compress.models import get_weight, is_linear

PROBE_TOKENS = 256     # rows of each observed output compared (the probe's memory)
PROBE_TOL = 1e-3       # relative: a right fold changes nothing, a wrong one O(1)
MAX_CANDIDATES = 4     # folds tried per group (one forward each, when the joint try fails)


@dataclass
class Fold:
    """Scales for the inputs of `group` (qualified names of linears that read one
    input) fold into `producer` (its name in the block): a norm, or a linear whose
    output `rows[j]` feeds input j (tied where rows repeat)."""

    group: tuple
    producer: str
    linear: bool
    rows: torch.Tensor   # [d_in] int64

    def tied(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the producer rows that get a scale [u], the scale of each input [d_in] as an
        index into them): s = t[inverse] for t [u]."""
        return torch.unique(self.rows, return_inverse=True)


def _rows_of(y) -> Optional[torch.Tensor]:
    y = y[0] if isinstance(y, (tuple, list)) and y and torch.is_tensor(y[0]) else y
    if not torch.is_tensor(y) or y.dim() == 0:
        return None
    return y.detach().reshape(-1, y.shape[-1])[:PROBE_TOKENS].float().clone()


@torch.no_grad()
def observe(ctx, full: bool) -> dict:
    """Forward calibration batch 0 through ctx.block. Returns {"rows": {module name
    ('' for the block): [first rows of each output]}} for the modules that hold
    parameters, and with `full` also "order" (names in first-call order), "inputs" and
    "outputs" ({name: the tensor it read / returned first})."""
    rec: dict = {"rows": {}, "order": [], "inputs": {}, "outputs": {}}

    def hook(name: str, watched: bool):
        def fn(module, args, out):
            if full and name not in rec["outputs"]:
                rec["order"].append(name)
                rec["inputs"][name] = args[0] if args and torch.is_tensor(args[0]) else None
                rec["outputs"][name] = out if torch.is_tensor(out) else None
            rows = _rows_of(out) if watched else None
            if rows is not None:
                rec["rows"].setdefault(name, []).append(rows)
        return fn

    handles = [m.register_forward_hook(hook(n, next(m.parameters(), None) is not None))
               for n, m in ctx.block.named_modules() if n]
    try:
        rec["rows"][""] = [_rows_of(ctx.forward(0))]
    finally:
        for h in handles:
            h.remove()
    return rec


def _changed(ref: dict, new: dict, skip: set) -> Optional[str]:
    """The first watched output that differs between two observations (None: none)."""
    for name, outs in ref.items():
        if name in skip:
            continue
        got = new.get(name, [])
        for a, b in zip(outs, got):
            if a.shape != b.shape or float((a - b).abs().max()) > PROBE_TOL * max(float(a.abs().max()), 1e-30):
                return f"the output of {name}" if name else "the block's output"
        if len(got) != len(outs):
            return f"the calls of {name}"
    return None


def _same(y, x) -> bool:
    """Whether x is y or a view of it with the same element order (a reshape)."""
    if x is None or y is None:
        return False
    return x is y or (x.data_ptr() == y.data_ptr() and x.numel() == y.numel() and x.shape[-1] == y.shape[-1]
            and x.is_contiguous() and y.is_contiguous())


def _is_norm(m: nn.Module, d: int) -> bool:
    """A module whose own parameters are a weight (and a bias) of one value per channel."""
    own = dict(m.named_parameters(recurse=False))
    return (not is_linear(m) and "weight" in own and set(own) <= {"weight", "bias"}
            and all(p.dim() == 1 and p.numel() == d for p in own.values()))


def _maps(out: int, d_in: int, parent: nn.Module) -> list[torch.Tensor]:
    """Candidate rows [d_in] of a producer with `out` outputs for d_in inputs."""
    rep = getattr(parent, "num_key_value_groups", None)
    hd = getattr(parent, "head_dim", None)
    maps = []
    for r in [1] + ([rep] if isinstance(rep, int) and rep > 1 else []):
        w = d_in // r
        if d_in % r or w > out or (r > 1 and not (isinstance(hd, int) and hd > 0 and w % hd == 0)):
            continue
        j = torch.arange(d_in)
        base = j if r == 1 else (j // hd // r) * hd + j % hd   # query head h reads kv head h // r
        maps += [base + off for off in dict.fromkeys([out - w, 0])]
    return maps


def candidates(ctx, rec: dict, group: list, prefix: str) -> tuple[list, list]:
    """(Folds to try for `group`, nearest first; reasons for the producers refused
    without a try)."""
    rel = [n[len(prefix) + 1:] for n in group]
    if any(n not in rec["inputs"] for n in rel):   # e.g. an expert no token of the batch reached
        return [], [f"{next(n for n in rel if n not in rec['inputs'])} is not called on the probe batch"]
    first = min(rec["order"].index(n) for n in rel)
    x = rec["inputs"][rel[0]]
    d_in = get_weight(ctx.modules[group[0]]).shape[1]
    makers = [n for n in rec["order"] if _same(rec["outputs"][n], x)
              and next(ctx.block.get_submodule(n).parameters(), None) is not None]
    if makers:   # X is what a module with parameters returned: only that module can absorb 1/s
        norms = [n for n in makers if _is_norm(ctx.block.get_submodule(n), d_in)]
        folds = [Fold(tuple(group), n, False, torch.arange(d_in)) for n in norms]
        return folds, [f"its input comes from {makers[0]}, which is no norm"]
    folds, why = [], []
    parent = ctx.block.get_submodule(rel[0].rpartition(".")[0]) if "." in rel[0] else ctx.block
    for n in reversed(rec["order"][:first]):
        m = ctx.block.get_submodule(n)
        if not is_linear(m) or n in rel:
            continue
        maps = _maps(get_weight(m).shape[0], d_in, parent)
        if maps and f"{prefix}.{n}" not in ctx.layers:
            why.append(f"{n} is not a target of awq")
            continue
        folds += [Fold(tuple(group), n, True, rows) for rows in maps]
    return folds[:MAX_CANDIDATES], why


@torch.no_grad()
def _scale_live(ctx, fold: Fold, t: torch.Tensor, saved: list) -> None:
    """Fold test scales t [u] into the live parameters (their old values onto `saved`)."""
    uniq, inv = fold.tied()
    s = t[inv]
    prod = ctx.block.get_submodule(fold.producer)
    params = [(get_weight(ctx.modules[n]), None, s) for n in fold.group]
    params += [(get_weight(prod), uniq, 1 / t), (getattr(prod, "bias", None), uniq, 1 / t)]
    for p, rows, f in params:
        if p is None:
            continue
        saved.append((p, p.detach().clone()))
        if rows is None:
            p.mul_(f.to(p))                                    # consumers: columns times s
        else:
            shape = (-1,) + (1,) * (p.dim() - 1)
            p[rows] = p[rows] * f.to(p).reshape(shape)           # producer: rows over t


def probe(ctx, ref: dict, folds: list) -> Optional[str]:
    """What folding test scales into `folds` changes (None: nothing), then undone."""
    saved: list = []
    try:
        for k, fold in enumerate(folds):
            u = int(fold.tied()[0].numel())
            gen = torch.Generator().manual_seed(k)
            _scale_live(ctx, fold, 2.0 ** (torch.randint(0, 2, (u,), generator=gen) * 2 - 1).float(), saved)
        new = observe(ctx, full=False)["rows"]
    finally:
        with torch.no_grad():
            for p, old in reversed(saved):   # last change first: a tensor changed twice ends as it was
                p.copy_(old)
    return _changed(ref, new, {f.producer for f in folds})


def place(ctx, groups: list, prefix: str) -> tuple[dict, dict]:
    """({group index: Fold}, {group index: reason}) for `groups` of qualified names."""
    rec = observe(ctx, full=True)
    ref, tries, reasons = rec["rows"], {}, {}
    for g, group in enumerate(groups):
        folds, why = candidates(ctx, rec, group, prefix)
        if folds:
            tries[g] = folds
        else:
            reasons[g] = "; ".join(why) or "no norm or linear before it produces its input one to one"
    del rec   # the traced tensors
    first = {g: f[0] for g, f in tries.items()}
    if first and probe(ctx, ref, list(first.values())) is None:
        return first, reasons
    chosen = {}
    for g, folds in tries.items():
        why = []
        for fold in folds:
            bad = probe(ctx, ref, [fold])
            if bad is None:
                chosen[g] = fold
                break
            why.append(f"folding 1/s into {fold.producer} changes {bad}")
        else:
            reasons[g] = "; ".join(dict.fromkeys(why))
    return chosen, reasons


@torch.no_grad()
def apply(ctx, fold: Fold, t: torch.Tensor, prefix: str) -> None:
    """Fold scales t [u] (s = t[inverse], fold.tied) in: the consumers' W and W_dense
    (the same function: rel_error stays comparable) times s, their shared statistics
    those of X / s, the producer's rows (W, W_dense, bias) or its norm weight and bias
    over t. Parameters that are not a layer's W go to their fp32 masters and the live
    block (BlockContext.masters)."""
    uniq, inverse = fold.tied()
    s = t[inverse.to(t.device)]
    for n in fold.group:
        L = ctx.layers[n]
        L.W.mul_(s.to(L.W))
        L.W_dense = L.W_dense * s.to(L.W_dense)
    st = ctx.layers[fold.group[0]].stats
    sd = s.to(st.sum)
    st.sum /= sd
    st.sumsq /= sd * sd
    st.abssum /= sd
    st.xtx /= (s[:, None] * s[None, :]).to(st.xtx)
    if fold.linear:   # `candidates` offers only producers awq targets
        P = ctx.layers[f"{prefix}.{fold.producer}"]
        P.W[uniq] = P.W[uniq] / t[:, None].to(P.W)
        P.W_dense[uniq] = P.W_dense[uniq] / t[:, None].to(P.W_dense)
    own = dict(ctx.block.named_parameters())
    for name in [f"{fold.producer}.bias"] + ([] if fold.linear else [f"{fold.producer}.weight"]):
        if name in own:
            _divide(ctx, own[name], name, uniq, t)


def _divide(ctx, p: torch.Tensor, name: str, rows: torch.Tensor, t: torch.Tensor) -> None:
    """Parameter p (`name` in the block) with `rows` divided by t: its fp32 master (what
    the runner keeps after reduced-precision forwards) and the live parameter."""
    master = ctx.masters[name] if ctx.masters is not None else p.detach()
    new = master.float().clone()
    new[rows.to(new.device)] /= t.to(new)
    if ctx.masters is not None:
        master.copy_(new.to(master.dtype))
    p.data.copy_(new.to(p.dtype))
