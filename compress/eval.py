"""Perplexity, and agreement with a reference model, on fixed token windows.

Protocol (GPTQ / SparseGPT / Wanda): tokenize the whole text once, cut it into
`numel // seqlen` non-overlapping windows, run each window on its own, score the
seqlen-1 next-token predictions inside it, and report
ppl = exp(sum of nll over all predicted tokens / number of predicted tokens),
which equals the usual exp(mean over windows of the per-window mean nll) because all
windows have the same length. Everything is computed in fp32.

Comparing a compressed model with the dense one: evaluate the dense model with
`record=ReferenceLogProbs()`, free it, then evaluate the compressed model with
`reference=` the same object; the result gains "kl" (mean KL(P_ref || P_model) per
predicted token) and "top1" (fraction of positions where the argmax agrees).

This module imports only torch, numpy, tqdm and compress.errors (not the runner).
"""
from __future__ import annotations

import logging
import math
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from compress.errors import CompressError

log = logging.getLogger(__name__)


# -- reference store ----------------------------------------------------------------
# Size: the full store is windows x (seqlen-1) x vocab x 2 bytes (40 windows of 512
# tokens with a 49k vocab: 2 GB). When that is over `max_gib`, only the `topk` largest
# log-probs per position are kept, with their indices and the exact log-mass of the
# rest, and KL is taken between the distributions coarsened to those k tokens plus one
# "everything else" bucket: a lower bound of the full KL, and a close one when the k
# tokens hold almost all the mass (they do for trained LMs with k = 256).

DEFAULT_TOPK = 256
_FLOOR = -1.0e4   # log-probs are clamped here before fp16: exp(-1e4) == 0, never -inf


