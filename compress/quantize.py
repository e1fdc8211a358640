"""Uniform group quantization: the grid every quantizing pass and runtime module shares.

A row of W [out, in] is cut into groups of `group_size` consecutive inputs (the last
group may be shorter: 576 inputs in groups of 128 give 4 full groups and one of 64).
Each group has a scale s and an integer zero point z; a weight is stored as the code

    u = clamp(round(w / s) + z, 0, 2^b - 1)        and read back as   w_hat = (u - z) * s

Symmetric grids fix z = 2^(b-1) (codes mean -2^(b-1) ... 2^(b-1) - 1) and take
s = max|w| / (2^(b-1) - 1); asymmetric grids take s = (max - min) / (2^b - 1) over a
range that always contains 0. Either way w = 0 is stored exactly (u = z), which is
what keeps a pruned weight exactly zero after quantization. Ranges are fitted on the
*kept* weights only (a pruned weight is not data, just a zero to be stored).

Scales are stored in fp16 and used as the fp16 value everywhere, so the weight a pass
computes and the weight a `QuantLinear` reconstructs from its packed codes are the
same numbers, bit for bit.

Optional MSE clipping (GPTQ's reference quantizer): shrink the range by p in
1, 1 - 1/grid, ..., 1 - maxshrink and keep, per group, the p with the least
sum |w - w_hat|^2.4 over the kept weights.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import torch

SCALE_DTYPE = torch.float16


@dataclass(frozen=True)
class QuantSpec:
    """bits 2..8; group_size None = one group per output row (per channel)."""

    bits: int = 4
    group_size: Optional[int] = 128
    symmetric: bool = False
    clip_search: bool = False
    clip_grid: int = 100
    clip_maxshrink: float = 0.8
    static_only = False   # compress.ggml's grids fit their blocks up front only

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def candidates(self) -> int:
        """Ranges the clip search tries per group."""
        return int(self.clip_maxshrink * self.clip_grid)

    def group(self, d_in: int) -> int:
        return d_in if self.group_size is None else self.group_size

    def n_groups(self, d_in: int) -> int:
        g = self.group(d_in)
        return (d_in + g - 1) // g

    # The grid interface RTN, GPTQ and QuantResult use (compress.ggml.GGMLSpec has it too).
    def fit_raw(self, wg: torch.Tensor, kg: torch.Tensor, imp: Optional[torch.Tensor] = None):
        """Scale and zero [..., G] of grouped weights wg, kg [..., G, g]; no stored extras.
        imp [..., 1, G, g] (GPTQ's H_jj, `hessian_fit`) weighs the clip search's errors."""
        return (*fit(wg, kg, self, imp), None)

    def quantize(self, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return quantize(w, s, z, self.qmax)

    def zero_code(self, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return z

    def dequantize(self, u: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return dequantize(u, s, z)


def round_scale(scale: torch.Tensor) -> torch.Tensor:
    """The fp32 value of the fp16 scale that is stored (clamped into fp16's range)."""
    return scale.clamp(2.0 ** -24, 65504.0).to(SCALE_DTYPE).float()


def fit_params(w: torch.Tensor, keep: Optional[torch.Tensor], spec: QuantSpec, shrink: float = 1.0):
    """Scale and zero point of each group. w [..., k] holds one group per row of the
    last dimension; keep [..., k] marks the weights that count (None: all).
    Returns scale [...], zero [...] (fp32; zero integer-valued)."""
    return _params(_range(_kept(w, keep), spec), spec, shrink)


def _kept(w: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """w with the weights that do not count set to 0 (a copy only where keep is given)."""
    return w if keep is None else torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device))


def _range(w: torch.Tensor, spec: QuantSpec) -> tuple:
    """Per group: (max |w|,) symmetric, or (lo, hi) asymmetric, the range holding 0."""
    if spec.symmetric:
        return (w.abs().amax(-1),)
    return w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)


def _params(rng: tuple, spec: QuantSpec, shrink: float):
    """Scale and zero point of the range `rng` (of _range) shrunk by `shrink`."""
    if spec.symmetric:
        half = 1 << (spec.bits - 1)
        amax = rng[0] * shrink
        scale = round_scale(torch.where(amax > 0, amax / (half - 1), torch.ones_like(amax)))
        return scale, torch.full_like(scale, float(half))
    lo, hi = rng[0] * shrink, rng[1] * shrink
    span = hi - lo
    scale = round_scale(torch.where(span > 0, span / spec.qmax, torch.ones_like(span)))
    zero = torch.round(-lo / scale).clamp(0, spec.qmax)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    """Codes u = clamp(round(w / s) + z, 0, qmax); scale / zero broadcast against w."""
    return torch.clamp(torch.round(w / scale) + zero, 0, qmax)


