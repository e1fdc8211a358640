"""Weight quantization to b-bit groups: round-to-nearest, or GPTQ (Frantar et al., 2022,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

GPTQ quantizes the columns of W [out, in] one at a time and spreads each column's
rounding error over the columns not yet quantized, the optimal-brain-quantizer update
(Eq. 2 of the paper, in the Cholesky form of Sec. 4, step 3):

    err   = (w_j - q_j) / [U]_jj
    W_:,k -= err * U_jk          for k > j,   U = upper Cholesky factor of H^-1

with H = (2/n) X X^T from the runner's shared X^T X, damped by lambda = percdamp *
mean(diag H) (retried tenfold on failure). Updates are lazy in blocks of `blocksize`
columns (step 2), and inside a block per sub-block of 32 (compress.linalg.sub_blocks).
With `act_order` columns are processed by decreasing H_jj (the "act-order" heuristic).
Group parameters are fitted when the loop reaches a group's first column, on the
weights as updated so far; under act_order that numbers the groups in processing
order, so a per-column group index (g_idx) is stored. With
`static_groups` all group parameters are fitted up front on the original weights
(contiguous groups, no g_idx, also under act_order), where `hessian_fit` weighs the
fit's error on input j by H_jj, the diagonal of the objective.

Sparsity-aware: a weight that is already zero (an earlier pass pruned it) is stored
as the code of 0 and its error is compensated like any other (SparseGPT, Sec. 3.5),
so an N:M pattern survives exactly. Scales and zero points are fitted on kept weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Union

import torch

from compress.errors import CompressError
from compress.fp_formats import FORMATS as FP_GRIDS
from compress.fp_formats import FPSpec
from compress.ggml import FALLBACK, FORMATS, ZERO_EXACT, GGMLSpec, format_for
from compress.linalg import handle_dead_inputs, inverse_cholesky, sub_blocks
from compress.masks import follows_nm
from compress.passes.base import Layer, PassConfig, register, second_order_cost
from compress.quantize import (QuantResult, QuantSpec, column_groups, fit, group_of, group_params, reorder_columns,
                               round_column, rtn)

GGUF_FORMATS = tuple(f"gguf-{f}" for f in FORMATS)
FP_FORMATS = tuple(FP_GRIDS)


@dataclass
class QuantConfig(PassConfig):
    """bits        2..8
    group_size  inputs per group (32, 64, 128, ...; a shorter last group is allowed),
                or 'channel' for one group per output row
    symmetric   zero point fixed at 2^(bits-1) (no stored zero points)
    method      'rtn' or 'gptq'
    act_order   GPTQ: process columns by decreasing H_jj
    static_groups  GPTQ: fit all group parameters before the loop (no g_idx)
    clip_search MSE search over shrunken ranges (GPTQ's reference quantizer); on a
                gguf format, ggml's least-squares search over candidate scales
    format      'int' (the grid above), or a llama.cpp block format, gguf-q8_0 | q4_0 |
                q4_1 | q5_0 | q5_1 | q4_k | q5_k | q6_k (compress.ggml): the format sets
                bits and groups, GPTQ optimizes on its grid and the GGUF exporter writes
                its codes as they are. Rows that are not whole 256-weight super-blocks get
                llama.cpp's fallback (q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0), noted per layer.
                Or a floating-point format, nvfp4 | mxfp4 | fp8 (compress.fp_formats): E2M1
                in groups of 16 with E4M3 scales under a global scale, E2M1 in groups of 32
                with power-of-two scales, or E4M3 per output row; exported as vLLM loads them.
                group_size and symmetric default to the format's (int: 128, asymmetric).
    hessian_fit GPTQ: the up-front fit (clip search, ggml's least squares) weighs input
                j's squared error by H_jj, the diagonal of GPTQ's objective (what
                llama.cpp's imatrix estimates), not every input alike. SmolLM2: Q4_0
                34.53 -> 32.48 perplexity, NVFP4 34.76 -> 33.09 (benchmarks/RESULTS.md)
    blocksize, percdamp  GPTQ's lazy-update block and damping fraction"""

    bits: int = 4
    group_size: Union[int, str, None] = field(default=None, metadata={
        "means": "the format's: 128 on int grids, 16 nvfp4, 32 mxfp4, channel fp8"})
    symmetric: Optional[bool] = field(default=None, metadata={
        "means": "the format's: false on int grids, true on the floating-point ones"})
    method: str = "gptq"
    act_order: bool = True
    static_groups: bool = True
    clip_search: bool = True
    hessian_fit: bool = True
    blocksize: int = 128
    percdamp: float = 0.01
    format: str = "int"

    packs = True  # produces a runtime module: must be the last layer pass on its layers
    batched = True

    @property
    def needs_stats(self) -> bool:
        return self.method == "gptq"

    @property
    def needs_xtx(self) -> bool:
        return self.method == "gptq"

    def validate(self) -> None:
        super().validate()
        n = self.name

        def integer(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if not integer(self.bits) or not 2 <= self.bits <= 8:
            raise CompressError(f"{n}.bits: expected an integer from 2 to 8, got {self.bits!r}")
        if self.group_size not in ("channel", None) and not (integer(self.group_size) and self.group_size >= 1):
            raise CompressError(f"{n}.group_size: expected a positive integer or 'channel', got {self.group_size!r}")
        if self.method not in ("rtn", "gptq"):
            raise CompressError(f"{n}.method: expected 'rtn' or 'gptq', got {self.method!r}")
        if self.symmetric is not None and not isinstance(self.symmetric, bool):
            raise CompressError(f"{n}.symmetric: expected true or false, got {self.symmetric!r}")
        for key in ("act_order", "static_groups", "clip_search", "hessian_fit"):
            if not isinstance(getattr(self, key), bool):
                raise CompressError(f"{n}.{key}: expected true or false, got {getattr(self, key)!r}")
        if not integer(self.blocksize) or self.blocksize < 1:
            raise CompressError(f"{n}.blocksize: expected a positive integer, got {self.blocksize!r}")
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, (int, float)) or not 0 < self.percdamp < 1:
            raise CompressError(f"{n}.percdamp: expected a number in (0, 1), got {self.percdamp!r}")
        self._validate_format()

    def _validate_format(self) -> None:
        n = self.name
        if self.format not in ("int",) + GGUF_FORMATS + FP_FORMATS:
            raise CompressError(f"{n}.format: expected int, one of {', '.join(FP_FORMATS)}, or one of "
                                f"{', '.join(GGUF_FORMATS)}, got {self.format!r}")
        if self.format == "int":
            return
        if self.format in FP_FORMATS:
            bits, group = FP_GRIDS[self.format][:2]
            group = group or "channel"
            if self.bits not in (4, bits):
                raise CompressError(f"{n}.bits: format {self.format} has {bits}-bit elements; expected {bits} "
                                    f"or leave bits out")
            if self.group_size not in (None, group):
                raise CompressError(f"{n}.group_size: format {self.format} fixes groups of {group}; expected "
                                    f"{group} or leave group_size out")
            if self.symmetric is False:
                raise CompressError(f"{n}.symmetric: format {self.format} is symmetric (no zero point); expected "
                                    f"true or leave symmetric out")
        else:
            for key, default in (("bits", 4), ("group_size", None), ("symmetric", None)):
                if getattr(self, key) != default:
                    raise CompressError(f"{n}.{key}: format {self.format} sets the grid; leave {key} out")
        if not self.static_groups:
            raise CompressError(f"{n}.static_groups: format {self.format} fits its blocks before GPTQ's loop "
                                f"(static groups); expected true")

    def check_layer(self, name: str, out: int, d_in: int) -> None:
        group = FP_GRIDS[self.format][1] if self.format in FP_FORMATS else None
        if group and d_in % group:
            raise CompressError(f"{self.name}.format: {name} has {d_in} inputs, not whole groups of {group} "
                                f"({self.format}); ignore the layer or choose another format")

    # Elementwise operations per weight and clip candidate (scale, round, clamp, dequantize,
    # |error|^2.4): on SmolLM2 the MSE search costs about as much as GPTQ's column loop.
    CLIP_OPS = 10

    def cost(self, out: int, d_in: int) -> float:
        spec = self.spec
        clip = spec.candidates * self.CLIP_OPS if self.clip_search else 1
        return (second_order_cost(out, d_in) if self.method == "gptq" else 0.0) + float(out) * d_in * clip

    @property
    def spec(self) -> Union[QuantSpec, GGMLSpec, FPSpec]:
        if self.format in FP_FORMATS:
            return FPSpec(self.format, self.clip_search)
        if self.format != "int":
            return GGMLSpec(self.format[len("gguf-"):], self.clip_search)
        group = {None: 128, "channel": None}.get(self.group_size, self.group_size)
        return QuantSpec(self.bits, group, bool(self.symmetric), self.clip_search)

    def spec_for(self, layer: Layer) -> Union[QuantSpec, GGMLSpec, FPSpec]:
        """The grid of this layer: a gguf format falls back as llama.cpp's quantizer does
        where the rows are not whole super-blocks (noted in the layer's report)."""
        spec = self.spec
        if self.format == "int":
            return spec
        if isinstance(spec, FPSpec):   # whole groups: check_layer refused the rest before any work
            fused = spec.fmt == "nvfp4" and layer.W.dim() == 2 and layer.fused_absmax
            return replace(spec, global_amax=layer.fused_absmax) if fused else spec
        d_in = layer.W.shape[-1]
        fmt = format_for(spec.fmt, d_in)
        if fmt is None:
            alt = f" nor of {FORMATS[FALLBACK[spec.fmt]][0]} (its fallback gguf-{FALLBACK[spec.fmt]})" \
                if spec.fmt in FALLBACK else ""
            raise CompressError(f"{self.name}.format: {layer.name} has {d_in} inputs, not a multiple of "
                                f"{spec.block} ({self.format}){alt}; ignore the layer or choose another format")
        if fmt != spec.fmt:
            layer.info["format"] = (f"gguf-{fmt}: llama.cpp's fallback for {self.format}, {d_in} inputs "
                                    f"are not whole {spec.block}-weight super-blocks")
        if fmt not in ZERO_EXACT and not bool((layer.W != 0).all()):
            layer.info["zeros"] = f"gguf-{fmt} has no exact 0: this layer's pruned weights become small values"
        return GGMLSpec(fmt, self.clip_search)


Quant = QuantConfig


@torch.no_grad()
def gptq(W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, spec: QuantSpec, *, blocksize: int = 128,
         percdamp: float = 0.01, act_order: bool = False, static_groups: bool = False,
         hessian_fit: bool = False, name: str = "", info: Optional[dict] = None) -> QuantResult:
    """GPTQ of W [out, in] fp32 with Hessian H [in, in] (edited in place); weights
    with keep False are stored as zero. Returns the codes in the original column order.
    A batch of experts (W [E, out, in], H [E, in, in]) runs as one: every step below
    broadcasts over the leading dimension (`...`). hessian_fit: see QuantConfig."""
    info = {} if info is None else info
    W, d_in = W.clone(), W.shape[-1]
    g = spec.group(d_in)
    static = static_groups or spec.group_size is None or spec.static_only   # per channel, ggml: up front
    info["dead_inputs"] = handle_dead_inputs(H, W)
    scale, zero, raw = group_params(W, H, keep, spec, static, hessian_fit)
    if act_order:   # stable: equal H_jj (white statistics of a rare expert) keep their order
        perm = torch.argsort(H.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)   # [..., in]
    else:
        perm = torch.arange(d_in, device=W.device).expand(H.shape[:-1])
    H = reorder_columns(H.gather(-2, perm.unsqueeze(-1).expand(H.shape)), perm)   # H[perm][:, perm]
    W, keep = reorder_columns(W, perm), reorder_columns(keep, perm)
    gid = column_groups(d_in, spec, W.device)                  # group of each processed column
    if static and act_order:
        gid = gid[perm]                                        # groups stay contiguous in original order
    U = inverse_cholesky(H, percdamp, name, info)             # [..., in, in] upper
    del H
    B = blocksize if static else max(g, blocksize // g * g)   # dynamic groups: blocks hold whole groups
    # Static groups: each processed column's scale and zero point, gathered once
    # ([..., out, in]); dynamic ones are read by group index as they are fitted.
    col_group = gid.tolist() if gid.dim() == 1 else gid        # python ints: cheap indexing in the loop
    if static:
        at = gid.unsqueeze(-2).expand(W.shape) if gid.dim() > 1 else gid.expand(W.shape)
        col_scale, col_zero = scale.gather(-1, at), zero.gather(-1, at)
    snap = getattr(spec, "snap", None) if static else None   # FP grids: values per column, codes after the loop
    codes = torch.empty(W.shape, dtype=torch.float32 if snap else torch.uint8, device=W.device)
    dense = bool(keep.all())   # nothing pruned: no column needs the code of zero (one op less per column)
    for i1 in range(0, d_in, B):
        i2 = min(i1 + B, d_in)
        W1, K1 = W[..., i1:i2].clone(), keep[..., i1:i2]       # [..., out, b]
        U1 = U[..., i1:i2, i1:i2]                              # [..., b, b]
        Err1 = torch.zeros_like(W1)
        for k1, k2 in sub_blocks(i2 - i1, 1 if static else g):
            for i in range(k1, k2):
                j = i1 + i
                if not static and j % g == 0:
                    scale[..., j // g], zero[..., j // g] = fit(W1[..., i:i + g], K1[..., i:i + g], spec)
                s, z = ((col_scale[..., j], col_zero[..., j]) if static               # [..., out]
                        else (group_of(scale, col_group, j), group_of(zero, col_group, j)))
                q, u = round_column(spec, snap, W1[..., i], s, z, None if dense else K1[..., i])   # [..., out]
                err = (W1[..., i] - q) / U1[..., i, i, None]                                      # [..., out]
                W1[..., i:k2] -= err.unsqueeze(-1) * U1[..., i, None, i:k2]
                Err1[..., i] = err
                codes[..., j] = u
            W1[..., k2:] -= Err1[..., k1:k2] @ U1[..., k1:k2, k2:]
        W[..., i2:] -= Err1 @ U[..., i1:i2, i2:]
    if snap:   # grid values to their codes (a pruned weight's value is 0, its code 0)
        codes = spec.quantize(codes, col_scale, col_zero)
    inv = torch.argsort(perm, dim=-1)
    g_idx = None if static or not act_order else gid[inv].to(torch.int32)
    return QuantResult(spec, reorder_columns(codes.to(torch.uint8), inv), scale, zero, g_idx, raw=raw)


@register("quant", QuantConfig)
def quant(layer: Layer, cfg: QuantConfig) -> None:
    keep = layer.W != 0                                        # an earlier pass's zeros stay zero
    spec = cfg.spec_for(layer)
    if cfg.method == "rtn":
        res = rtn(layer.W, keep, spec)
    else:
        H = layer.stats.hessian().to(layer.W.device)
        res = gptq(layer.W, H, keep, spec, blocksize=cfg.blocksize, percdamp=cfg.percdamp,
                   act_order=cfg.act_order, static_groups=cfg.static_groups,
                   hessian_fit=cfg.hessian_fit, name=layer.name, info=layer.info)
    parts = res.split() if layer.W.dim() == 3 else [res]      # a batch of experts: one result each
    for k, part in enumerate(parts):
        # An exact 2:4 weight (from a 2:4 pass of this sweep or an earlier one) stays 2:4:
        # store only the kept half of its codes (SparseQuantLinear).
        part.sparse24 = follows_nm(keep[k] if layer.W.dim() == 3 else keep, 2, 4)
    layer.W.copy_(torch.stack([p.dequantize() for p in parts]).reshape(layer.W.shape))
    layer.packed = parts if layer.W.dim() == 3 else res
