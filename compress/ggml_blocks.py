"""ggml's block layouts, byte for byte: our codes and block parameters (compress.ggml)
to the bytes a GGUF tensor of that type holds, and back.

    type  bytes  layout of one block (all little-endian)
    Q8_0    34   d f16 | q[32] int8 (u - 128)
    Q4_0    18   d f16 | qs[16]: byte i = u[i] | u[i+16] << 4
    Q4_1    20   d f16 | m f16 | qs[16]
    Q5_0    22   d f16 | qh[4]: bit i = bit 4 of u[i] | qs[16] of the low nibbles
    Q5_1    24   d f16 | m f16 | qh[4] | qs[16]
    Q4_K   144   d f16 | dmin f16 | scales[12] (8 6-bit sc, 8 6-bit m) | qs[128]:
                 chunk c byte l = u[64c + l] | u[64c + 32 + l] << 4
    Q5_K   176   as Q4_K with qh[32] before qs: qh[l] bit j = bit 4 of u[32j + l]
    Q6_K   210   ql[128]: ql[64h + t] nibble k = low 4 bits of u[128h + 64k + t]
                 | qh[64]: qh[32h + l] bits 2s.. = high 2 bits of u[128h + 32s + l]
                 | sc[16] int8 | d f16

Rows are sequences of blocks, so a tensor [out, in] becomes bytes [out, in / block * bytes].
`dequantize` is our reading of the bytes; tests check it against gguf.quants.
"""
from __future__ import annotations

import torch

from compress.ggml import FORMATS, GGMLSpec

BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q4_k": 144, "q5_k": 176, "q6_k": 210}


def row_bytes(fmt: str, d_in: int) -> int:
    return d_in // FORMATS[fmt][0] * BYTES[fmt]


def _f16(t: torch.Tensor) -> torch.Tensor:
    """[N] fp16 values -> [N, 2] bytes."""
    return t.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _unf16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).reshape(-1).float()


def _nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return (lo & 15) | ((hi & 15) << 4)


def _bits(u: torch.Tensor, shift: int, width: int, stride: int) -> torch.Tensor:
    """[N, k*stride] -> [N, stride] bytes: byte l holds bits `shift`.. (width wide) of
    values l, l + stride, ... at bit positions width*j."""
    parts = ((u >> shift) & ((1 << width) - 1)).reshape(u.shape[0], -1, stride)
    out = torch.zeros(u.shape[0], stride, dtype=torch.int64)
    for j in range(parts.shape[1]):
        out |= parts[:, j] << (width * j)
    return out


def _word_bits(u: torch.Tensor) -> torch.Tensor:
    """[N, 32] codes -> [N, 4] bytes of one little-endian uint32 whose bit i is bit 4 of u[i]."""
    word = (((u >> 4) & 1) << torch.arange(32)).sum(1)                   # [N] < 2^32
    word = torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)
    return word.contiguous().view(torch.uint8).reshape(-1, 4)


