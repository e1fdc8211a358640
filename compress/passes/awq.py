"""Activation-aware weight quantization: per-input scales searched on the quantization
grid, folded into the op before each layer, then clipping (Lin et al., MLSys 2024,
"AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration").

For a group of linears that read one input X (q/k/v, gate/up, o, down), input channels
with large activations are scaled up before quantization, so that their weights lose
less to rounding (Sec. 3.2, Eq. 4-5):

    s = mean_t |x_j|^alpha,   s <- s / sqrt(max(s) min(s)),
    alpha* = argmin over alpha in {0, 1/n_grid, ..., 1 - 1/n_grid} of
             sum_l || Q(W_l diag(s)) (diag(s)^-1 X) - W_l X ||^2

with Q round-to-nearest on the grid the quant pass after awq stores (or awq's own
`bits` / `group_size` / `symmetric`). The error is tr(D XᵀX Dᵀ), D = Q(W diag(s))
diag(s)^-1 - W, on the runner's XᵀX: every calibration token. alpha = 0 is s = 1, plain
RTN, so the searched error never exceeds RTN's. W diag(s) replaces W, and 1/s folds into
the op that produces X (compress.passes.awq_fold: the norm before q/k/v and gate/up,
v_proj's rows before o_proj, up_proj's rows before down_proj), so the block computes the
same function; a group whose scale no op can absorb keeps s = 1 and its report row says
why (`awq_skipped`).

Then clipping (the reference's auto_clip): per output row and quantization group, the
weights are clamped to ±r·max|w|, r in 1, 1 - 1/clip_grid, ... (int(max_shrink ·
clip_grid) ratios), r minimising that group's share of the output error, dᵀ H_gg d (H_gg
the group's diagonal block of XᵀX of the scaled inputs; the reference uses 512 sampled
tokens, XᵀX holds them all). q_proj and k_proj are not clipped (`clip_ignore`), as in
the reference: rounding errors there pass through rotary embeddings and the query-key
product. By default only layers rounded to nearest are clipped, not those GPTQ
quantizes (`AWQConfig.clip`). Scaling a column and clamping keep a zero a zero: an N:M
pattern stays exact.

awq stores nothing: put the quant pass after it. Its block stage ends the sweep segment
(compress.block.segments), so the passes after it collect fresh statistics of the
rescaled block: GPTQ's XᵀX is that of X / s.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from compress.errors import CompressError
from compress.passes.awq_fold import Fold, apply, place
from compress.passes.base import BlockContext, Layer, PassConfig, register, register_block
from compress.quantize import QuantSpec, grouped, rtn

log = logging.getLogger(__name__)

CLIP_IGNORE = [r"\.(q|k)_proj$", r"\.(query|key)$"]
EXPERTS = ("fused MoE experts: the router reads the same input, so no op before them can absorb a "
           "per-input scale")


@dataclass
class AWQConfig(PassConfig):
    """bits, group_size, symmetric  the grid the search quantizes on. Left out: that of
                the first quant pass after awq that targets the layer (any format it
                has); with `bits`, awq's own integer grid (group_size default 128,
                'channel' for per row; symmetric default false)
    n_grid      alpha takes n_grid values i / n_grid in [0, 1) (paper: 20)
    clip        search and apply the per-group clipping. Left out: on the layers that
                are rounded to nearest (the quant after awq has method rtn, or none
                follows), not on those GPTQ quantizes: GPTQ reconstructs the clamped
                weight as its target, so the clamp is error it cannot compensate, and
                its own clip_search fits ranges without moving the target. SmolLM2 W3
                g64: AWQ + GPTQ 66.9 perplexity without clipping, 72.8 with; AWQ + RTN
                112.1 without, 103.1 with (GPTQ 78.5, RTN 139.1; README)
    clip_grid, max_shrink  clipping ratios 1 - i / clip_grid for i < max_shrink · clip_grid
                (reference: 20 and 0.5, i.e. 1 down to 0.55)
    clip_ignore regular expressions of layers that are not clipped (q_proj, k_proj)"""

    bits: Optional[int] = field(default=None, metadata={"means": "the grid of the quant pass after awq"})
    group_size: Union[int, str, None] = field(default=None, metadata={"means": "the quant's; with bits: 128"})
    symmetric: Optional[bool] = field(default=None, metadata={"means": "the quant's; with bits: false"})
    n_grid: int = 20
    clip: Optional[bool] = field(default=None, metadata={"means": "the layers rounded to nearest, not GPTQ's"})
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_ignore: list = field(default_factory=lambda: list(CLIP_IGNORE))

    needs_stats = True
    needs_xtx = True
    batched = True   # the layer stage only marks layers; fused experts as one call
    _quants = ()     # the quant passes after awq in the recipe (set by link; not a field)

    @property
    def trains_blocks(self) -> bool:
        return False   # the block stage reads statistics and probes one batch; it trains nothing

    def validate(self) -> None:
        super().validate()
        n = self.name

        def integer(v, lo):
            return isinstance(v, int) and not isinstance(v, bool) and v >= lo

        if self.bits is not None and not (integer(self.bits, 2) and self.bits <= 8):
            raise CompressError(f"{n}.bits: expected an integer from 2 to 8, got {self.bits!r}")
        if self.group_size not in (None, "channel") and not integer(self.group_size, 1):
            raise CompressError(f"{n}.group_size: expected a positive integer or 'channel', got {self.group_size!r}")
        for key in ("symmetric", "clip"):
            if not isinstance(getattr(self, key), (bool, type(None))):   # None: left out
                raise CompressError(f"{n}.{key}: expected true or false, got {getattr(self, key)!r}")
        if self.bits is None and (self.group_size is not None or self.symmetric is not None):
            raise CompressError(f"{n}.bits: group_size and symmetric make awq's own grid, which needs bits too")
        for key in ("n_grid", "clip_grid"):
            if not integer(getattr(self, key), 1):
                raise CompressError(f"{n}.{key}: expected an integer >= 1, got {getattr(self, key)!r}")
        m = self.max_shrink
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m < 1:
            raise CompressError(f"{n}.max_shrink: expected a number in [0, 1), got {m!r}")
        if not isinstance(self.clip_ignore, list) or not all(isinstance(p, str) for p in self.clip_ignore):
            raise CompressError(f"{n}.clip_ignore: expected a list of regular expressions")
        for p in self.clip_ignore:
            try:
                re.compile(p)
            except re.error as e:
                raise CompressError(f"{n}.clip_ignore: bad regular expression {p!r} ({e})") from None

    def link(self, later: list) -> None:
        self._quants = tuple(c for c in later if c.name == "quant")
        if self.bits is None and not self._quants:
            raise CompressError(f"{self.name}.bits: no quant pass follows awq in the recipe; put quant after awq "
                                f"(awq searches on its grid) or give awq its own grid (bits, group_size, symmetric)")

    def clips(self, name: str) -> bool:
        """Whether the layer is clipped: `clip`, or left out, unless GPTQ quantizes it."""
        if self.clip is not None:
            return self.clip
        quant = next((q for q in self._quants if q.applies_to(name)), None)
        return quant is None or quant.method == "rtn"

    def grid(self, layer: Layer):
        """The grid the search quantizes `layer` on, without its clip search (RTN, as in
        the paper); None when no quant pass after awq targets the layer."""
        if self.bits is not None:
            group = {None: 128, "channel": None}.get(self.group_size, self.group_size)
            return QuantSpec(self.bits, group, bool(self.symmetric))
        quant = next((q for q in self._quants if q.applies_to(layer.name)), None)
        if quant is None:
            return None
        spec = quant.spec_for(dataclasses.replace(layer, info={}))   # its notes are quant's to make
        fields = {f.name for f in dataclasses.fields(spec)} if dataclasses.is_dataclass(spec) else set()
        return dataclasses.replace(spec, clip_search=False) if "clip_search" in fields else spec


AWQ = AWQConfig


def fake_quant(W: torch.Tensor, spec) -> torch.Tensor:
    """Q(W): round-to-nearest on `spec`; zeros stay zero (stored as the code of 0)."""
    return rtn(W, W != 0, spec).dequantize().reshape(W.shape)


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """||(W_hat - W) X||^2 = tr(D XᵀX Dᵀ), D = W_hat - W [out, in], H = XᵀX [in, in]."""
    D = W_hat - W
    return float(((D @ H) * D).sum(dtype=torch.float64))


@torch.no_grad()
def search_scale(Ws: list, specs: list, H: torch.Tensor, absmean: torch.Tensor, inverse: torch.Tensor,
                 n_grid: int) -> tuple[torch.Tensor, float, float]:
    """AWQ's grid search for the layers Ws [out, in] (their grids `specs`) that read one
    input with XᵀX H [in, in] and E|x_j| absmean [in]. Inputs j with equal inverse[j]
    share one scale (the kv channels that grouped-query attention repeats); their
    statistic is the mean of theirs. Returns (t [u]: the scale of each of the u shared
    inputs, so s = t[inverse]; alpha; the group's error at alpha over RTN's, <= 1)."""
    u = int(inverse.max()) + 1
    a = torch.zeros(u, device=absmean.device).index_add_(0, inverse, absmean.float())
    a = a / torch.bincount(inverse, minlength=u).to(a)
    best, alpha_best, t_best, base = float("inf"), 0.0, torch.ones_like(a), None
    for i in range(n_grid):
        alpha = i / n_grid
        t = a.pow(alpha).clamp(min=1e-4)
        t = t / (t.max() * t.min()).sqrt()
        s = t[inverse]
        err = sum(output_error(W, fake_quant(W * s, spec) / s, H) for W, spec in zip(Ws, specs))
        base = err if base is None else base
        if err < best:
            best, alpha_best, t_best = err, alpha, t
    return t_best, alpha_best, (best / base if base else 1.0)


@torch.no_grad()
def clip_search(W: torch.Tensor, H: torch.Tensor, spec, n_grid: int, max_shrink: float) -> tuple[torch.Tensor, float]:
    """AWQ's auto_clip of W [out, in] on its grid: per row and group g, the max |w|
    shrink r in 1, 1 - 1/n_grid, ... (int(max_shrink · n_grid) of them) that minimises
    d_gᵀ H_gg d_g, d = Q(clamp(W, ±r·max|w_g|)) - W. Returns (the clamped W, mean r)."""
    out, d_in = W.shape
    spec_g = QuantSpec(group_size=min(spec.group(d_in), d_in))     # the grid's groups (any format's)
    Wg = grouped(W, spec_g)                                        # [out, G, g]
    G, g = Wg.shape[1:]
    Hp = torch.zeros(G * g, G * g, dtype=H.dtype, device=H.device)
    Hp[:d_in, :d_in] = H
    Hb = Hp.reshape(G, g, G, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)   # [G, g, g] diagonal blocks
    top = Wg.abs().amax(-1, keepdim=True)                          # [out, G, 1]
    best = torch.full(top.shape[:2], float("inf"), device=W.device)
    r_best = torch.ones_like(best)
    for i in range(int(max_shrink * n_grid)):
        r = 1 - i / n_grid
        Wc = torch.maximum(torch.minimum(Wg, top * r), -top * r).reshape(out, -1)[:, :d_in]
        D = grouped(fake_quant(Wc, spec) - W, spec_g)              # [out, G, g]
        err = torch.einsum("ogi,gij,ogj->og", D, Hb, D)
        better = err < best
        best, r_best = torch.where(better, err, best), torch.where(better, torch.full_like(r_best, r), r_best)
    lim = top * r_best[..., None]
    Wc = torch.maximum(torch.minimum(Wg, lim), -lim).reshape(out, -1)[:, :d_in]
    return Wc.contiguous(), float(r_best.mean())


@register("awq", AWQConfig)
def awq(layer: Layer, cfg: AWQConfig) -> None:
    """The layer stage: AWQ needs the whole block (`awq_block`). Until the block stage
    places a layer, its report row says why it was not scaled: fused experts (W [E, out,
    in]) never reach it."""
    layer.info["awq_skipped"] = EXPERTS if layer.W.dim() == 3 else "awq's block stage did not reach this layer"


@register_block("awq")
@torch.no_grad()
def awq_block(ctx: BlockContext, cfg: AWQConfig) -> None:
    """Search, fold and clip every group of ctx.layers that read one input."""
    some = next(iter(ctx.modules))
    rel = next(n for n, m in ctx.block.named_modules() if m is ctx.modules[some])
    prefix = some[: len(some) - len(rel) - 1]
    groups: dict = {}
    for n, L in ctx.layers.items():   # layers that read one input share one statistics object
        groups.setdefault(id(L.stats), []).append(n)
    specs = {n: cfg.grid(L) for n, L in ctx.layers.items()}
    todo, skipped = [], {}
    for group in groups.values():
        missing = [n for n in group if specs[n] is None]
        if missing:
            skipped[tuple(group)] = f"no quant pass after awq targets {missing[0][len(prefix) + 1:]}"
        else:
            todo.append(group)
    folds, reasons = place(ctx, todo, prefix) if todo else ({}, {})
    skipped.update({tuple(todo[g]): why for g, why in reasons.items()})
    for fold in folds.values():
        _scale(ctx, cfg, fold, specs, prefix)
    for group, why in skipped.items():
        for n in group:
            ctx.layers[n].info["awq_skipped"] = why
        _warn(cfg, group[0][len(prefix) + 1:], why)
    for n, L in ctx.layers.items():
        if cfg.clip is False or specs[n] is None:
            continue
        if not cfg.clips(n) or any(re.search(p, n) for p in cfg.clip_ignore):
            L.info["awq_clip"] = "not clipped (clip_ignore)" if cfg.clips(n) else "not clipped (GPTQ follows)"
            continue
        W, r = clip_search(L.W, L.stats.xtx, specs[n], cfg.clip_grid, cfg.max_shrink)
        L.W.copy_(W)
        L.info["awq_clip"] = round(r, 4)


def _scale(ctx: BlockContext, cfg: AWQConfig, fold: Fold, specs: dict, prefix: str) -> None:
    """Search the scale of fold.group, fold it in (awq_fold.apply) and note it."""
    Ls = [ctx.layers[n] for n in fold.group]
    st = Ls[0].stats
    inverse = fold.tied()[1].to(st.xtx.device)
    t, alpha, ratio = search_scale([L.W for L in Ls], [specs[n] for n in fold.group], st.xtx, st.absmean,
                                   inverse, cfg.n_grid)
    apply(ctx, fold, t, prefix)
    for L in Ls:
        L.info.pop("awq_skipped", None)
        L.info.update(awq_alpha=alpha, awq_into=fold.producer, awq_error_vs_rtn=round(ratio, 4))


def _warn(cfg: AWQConfig, rel: str, why: str) -> None:
    """One warning per layer (by its name in the block) and reason and run; every block's
    rows carry it in report.json."""
    seen = cfg.__dict__.setdefault("_warned", set())
    if (rel, why) not in seen:
        seen.add((rel, why))
        log.warning("awq: %s not scaled: %s (logged once; each block's report rows say so)", rel, why)