class ReferenceLogProbs:
    """Reference model log-probs per window, stored on disk in fp16.

    Use: `ref = ReferenceLogProbs()`; `evaluate(dense, windows, record=ref)`;
    `evaluate(compressed, windows, reference=ref)`; `ref.close()` (or a `with` block).
    `topk=None` stores the full distribution unless it would exceed `max_gib`.
    """

    def __init__(self, topk: Optional[int] = None, max_gib: float = 4.0,
                 tmp_dir: Optional[str] = None):
        self.topk = topk
        self.max_gib = max_gib
        self.path = Path(tempfile.mkdtemp(prefix="compress-ref-", dir=tmp_dir))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.path), True)
        self.shape: Optional[Tuple[int, int, int]] = None  # (windows, positions, vocab)
        self._lp = self._idx = self._tail = self._argmax = None
        self._written: Optional[np.ndarray] = None

    # -- lifecycle ---------------------------------------------------------------------
    def allocate(self, num_windows: int, positions: int, vocab: int) -> None:
        """Create the memmaps (once); later calls must give the same shape."""
        shape = (num_windows, positions, vocab)
        if self.shape is not None:
            if shape != self.shape:
                raise ValueError(f"reference holds (windows, positions, vocab) = {self.shape}; "
                                 f"this evaluation has {shape}")
            return
        full_gib = num_windows * positions * vocab * 2 / 2**30
        if self.topk is None and full_gib > self.max_gib:
            self.topk = DEFAULT_TOPK
            log.warning("reference log-probs: the full store would take %.1f GiB (> %.1f); "
                        "keeping the top-%d per position (KL becomes a close lower bound)",
                        full_gib, self.max_gib, self.topk)
        if self.topk is not None and self.topk >= vocab:
            self.topk = None  # top-k of everything is the full store
        self.shape = shape
        width = vocab if self.topk is None else self.topk
        self._lp = self._memmap("logprobs.f16", np.float16, (num_windows, positions, width))
        self._argmax = self._memmap("argmax.i32", np.int32, (num_windows, positions))
        if self.topk is not None:
            self._idx = self._memmap("index.i32", np.int32, (num_windows, positions, width))
            self._tail = self._memmap("tail.f32", np.float32, (num_windows, positions))
        self._written = np.zeros(num_windows, dtype=bool)
        log.info("reference log-probs: %s, %.2f GiB in %s", "full" if self.topk is None
                 else f"top-{self.topk}", self.nbytes / 2**30, self.path)

    def _memmap(self, name: str, dtype, shape) -> np.memmap:
        return np.memmap(self.path / name, dtype=dtype, mode="w+", shape=shape)

    @property
    def nbytes(self) -> int:
        """Bytes on disk."""
        arrays = (self._lp, self._idx, self._tail, self._argmax)
        return sum(a.nbytes for a in arrays if a is not None)

    def close(self) -> None:
        """Drop the memmaps and delete the folder."""
        self._lp = self._idx = self._tail = self._argmax = None
        self._cleanup()

    def __enter__(self) -> "ReferenceLogProbs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- write / compare ---------------------------------------------------------------
    def write(self, window: int, logprobs: torch.Tensor) -> None:
        """Store one window's log-probs, logprobs [positions, vocab] fp32."""
        lp = logprobs.detach().float()
        self._argmax[window] = lp.argmax(-1).to(torch.int32).cpu().numpy()
        if self.topk is None:
            self._lp[window] = lp.clamp_min(_FLOOR).half().cpu().numpy()
        else:
            top, idx = lp.topk(self.topk, dim=-1)                    # [positions, k]
            rest = lp.scatter(-1, idx, float("-inf")).logsumexp(-1)  # [positions] log-mass of tail
            self._lp[window] = top.clamp_min(_FLOOR).half().cpu().numpy()
            self._idx[window] = idx.to(torch.int32).cpu().numpy()
            self._tail[window] = rest.cpu().numpy()
        self._written[window] = True

    def compare(self, window: int, logprobs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """KL(P_ref || P_model) [positions] fp32 and argmax agreement [positions] bool."""
        if self._written is None or not self._written[window]:
            raise ValueError(f"reference log-probs of window {window} were never recorded")
        lp = logprobs.detach().float()
        dev = lp.device
        ref = torch.from_numpy(np.asarray(self._lp[window])).to(dev).float()  # [positions, width]
        if self.topk is None:
            model = lp
        else:
            idx = torch.from_numpy(np.asarray(self._idx[window])).to(dev).long()
            tail = torch.from_numpy(np.asarray(self._tail[window])).to(dev)
            ref = torch.cat([ref, tail[:, None]], dim=-1)                     # [positions, k+1]
            model_tail = lp.scatter(-1, idx, float("-inf")).logsumexp(-1)
            model = torch.cat([lp.gather(-1, idx), model_tail[:, None]], dim=-1)
        kl = _kl(ref, model)
        ref_argmax = torch.from_numpy(np.asarray(self._argmax[window])).to(dev).long()
        return kl, lp.argmax(-1) == ref_argmax


def _kl(ref_lp: torch.Tensor, model_lp: torch.Tensor) -> torch.Tensor:
    """sum_j p_j (log p_j - log q_j) over the last dim -> [positions].

    The reference is renormalized first: fp16 rounding leaves its probabilities summing
    to 1 +- 1e-3, and renormalizing makes KL(ref || ref) ~ 1e-7 instead of ~1e-3.
    Buckets with p_j == 0 add nothing (even where q_j == 0).
    ref_lp, model_lp: [positions, width] fp32 -> [positions].
    """
    ref_lp = torch.log_softmax(ref_lp, dim=-1)
    # A floor on log q keeps p * (log p - log q) finite: 0 * (-inf) would be nan.
    diff = ref_lp - model_lp.clamp_min(10 * _FLOOR)
    return ref_lp.exp_().mul_(diff).sum(-1).clamp_min(0)   # in place: [positions, width] once


# -- windows and evaluation ------------------------------------------------------------
def eval_windows(tokenizer, text: str, seqlen: int,
                 max_windows: Optional[int] = None) -> torch.LongTensor:
    """Non-overlapping windows of the tokenized text -> LongTensor [n, seqlen].

    The text is tokenized once, as the standard protocol does (`tokenizer(text)`, so a
    LLaMA-style tokenizer puts one BOS at the very start); n = numel // seqlen, capped at
    `max_windows` (C4 standard: 256). The tail shorter than seqlen is dropped.
    """
    if not isinstance(seqlen, int) or isinstance(seqlen, bool) or seqlen < 2:
        raise CompressError(f"eval.seqlen: expected an integer >= 2, got {seqlen!r}")
    if max_windows is not None and (not isinstance(max_windows, int)
                                    or isinstance(max_windows, bool) or max_windows <= 0):
        raise CompressError(f"eval.max_windows: expected a positive integer, got {max_windows!r}")
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][0]  # [numel]
    n = ids.numel() // seqlen
    if n == 0:
        raise CompressError(f"eval.seqlen: the text has only {ids.numel()} tokens, "
                            f"fewer than one window of seqlen={seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    log.info("eval: %d windows of %d tokens (%d tokens in the text)", n, seqlen, ids.numel())
    return ids[: n * seqlen].reshape(n, seqlen).clone()


def _device_of(model) -> torch.device:
    """Where inputs go: the first parameter's device (CPU for parameter-free models)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _check_windows(windows) -> torch.LongTensor:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2:
        raise ValueError("windows: expected a 2-D tensor [n, seqlen] of token ids")
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"windows: need n >= 1 and seqlen >= 2, got {tuple(windows.shape)}")
    return windows.long()


def evaluate(model, windows: torch.LongTensor, batch_size: int = 4,
             record: Optional[ReferenceLogProbs] = None,
             reference: Optional[ReferenceLogProbs] = None,
             device=None, desc: str = "eval") -> dict:
    """Perplexity of `model` on `windows` [n, seqlen]; with `reference`, also KL and top-1.

    Returns {"ppl", "nll" (mean per predicted token), "tokens" (predicted tokens,
    n * (seqlen-1)), "windows"} plus {"kl", "top1"} when `reference` is given.
    `record` stores this model's log-probs for later comparisons. `device`: where the
    model is evaluated (moved there and back; default: where its parameters are).
    """
    windows = _check_windows(windows)
    n, seqlen = windows.shape
    # The model runs where `device` says (default: where it is) and goes back home after,
    # so the caller's model stays where it was; the token ids follow the model.
    home = _device_of(model)
    device = torch.device(device) if device is not None else home
    if device != home:
        model.to(device)
    nll_sum = kl_sum = 0.0   # python floats: fp64 accumulation over many tokens
    tokens = agree = 0
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", leave=False):
                x = windows[start:start + batch_size].to(device)          # [b, seqlen]
                out = model(input_ids=x, use_cache=False)
                logits = out.logits if hasattr(out, "logits") else out[0]  # [b, seqlen, V]
                # One window at a time: fp32 log-probs are [seqlen-1, V] (0.4 GB at
                # 2048 x 49k), not b times that.
                for r in range(x.shape[0]):
                    lp = torch.log_softmax(logits[r, :-1].float(), dim=-1)  # [seqlen-1, V]
                    target = x[r, 1:, None]                                # [seqlen-1, 1]
                    nll_sum += -lp.gather(-1, target).sum(dtype=torch.float64).item()
                    tokens += seqlen - 1
                    if record is not None:
                        record.allocate(n, seqlen - 1, lp.shape[-1])
                        record.write(start + r, lp)
                    if reference is not None:
                        reference.allocate(n, seqlen - 1, lp.shape[-1])  # checks the shape
                        kl, same = reference.compare(start + r, lp)
                        kl_sum += kl.sum(dtype=torch.float64).item()
                        agree += int(same.sum())
                del logits, out
    finally:
        model.train(was_training)
        if device != home:
            model.to(home)
    return _summary(nll_sum, kl_sum, tokens, agree, n, reference is not None, desc)


def _summary(nll_sum: float, kl_sum: float, tokens: int, agree: int, n: int,
             compared: bool, desc: str) -> dict:
    nll = nll_sum / tokens
    result = {"ppl": math.exp(nll) if nll < 709 else float("inf"),  # exp overflows past 709
              "nll": nll, "tokens": tokens, "windows": n}
    if compared:
        result["kl"] = kl_sum / tokens
        result["top1"] = agree / tokens
    log.info("%s: %s", desc, ", ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    return result