def dequantize(u: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """w_hat = (u - z) * s (fp32)."""
    return (u.float() - zero) * scale


def clip_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int,
               imp: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum_k |w_hat - w|^2.4 per group, [...]: dequantize(quantize(w)) - w in one buffer,
    in place (the search below evaluates it at every shrink over the whole matrix).
    |x|^2.4 as exp(2.4 log|x|): vectorized, twice as fast as pow on CPU, equal to fp32
    rounding (exp(-inf) = 0 where the error is 0). With imp (H_jj, like w): sum_k
    imp_k (w_hat - w)_k^2, the diagonal of GPTQ's objective (w - w_hat) H (w - w_hat)^T."""
    s, z = scale[..., None], zero[..., None]
    d = w / s
    d.round_().add_(z).clamp_(0, qmax).sub_(z).mul_(s).sub_(w)
    if imp is not None:
        return d.square_().mul_(imp).sum(-1)
    return d.abs_().log_().mul_(2.4).exp_().sum(-1)


CLIP_ROWS = 16384   # groups per chunk of the clip search: bounds its temporaries (4 MiB each at k = 64)


def fit(w: torch.Tensor, keep: Optional[torch.Tensor], spec: QuantSpec, imp: Optional[torch.Tensor] = None):
    """fit_params, with the MSE clipping search when spec.clip_search. w, keep [..., k]
    (one group per row). The error counts the kept weights only: the others are set to 0,
    which every grid stores exactly (its range holds 0), so they add exactly 0. Groups
    are independent: the search runs on chunks of CLIP_ROWS of them. imp (broadcast
    against w): per-input weights of the search's squared error (clip_error)."""
    w = _kept(w, keep)
    if not spec.clip_search:
        return _params(_range(w, spec), spec, 1.0)
    flat = w.reshape(-1, w.shape[-1])                              # [groups, k]
    imps = itertools.repeat(None) if imp is None else imp.float().expand(w.shape).reshape(flat.shape).split(CLIP_ROWS)
    parts = [_clip_search(c, spec, i) for c, i in zip(flat.split(CLIP_ROWS), imps)]
    return tuple(torch.cat(p).reshape(w.shape[:-1]) for p in zip(*parts))


def _clip_search(w: torch.Tensor, spec: QuantSpec, imp: Optional[torch.Tensor] = None):
    """Scale and zero point of each group (row of w [n, k]) at the shrink with the least
    clip_error: 1, 1 - 1/grid, ..., 1 - maxshrink."""
    rng = _range(w, spec)
    scale, zero = _params(rng, spec, 1.0)
    best = clip_error(w, scale, zero, spec.qmax, imp)
    for i in range(1, int(spec.clip_maxshrink * spec.clip_grid) + 1):
        s, z = _params(rng, spec, 1 - i / spec.clip_grid)
        e = clip_error(w, s, z, spec.qmax, imp)
        better = e < best
        best = torch.where(better, e, best)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


# ----------------------------------------------------------------------------- whole matrices

@dataclass
class QuantResult:
    """A quantized weight [out, in].

    codes  [out, in] uint8 codes u
    scale  [out, G] fp32 (fp16 values);  zero [out, G] fp32 integers (2^(b-1) if symmetric)
    g_idx  [in] int32 group of each input column, or None for contiguous groups
           (GPTQ with act_order and dynamic groups numbers groups in activation order)
    sparse24  the weight is exact 2:4 (a 2:4 pass ran before): store only the kept
           half of the codes (SparseQuantLinear)
    raw    what a ggml grid's blocks store besides the codes ({name: [out, blocks, ...]},
           compress.ggml), None on integer grids
    """

    spec: QuantSpec
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: Optional[torch.Tensor] = None
    sparse24: bool = False
    raw: Optional[dict] = None

    def dequantize(self) -> torch.Tensor:
        return dequantize_weight(self.codes, self.scale, self.zero, self.spec, self.g_idx)

    def split(self) -> list["QuantResult"]:
        """The results of a batch of experts (codes [E, out, in]), one per expert."""
        return [QuantResult(self.spec, self.codes[e], self.scale[e], self.zero[e],
                            None if self.g_idx is None else self.g_idx[e],
                            raw=None if self.raw is None else {k: v[e] for k, v in self.raw.items()})
                for e in range(self.codes.shape[0])]


def column_groups(d_in: int, spec: QuantSpec, device=None) -> torch.Tensor:
    """[in] group index of each input column for contiguous groups."""
    return torch.arange(d_in, device=device) // spec.group(d_in)


def dequantize_weight(codes, scale, zero, spec: QuantSpec, g_idx=None) -> torch.Tensor:
    """W_hat [out, in] fp32 from codes [out, in] and per-group scale / zero [out, G]."""
    gid = column_groups(codes.shape[1], spec, codes.device) if g_idx is None else g_idx.long()
    return spec.dequantize(codes, scale[:, gid], zero[:, gid])


def grouped(t: torch.Tensor, spec: QuantSpec, fill=0) -> torch.Tensor:
    """[..., out, in] -> [..., out, G, g], the last group padded with `fill`."""
    d_in = t.shape[-1]
    g, G = spec.group(d_in), spec.n_groups(d_in)
    pad = G * g - d_in
    if pad:
        t = torch.cat([t, t.new_full((*t.shape[:-1], pad), fill)], dim=-1)
    return t.reshape(*t.shape[:-1], G, g)


def rtn(W: torch.Tensor, keep: Optional[torch.Tensor], spec: QuantSpec) -> QuantResult:
    """Round-to-nearest of W [out, in] fp32 (or [E, out, in]: a batch of experts);
    pruned weights (keep False) stay zero."""
    keep = torch.ones_like(W, dtype=torch.bool) if keep is None else keep
    Wg, Kg = grouped(W, spec), grouped(keep, spec, fill=False)       # [..., out, G, g]
    scale, zero, raw = spec.fit_raw(Wg, Kg)                          # [..., out, G]
    s, z = scale[..., None], zero[..., None]
    codes = torch.where(Kg, spec.quantize(Wg, s, z), spec.zero_code(s, z))   # pruned -> the code of 0
    codes = codes.reshape(*W.shape[:-1], -1)[..., :W.shape[-1]].to(torch.uint8)
    return QuantResult(spec, codes, scale, zero, raw=raw)


# -- pieces of GPTQ's loop (compress/passes/quant.py), for any grid ------------------------

def round_column(spec, snap, w, s, z, keep):
    """Column w [..., out] on the grid of scales s, zero points z: its values q, and what
    the loop stores, the codes u (or, with snap, q itself); keep False -> the code of 0."""
    if snap is not None:
        q = snap(w, s)
        q = q if keep is None else torch.where(keep, q, 0.0)
        return q, q
    u = spec.quantize(w, s, z)
    if keep is not None:
        u = torch.where(keep, u, spec.zero_code(s, z))
    return spec.dequantize(u, s, z), u


def group_params(W, H, keep, spec, static: bool, hessian_fit: bool) -> tuple:
    """Scale, zero [..., out, G] and stored extras. Static groups: fitted before the loop
    (hessian_fit: H_jj [..., 1, G, g] weighs the fit's errors); dynamic: zeros to fill."""
    if not static:
        scale = W.new_zeros(*W.shape[:-1], spec.n_groups(W.shape[-1]))
        return scale, torch.zeros_like(scale), None
    imp = grouped(H.diagonal(dim1=-2, dim2=-1).unsqueeze(-2), spec) if hessian_fit else None
    return spec.fit_raw(grouped(W, spec), grouped(keep, spec, fill=False), imp)


def reorder_columns(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """t [..., r, n] with its columns reordered by perm [..., n]."""
    return t.gather(-1, perm.unsqueeze(-2).expand(t.shape))


def group_of(t: torch.Tensor, gid, j: int) -> torch.Tensor:
    """t [..., out, G] at the group of processed column j: [..., out]. gid: the group
    of each column (a list), or of each expert's columns [E, in]."""
    if isinstance(gid, list):
        return t[..., gid[j]]
    return t.gather(-1, gid[..., j, None, None].expand(*t.shape[:-1], 1)).squeeze(-1)
