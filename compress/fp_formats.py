"""Floating-point group formats as quantization grids: NVFP4, MXFP4 and FP8 (E4M3), with
the interface of compress.quantize.QuantSpec, so that RTN, GPTQ and sparsity-awareness
run on them unchanged. The codes are the formats' own bit patterns, which the
compressed-tensors exporter packs as vLLM reads them.

    format  element            group  scale of a group                 weight of code u
    nvfp4   E2M1 (4 bit)       16     E4M3, under one fp32 global g    E2M1[u] * e4m3(S) / g
    mxfp4   E2M1 (4 bit)       32     E8M0: a power of two 2^e         E2M1[u] * 2^e
    fp8     E4M3 (8 bit)       row    fp32, one per output row          E4M3[u] * s

E2M1 codes are sign << 3 | magnitude index into 0, 0.5, 1, 1.5, 2, 3, 4, 6; E4M3 codes
are float8_e4m3fn's bits (largest finite 448). Values round to nearest, ties to even,
and saturate at the largest magnitude.

The scales are rounded to their own format inside the fit, and the codes are chosen
against the rounded scale (not rounded after the fact):

- NVFP4 (NVIDIA's Blackwell format, as llm-compressor and ModelOpt define it): the
  tensor's global scale g = 448 * 6 / max|W| lets the largest group scale use E4M3's
  whole range (max over the layers a serving engine fuses, q/k/v and gate/up, which
  vLLM loads with one global scale: `global_amax`); group k's stored scale is S_k = e4m3(max|w_k| / 6 * g), and its
  effective scale S_k / g (an fp32 division, as compressed-tensors dequantizes).
- MXFP4 (OCP Microscaling v1.0): e = floor(log2 max|w_k|) - 2, the element format's
  largest exponent, except that a group maximum whose mantissa is 1.75 or more takes
  e + 1, so that it is not clipped from about 7 down to 6 (compressed-tensors' rule).
- FP8: s = max|w_row| / 448, in fp32.

With `clip_search`, each group (row for fp8) also tries smaller scales and keeps the
one with the least sum |w - w_hat|^2.4 (compress.quantize's criterion; under GPTQ's
`hessian_fit`, sum_j H_jj (w_j - w_hat_j)^2): NVFP4 the eight
E4M3 values below its min-max scale (every distinct rounded scale a shrink down to 1/2
gives), FP8 the shrinks 0.99 ... 0.90; MXFP4 its two exponents e and e + 1. Zero is exact on every grid (u = 0), which keeps a
pruned weight zero. Every format is symmetric and fits its groups up front (GPTQ's
static groups: NVFP4's global scale needs the whole tensor).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
E2M1_CODES = torch.cat([E2M1, -E2M1])                       # [16]: code -> value
E4M3_MAX, E2M1_MAX = 448.0, 6.0
# float8_e4m3fn's bit patterns, code -> value ([256]; 0x7F and 0xFF are NaN, never produced)
E4M3_CODES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()

# format: (element bits, group size (None: per row), scale kind)
FORMATS = {"nvfp4": (4, 16, "e4m3"), "mxfp4": (4, 32, "e8m0"), "fp8": (8, None, "fp32")}


# The midpoints between E2M1 magnitudes; those that round up (ties to the even mantissa)
# are moved one fp32 step down, so that "a > bound" counts for every midpoint alike.
_MIDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
_BOUNDS = torch.where(torch.tensor([False, True, False, True, False, True, False]),
                      torch.nextafter(_MIDS, torch.tensor(0.0)), _MIDS)
_ONE_OP = 4096   # up to this many values (a GPTQ column) one bucketize beats seven compares


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Codes (float-valued, 0..15) of x rounded to E2M1: nearest, ties to the even
    mantissa (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4),
    saturating at 6. Zero is code 0 whatever the sign of x (|x| <= 0.25 has no sign bit)."""
    a = x.abs()
    if x.numel() <= _ONE_OP:   # GPTQ calls this once per column: per-call overhead rules
        return (torch.bucketize(a, _BOUNDS.to(a.device)) + 8 * (x < -0.25)).float()
    idx = ((a > 0.25).int() + (a >= 0.75).int() + (a > 1.25).int() + (a >= 1.75).int()
           + (a > 2.5).int() + (a >= 3.5).int() + (a > 5.0).int())
    return (idx + 8 * (x < -0.25).int()).float()


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """x rounded to E2M1 values: E2M1_CODES[e2m1_codes(x)] in fewer steps. The grid's
    spacing is 0.5 below 2, 1 below 4 and 2 up to 6, so round(|x| / step) * step, whose
    round-half-even is the ties-to-even mantissa, then saturate at 6. (A GPTQ column:
    one bucketize into the magnitudes.) nan gives 6, as a scale of 0 does in `snap`."""
    a = x.abs()
    if x.numel() <= _ONE_OP:
        m = E2M1.to(a.device).take(torch.bucketize(a, _BOUNDS.to(a.device)))
    else:
        step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
        m = a.div_(step).round_().mul_(step).clamp_(max=E2M1_MAX).nan_to_num_(E2M1_MAX)
    return m.copysign_(x)


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """x rounded to float8_e4m3fn (nearest, ties to even; saturating at 448), as fp32."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def e8m0_exponent(amax: torch.Tensor) -> torch.Tensor:
    """MXFP4's shared exponent e of groups with maximum |w| amax > 0 (module docstring)."""
    m, E = torch.frexp(amax)                                 # amax = m 2^E, m in [0.5, 1)
    return (E - 1 + (m >= 0.875).int() - 2).float()          # 2m >= 1.75: one up