def _k_scales(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """[N, 8] 6-bit scales and mins -> [N, 12] bytes (ggml's get_scale_min_k4 order)."""
    out = torch.zeros(sc.shape[0], 12, dtype=torch.int64)
    out[:, 0:4], out[:, 4:8] = sc[:, :4], m[:, :4]
    out[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    out[:, 0:4] |= (sc[:, 4:] >> 4) << 6
    out[:, 4:8] |= (m[:, 4:] >> 4) << 6
    return out


def _k_unscales(b: torch.Tensor):
    sc = torch.cat([b[:, 0:4] & 63, (b[:, 8:12] & 15) | ((b[:, 0:4] >> 6) << 4)], 1)
    m = torch.cat([b[:, 4:8] & 63, (b[:, 8:12] >> 4) | ((b[:, 4:8] >> 6) << 4)], 1)
    return sc, m


def pack(fmt: str, codes: torch.Tensor, raw: dict) -> torch.Tensor:
    """codes [out, in] (values 0 .. 2^b - 1) and raw {name: [out, blocks(, groups)]}
    (compress.ggml.fit_blocks) -> uint8 [out, row_bytes]."""
    block = FORMATS[fmt][0]
    out, d_in = codes.shape
    u = codes.to(torch.int64).cpu().reshape(-1, block)                     # [N, block]
    r = {k: v.cpu().reshape(u.shape[0], *v.shape[2:]) for k, v in raw.items()}
    if fmt == "q8_0":
        parts = [_f16(r["d"]), (u - 128).to(torch.int8).view(torch.uint8)]
    elif fmt in ("q4_0", "q4_1", "q5_0", "q5_1"):
        head = [_f16(r["d"])] + ([_f16(r["m"])] if "m" in r else [])
        qh = [_word_bits(u)] if fmt[1] == "5" else []
        parts = head + qh + [_nibbles(u[:, :16], u[:, 16:])]
    elif fmt in ("q4_k", "q5_k"):
        c = u.reshape(-1, 4, 2, 32)
        qs = _nibbles(c[:, :, 0], c[:, :, 1]).reshape(-1, 128)
        qh = [_bits(u, 4, 1, 32)] if fmt == "q5_k" else []
        parts = [_f16(r["d"]), _f16(r["dmin"]), _k_scales(r["sc"].long(), r["m"].long())] + qh + [qs]
    else:                                                                  # q6_k
        c = u.reshape(-1, 2, 2, 64)                                        # [N, h, k, t]
        ql = _nibbles(c[:, :, 0], c[:, :, 1]).reshape(-1, 128)
        qh = torch.cat([_bits(u[:, 128 * i:128 * (i + 1)], 4, 2, 32) for i in range(2)], 1)
        parts = [ql, qh, r["sc"].to(torch.int8).view(torch.uint8), _f16(r["d"])]
    b = torch.cat([p.to(torch.uint8) for p in parts], 1)                  # [N, BYTES]
    return b.reshape(out, -1).to(codes.device)


def unpack(blocks: torch.Tensor, fmt: str, d_in: int):
    """uint8 [out, row_bytes] -> codes [out, in] uint8, scale, zero [out, G] fp32."""
    spec = GGMLSpec(fmt)
    block, h = spec.block, 1 << (spec.bits - 1)
    out = blocks.shape[0]
    b = blocks.cpu().reshape(-1, BYTES[fmt]).to(torch.int64)
    raw = blocks.cpu().reshape(-1, BYTES[fmt])
    if fmt == "q8_0":
        u = raw[:, 2:].view(torch.int8).to(torch.int64) + 128
        s = _unf16(raw[:, :2])[:, None]
        z = torch.full_like(s, float(h))
    elif fmt in ("q4_0", "q4_1", "q5_0", "q5_1"):
        s, at = _unf16(raw[:, :2])[:, None], 2
        if fmt[3] == "1":
            z, at = -_unf16(raw[:, 2:4])[:, None], 4
        else:
            z = torch.full_like(s, float(h))
        u = torch.cat([b[:, -16:] & 15, b[:, -16:] >> 4], 1)
        if fmt[1] == "5":
            qh = raw[:, at:at + 4].contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF   # [N, 1]
            u = u | (((qh >> torch.arange(32)) & 1) << 4)
    elif fmt in ("q4_k", "q5_k"):
        d, dmin = _unf16(raw[:, 0:2]), _unf16(raw[:, 2:4])
        sc, m = _k_unscales(b[:, 4:16])
        qs = b[:, -128:].reshape(-1, 4, 1, 32)
        u = torch.cat([qs & 15, qs >> 4], 2).reshape(-1, 256)
        if fmt == "q5_k":
            qh = b[:, 16:48]
            u = u | (((qh[:, None, :] >> torch.arange(8)[:, None]) & 1).reshape(-1, 256) << 4)
        s, z = d[:, None] * sc.float(), dmin[:, None] * m.float()
    else:                                                                  # q6_k
        ql, qh = b[:, :128].reshape(-1, 2, 1, 64), b[:, 128:192].reshape(-1, 2, 1, 32)
        lo = torch.cat([ql & 15, ql >> 4], 2).reshape(-1, 256)
        hi = ((qh >> (2 * torch.arange(4))[:, None]) & 3).reshape(-1, 256)
        u = lo | (hi << 4)
        s = _unf16(raw[:, 208:210])[:, None] * raw[:, 192:208].view(torch.int8).float()
        z = torch.full_like(s, float(h))
    G = d_in // spec.group_size
    return (u.to(torch.uint8).reshape(out, d_in).to(blocks.device), s.reshape(out, G).to(blocks.device),
            z.reshape(out, G).to(blocks.device))


def dequantize(blocks: torch.Tensor, fmt: str, d_in: int) -> torch.Tensor:
    """uint8 [out, row_bytes] -> W_hat [out, in] fp32, as ggml computes it."""
    spec = GGMLSpec(fmt)
    u, s, z = unpack(blocks, fmt, d_in)
    g = torch.arange(d_in, device=u.device) // spec.group_size
    return spec.dequantize(u, s[:, g], z[:, g])
