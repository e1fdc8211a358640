"""Bit packing of small unsigned integer codes into int32 words.

Codes of `bits` bits are laid end to end along the last dimension, least significant
bits first: code k occupies bits [k*bits, (k+1)*bits) of the row's bit stream, and
word w holds stream bits [32w, 32w+32). A code may straddle two words (3, 5, 6, 7
bits), so nothing is wasted: a row of n codes takes ceil(n*bits/32) words.

For 2, 4 and 8 bits no code straddles, and the layout is the usual one (GPTQ,
compressed-tensors' pack-quantized): word w holds codes 32/bits*w ... in its low bits
first.

    codes [..., n] uint8 / int  <->  words [..., ceil(n*bits/32)] int32
"""
from __future__ import annotations

import torch


def packed_words(n: int, bits: int) -> int:
    return (n * bits + 31) // 32


def _positions(n: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(n, device=device, dtype=torch.int64) * bits  # first stream bit of each code
    return start // 32, start % 32                                      # word index, shift inside it


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., n] with values in [0, 2^bits) -> int32 words [..., ceil(n*bits/32)]."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    *lead, n = codes.shape
    c = codes.to(torch.int64).reshape(-1, n)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    word, shift = _positions(n, bits, c.device)
    n_words = packed_words(n, bits)
    # Work in 64-bit words so that a straddling code's high part lands in the next
    # 32-bit word: the 64-bit stream is split into two int32 halves at the end.
    acc = torch.zeros(c.shape[0], n_words + 1, dtype=torch.int64, device=c.device)
    val = c << shift                                   # [rows, n], < 2^39
    acc.index_add_(1, word, val & 0xFFFFFFFF)          # low part: disjoint bits, so add == or
    acc.index_add_(1, word + 1, val >> 32)             # spill into the next word
    words = acc[:, :n_words]
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # two's complement
    return words.reshape(*lead, n_words)


def unpack_bits(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int32 words [..., ceil(n*bits/32)] -> codes [..., n] uint8 (inverse of pack_bits)."""
    *lead, n_words = words.shape
    if n_words != packed_words(n, bits):
        raise ValueError(f"{n_words} words cannot hold {n} codes of {bits} bits")
    w = words.reshape(-1, n_words).to(torch.int64) & 0xFFFFFFFF       # unsigned 32-bit values
    w = torch.cat([w, torch.zeros_like(w[:, :1])], dim=1)            # a zero word past the end
    word, shift = _positions(n, bits, w.device)
    both = w[:, word] | (w[:, word + 1] << 32)                        # [rows, n] the 64 bits around each code
    codes = (both >> shift) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(*lead, n)
