"""llama.cpp's block formats as quantization grids: codes that RTN and GPTQ choose on
ggml's own grids, which the GGUF exporter then writes bit for bit (compress.ggml_blocks).

A format cuts each row into blocks of `block` weights, and each block into groups
("sub-blocks") of `sub` weights. Group g's fp32 scale s_g and zero z_g are products of
what the block stores:

    type  block sub  stored per block                 weight of code u
    Q8_0    32  32   fp16 d                           (u - 128) * d
    Q4_0    32  32   fp16 d                           (u - 8) * d
    Q5_0    32  32   fp16 d                           (u - 16) * d
    Q4_1    32  32   fp16 d, m                        u * d + m            (z = -m)
    Q5_1    32  32   fp16 d, m                        u * d + m
    Q4_K   256  32   fp16 d, dmin; 6-bit sc_g, m_g    u * (d sc_g) - dmin m_g
    Q5_K   256  32   as Q4_K, 5-bit codes             u * (d sc_g) - dmin m_g
    Q6_K   256  16   fp16 d; int8 sc_g                (u - 32) * (d sc_g)

Kind "sym": w_hat = (u - z) * s with z = 2^(b-1); kind "min": w_hat = u * s - z. These
are ggml's dequantization products in its order, in fp32, so our weights are llama.cpp's.

Fitting follows ggml's reference quantizers (ggml-quants.c): a sub-block's scale (and
min) come from a search over candidate code assignments, each refitted by weighted
least squares (weights x^2 for symmetric grids, rms(x) + |x| for the others); then a
K block rounds its sub-block scales and mins to 6 bits against the block's largest.
Without `search` the scale is the plain extreme, as ggml's Q4_0 / Q8_0 references do.
GPTQ replaces those weights by each input's H_jj = mean x_j^2 over the calibration
tokens: the error of a block's scale costs sum_j H_jj (w_j - w_hat_j)^2 in the layer's
output (the diagonal of GPTQ's objective tr((W - W_hat) H (W - W_hat)^T)), the same
diagonal that llama.cpp's importance matrix (imatrix) estimates.

Pruned weights (keep False) are not data: they get weight 0. A symmetric grid stores
0 exactly (u = z). Q4_K / Q5_K blocks that hold pruned weights use a zero-exact layout
of the same format: dmin = 2^(b-1) d and m_g = sc_g, so z_g = 2^(b-1) s_g exactly and
code 2^(b-1) is 0. Q4_1 / Q5_1 cannot store 0 exactly; the quant pass warns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# type: (block, sub, bits, kind). llama.cpp falls back to these for rows that are not
# whole 256-weight super-blocks (llama-quant.cpp), and so do we.
FORMATS = {"q8_0": (32, 32, 8, "sym"), "q4_0": (32, 32, 4, "sym"), "q5_0": (32, 32, 5, "sym"),
           "q4_1": (32, 32, 4, "min"), "q5_1": (32, 32, 5, "min"),
           "q4_k": (256, 32, 4, "min"), "q5_k": (256, 32, 5, "min"), "q6_k": (256, 16, 6, "sym")}
FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
ZERO_EXACT = ("q8_0", "q4_0", "q5_0", "q4_k", "q5_k", "q6_k")


@dataclass(frozen=True)
class GGMLSpec:
    """One of FORMATS, with the interface of compress.quantize.QuantSpec."""

    fmt: str = "q4_k"
    clip_search: bool = True         # ggml's least-squares candidate search (else plain extremes)
    static_only = True               # groups are fitted up front: GPTQ's static groups

    @property
    def block(self) -> int:
        return FORMATS[self.fmt][0]

    @property
    def group_size(self) -> int:
        return FORMATS[self.fmt][1]

    @property
    def bits(self) -> int:
        return FORMATS[self.fmt][2]

    @property
    def kind(self) -> str:
        return FORMATS[self.fmt][3]

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def candidates(self) -> int:
        return 21

    def group(self, d_in: int) -> int:
        return self.group_size

    def n_groups(self, d_in: int) -> int:
        return d_in // self.group_size

    def fit_raw(self, wg: torch.Tensor, kg: torch.Tensor, imp: Optional[torch.Tensor] = None):
        """wg, kg [..., out, G, sub] (G groups of a row) -> scale, zero [..., out, G] and
        the stored parameters {name: [..., out, blocks(, groups)]}. imp [..., 1, G, sub]:
        each input's weight in the search's least squares (GPTQ's H_jj), replacing
        ggml's weights that come from w alone; None: ggml's."""
        n = self.block // self.group_size
        lead = wg.shape[:-2]
        x = wg.reshape(-1, n, self.group_size).float()
        keep = kg.reshape(x.shape)
        weights = None if imp is None else imp.float().expand(wg.shape).reshape(x.shape)
        s, z, raw = fit_blocks(torch.where(keep, x, torch.zeros_like(x)), keep, self, weights)
        nb = wg.shape[-2] // n
        raw = {k: v.reshape(*lead, nb, *v.shape[1:]) for k, v in raw.items()}
        return s.reshape(*lead, -1), z.reshape(*lead, -1), raw

    def quantize(self, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Codes of w on groups (s, z) broadcast against it; a zero scale gives the code of 0."""
        safe = torch.where(s != 0, s, torch.ones_like(s))
        u = torch.round(w / safe) + z if self.kind == "sym" else torch.round((w + z) / safe)
        return torch.where(s != 0, u.clamp(0, self.qmax), self.zero_code(s, z))

    def zero_code(self, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The code that stores a pruned weight: z on symmetric grids, round(z / s) else."""
        if self.kind == "sym":
            return z
        safe = torch.where(s != 0, s, torch.ones_like(s))
        return torch.where(s != 0, torch.round(z / safe).clamp(0, self.qmax), torch.zeros_like(z))

    def dequantize(self, u: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (u.float() - z) * s if self.kind == "sym" else u.float() * s - z


def fp16(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(-65504.0, 65504.0).to(torch.float16).float()


def _sym(x: torch.Tensor, keep: torch.Tensor, h: int, search: bool, positive: bool,
         weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scale of each group of x [..., k] on codes -h .. h-1: the extreme (signed, onto -h,
    as Q4_0; or max |x| onto h - 1 if `positive`, as Q8_0), or with `search` the best
    least-squares refit (weights x^2, or `weights`) over 19 nearby candidate scales. 0 for
    an empty group."""
    amax, i = x.abs().max(-1)
    ext = amax if positive else x.gather(-1, i[..., None]).squeeze(-1)
    ok = amax > 0
    ref = torch.where(ok, ext, torch.ones_like(ext))
    base = (h - 1 if positive else -h) / ref                     # iscale
    if not search:
        return torch.where(ok, 1 / base, torch.zeros_like(base))
    w = (x * x if weights is None else weights) * keep
    best_num, best_den = torch.zeros_like(amax), torch.ones_like(amax)
    best = torch.where(ok, 1 / base, torch.zeros_like(base))
    for t in [0.0] + [0.1 * i for i in range(-9, 10) if i]:
        iscale = ((h - 1 + t) if positive else -(h + t)) / ref
        lv = torch.round(iscale[..., None] * x).clamp(-h, h - 1)
        num, den = (w * x * lv).sum(-1), (w * lv * lv).sum(-1)
        better = (den > 0) & (num * num * best_den > best_num * best_num * den)   # larger num^2 / den
        best = torch.where(better, num / den.clamp_min(1e-30), best)
        best_num, best_den = torch.where(better, num, best_num), torch.where(better, den, best_den)
    return torch.where(ok, best, torch.zeros_like(best))


def _asym(x: torch.Tensor, keep: torch.Tensor, qmax: int, search: bool, weights: Optional[torch.Tensor] = None):
    """(scale, min) of each group of x [..., k], min <= 0, on codes 0 .. qmax: the range,
    or with `search` the best weighted least-squares refit over 21 candidate scales
    (weights rms(x) + |x|, ggml's make_qkx2_quants, or `weights`)."""
    lo, hi = x.amin(-1).clamp(max=0), x.amax(-1)
    span = hi - lo
    ok = span > 0
    span1 = torch.where(ok, span, torch.ones_like(span))
    scale, mn = torch.where(ok, span / qmax, torch.zeros_like(span)), lo
    if not search:
        return scale, mn
    cnt = keep.sum(-1).clamp_min(1)
    w = ((x * x).sum(-1, keepdim=True) / cnt[..., None]).sqrt() + x.abs() if weights is None else weights
    w = w * keep

    def error(sc, m, lv):
        return (w * (sc[..., None] * lv + m[..., None] - x) ** 2).sum(-1)

    best = error(scale, mn, torch.round((x - lo[..., None]) / torch.where(ok, scale, 1.0)[..., None]).clamp(0, qmax))
    sw, sx = w.sum(-1), (w * x).sum(-1)
    for i in range(21):
        iscale = (qmax - 1 + 0.1 * i) / span1
        lv = torch.round(iscale[..., None] * (x - lo[..., None])).clamp(0, qmax)
        sl, sll, sxl = (w * lv).sum(-1), (w * lv * lv).sum(-1), (w * lv * x).sum(-1)
        D = sw * sll - sl * sl
        Ds = torch.where(D > 0, D, torch.ones_like(D))
        sc, m = (sw * sxl - sx * sl) / Ds, (sll * sx - sl * sxl) / Ds
        pos = m > 0                                              # the min must not exceed 0
        sc = torch.where(pos, sxl / sll.clamp_min(1e-30), sc)
        m = torch.where(pos, torch.zeros_like(m), m)
        e = error(sc, m, lv)
        better = ok & (D > 0) & (e < best)
        best = torch.where(better, e, best)
        scale, mn = torch.where(better, sc, scale), torch.where(better, m, mn)
    return scale, mn


def _six_bit(v: torch.Tensor) -> torch.Tensor:
    """Per block (last dim the groups): fp16 d = max / 63 and codes round(63 v / max)."""
    vmax = v.amax(-1)
    inv = torch.where(vmax > 0, 63 / torch.where(vmax > 0, vmax, torch.ones_like(vmax)), torch.zeros_like(vmax))
    return fp16(vmax / 63), torch.round(inv[..., None] * v).clamp(0, 63)


def fit_blocks(x: torch.Tensor, keep: torch.Tensor, spec: GGMLSpec, weights: Optional[torch.Tensor] = None):
    """x, keep [N, n, sub]: N blocks of n groups (pruned weights already 0); weights
    [N, n, sub] for the search's least squares, or None for ggml's. Returns the groups'
    scale, zero [N, n] and the stored parameters (fp16 values as fp32, integer sub-block
    scales as fp32)."""
    h, search = 1 << (spec.bits - 1), spec.clip_search
    if spec.fmt == "q6_k":
        sg = _sym(x, keep, h, search, positive=False, weights=weights)                            # [N, 16] signed
        ms = sg.gather(-1, sg.abs().argmax(-1, keepdim=True)).squeeze(-1)
        iscale = torch.where(ms != 0, -128 / torch.where(ms != 0, ms, torch.ones_like(ms)), torch.zeros_like(ms))
        d = fp16(torch.where(ms != 0, 1 / torch.where(iscale != 0, iscale, torch.ones_like(iscale)), 0.0))
        sc = torch.round(iscale[..., None] * sg).clamp(-128, 127)
        s = d[..., None] * sc
        return s, torch.full_like(s, float(h)), {"d": d, "sc": sc}
    if spec.block == 32:                                                         # one group per block
        if spec.kind == "sym":
            d = fp16(_sym(x, keep, h, search, positive=spec.fmt == "q8_0", weights=weights))
            return d, torch.full_like(d, float(h)), {"d": d[..., 0]}
        sc, mn = _asym(x, keep, spec.qmax, search, weights)
        d, m = fp16(sc), fp16(mn)
        return d, -m, {"d": d[..., 0], "m": m[..., 0]}
    # Q4_K / Q5_K: dense blocks take the asymmetric fit, blocks with pruned weights the zero-exact one.
    sc, mn = _asym(x, keep, spec.qmax, search, weights)
    d, sc6 = _six_bit(sc)
    dmin, m6 = _six_bit(-mn)
    d0, sc0 = _six_bit(_sym(x, keep, h, search, positive=True, weights=weights))
    sparse = ~keep.all(-1).all(-1)                                               # [N]
    d, sc6 = torch.where(sparse, d0, d), torch.where(sparse[:, None], sc0, sc6)
    dmin, m6 = torch.where(sparse, d0 * h, dmin), torch.where(sparse[:, None], sc0, m6)
    return d[:, None] * sc6, dmin[:, None] * m6, {"d": d, "dmin": dmin, "sc": sc6, "m": m6}


def format_for(fmt: str, d_in: int) -> Optional[str]:
    """The format a row of d_in inputs gets: fmt, llama.cpp's fallback where the row is
    not whole super-blocks, or None when not even that fits."""
    if d_in % FORMATS[fmt][0] == 0:
        return fmt
    alt = FALLBACK.get(fmt)
    return alt if alt is not None and d_in % FORMATS[alt][0] == 0 else None