@dataclass(frozen=True)
class FPSpec:
    """One of FORMATS, with the interface of compress.quantize.QuantSpec."""

    fmt: str = "nvfp4"
    clip_search: bool = False
    clip_grid: int = 100
    global_amax: Optional[float] = None   # nvfp4: the range its global scale covers (None: the tensor's)
    static_only = True
    symmetric = True

    @property
    def bits(self) -> int:
        return FORMATS[self.fmt][0]

    @property
    def group_size(self) -> Optional[int]:
        return FORMATS[self.fmt][1]

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def candidates(self) -> int:
        return {"mxfp4": 2, "nvfp4": 9, "fp8": 11}[self.fmt]

    def group(self, d_in: int) -> int:
        return d_in if self.group_size is None else self.group_size

    def n_groups(self, d_in: int) -> int:
        return -(-d_in // self.group(d_in))

    def fit_raw(self, wg: torch.Tensor, kg: torch.Tensor, imp: Optional[torch.Tensor] = None):
        """Scale and zero (0) [..., out, G] of grouped weights wg, kg [..., out, G, g], and
        what is stored besides: {"global_scale": [..., 1]} for nvfp4, else None. A batch of
        experts [E, out, G, g] gets a global scale per expert. imp [..., 1, G, g] (GPTQ's
        H_jj, `hessian_fit`): the clip search weighs input j's squared error by it."""
        w = torch.where(kg, wg, torch.zeros((), dtype=wg.dtype, device=wg.device)).float()
        amax = w.abs().amax(-1)                                               # [..., out, G]
        raw = None
        if self.fmt == "nvfp4":
            tmax = amax.flatten(-2).amax(-1, keepdim=True)                    # [..., 1]
            if self.global_amax is not None:        # layers fused at serving share one global scale
                tmax = torch.full_like(tmax, self.global_amax)
            gs = torch.where(tmax > 0, E4M3_MAX * E2M1_MAX / tmax, torch.ones_like(tmax))
            raw = {"global_scale": gs}
        scale = self._scale(amax, raw)
        if self.clip_search:
            scale = self._search(w, amax, scale, raw, imp)
        return scale, torch.zeros_like(scale), raw

    def _scale(self, amax: torch.Tensor, raw: Optional[dict], up: int = 0) -> torch.Tensor:
        """The effective (rounded) scale of groups with range amax [..., out, G]."""
        if self.fmt == "nvfp4":
            g = raw["global_scale"][..., None]                                # [..., 1, 1]
            return e4m3(amax / E2M1_MAX * g) / g
        if self.fmt == "mxfp4":
            e = e8m0_exponent(amax) + up
            return torch.where(amax > 0, torch.exp2(e.clamp(-127, 127)), torch.zeros_like(amax))
        return amax / E4M3_MAX

    def _tries(self, amax, raw) -> list:
        """The clip search's candidate scales: MXFP4's next exponent; NVFP4's E4M3 scales
        1 .. 8 steps below the min-max one (an octave: every distinct rounded scale a
        shrink down to 1/2 could give); FP8's shrinks 1 - i/grid, i = 1 .. 10."""
        if self.fmt == "mxfp4":
            return [self._scale(amax, raw, up=1)]
        if self.fmt == "nvfp4":
            g = raw["global_scale"][..., None]
            bits = e4m3(amax / E2M1_MAX * g).to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int16)
            return [(bits - j).clamp(min=0).to(torch.uint8).view(torch.float8_e4m3fn).float() / g
                    for j in range(1, 9)]
        return [self._scale(amax * (1 - i / self.clip_grid), raw) for i in range(1, 11)]

    def _search(self, w, amax, scale, raw, imp=None) -> torch.Tensor:
        """The scale of least sum |w - w_hat|^2.4 per group over the candidates; with imp
        (H_jj), of least sum_j H_jj (w_j - w_hat_j)^2: the diagonal of GPTQ's objective
        (w - w_hat) H (w - w_hat)^T, so an input that carries more signal is clipped less."""
        def err(s):
            d = self.snap(w, s[..., None]) - w
            return d.abs().pow(2.4).sum(-1) if imp is None else (imp * d.square()).sum(-1)
        best = err(scale)
        for s in self._tries(amax, raw):
            e = err(s)
            better = e < best
            best, scale = torch.where(better, e, best), torch.where(better, s, scale)
        return scale

    def quantize(self, w: torch.Tensor, s: torch.Tensor, z) -> torch.Tensor:
        """Codes (float-valued) of w on scales s broadcast against it; s = 0 gives code 0."""
        x = w / s   # inf / nan where s = 0: whatever code they get is replaced by 0 below
        if self.bits == 4:
            u = e2m1_codes(x)
        else:
            u = x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8).float()
        return torch.where(s != 0, u, 0.0)

    def snap(self, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """w on the grid of scales s: dequantize(quantize(w, s), s) to the bit, without the
        codes (GPTQ's column loop and the clip search need only the values; `quantize` of
        the result gives the codes back exactly, grid values being far from any midpoint)."""
        x = w / s   # s = 0: x is +-inf or nan, any finite value times 0 gives 0
        m = e2m1_round(x) if self.bits == 4 else e4m3(x.nan_to_num(0.0))
        return m.mul_(s)

    def zero_code(self, s: torch.Tensor, z) -> torch.Tensor:
        return torch.zeros_like(s)

    def dequantize(self, u: torch.Tensor, s: torch.Tensor, z) -> torch.Tensor:
        table = (E2M1_CODES if self.bits == 4 else E4M3_CODES).to(u.device)
        return table.take(u.long()) * s


def scale_codes(fmt: str, scale: torch.Tensor, global_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """What a format stores for effective scales `scale` [out, G]: E4M3 bits (nvfp4, of
    scale * g), biased E8M0 exponents 127 + e (mxfp4), both uint8; fp32 (fp8). Exact:
    the scales came from the fit."""
    if fmt == "nvfp4":
        return (scale * global_scale).to(torch.float8_e4m3fn).view(torch.uint8)
    if fmt == "mxfp4":
        e = torch.where(scale > 0, torch.log2(scale), torch.full_like(scale, -127.0))
        return (e + 127).round().to(torch.uint8)
    return scale.float()


def scales_of(fmt: str, stored: torch.Tensor, global_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """The effective fp32 scales [out, G] from what `scale_codes` stored."""
    if fmt == "nvfp4":
        return stored.view(torch.float8_e4m3fn).float() / global_scale
    if fmt == "mxfp4":
        e = stored.float() - 127
        return torch.where(stored > 0, torch.exp2(e), torch.zeros_like(e))
    return stored.float()
