"""GPTQ-style calibration windows from a list of documents.

Method (recorded in the log):

1. "documents": walk the documents in a seeded random order, tokenizing them in
   chunks, until `nsamples` documents longer than `seqlen` tokens are found; take
   one random window of `seqlen` tokens from each. Every sample comes from a
   different document (GPTQ draws documents with replacement; drawing without
   replacement gives more varied samples from the same budget).
2. "stream": when fewer than `nsamples` documents are long enough (short documents,
   a single text file, the local C4 head at seqlen 2048), concatenate all documents'
   tokens, separated by the tokens of "\\n\\n", and take `nsamples` random windows
   of that stream (as GPTQ does for WikiText-2).

Tokenization adds no special tokens (`add_special_tokens=False`): a window cut from
the middle of a document should not start with a BOS that was never there.
All randomness comes from a local `random.Random(seed)`; global RNG state is untouched.
"""
from __future__ import annotations

import logging
import random
from typing import List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from compress.errors import CompressError

log = logging.getLogger(__name__)

_CHUNK = 256          # documents tokenized per call (fast tokenizers batch in Rust)
_SEPARATOR = "\n\n"   # between documents in the "stream" fallback


def _tokenize(tokenizer, texts: Sequence[str]) -> List[List[int]]:
    """Token ids of each text, no special tokens, no length warnings."""
    enc = tokenizer(list(texts), add_special_tokens=False, verbose=False)
    return [list(ids) for ids in enc["input_ids"]]


def _find_long_documents(docs: Sequence[str], tokenizer, nsamples: int, seqlen: int,
                         rng: random.Random, name: str):
    """Tokenize documents in seeded random order until `nsamples` have > seqlen tokens.

    Returns (long, cache, used): `long` lists the token ids of the long documents found
    (in walk order), `used` their indices; `cache` maps document index -> ids of
    everything tokenized so far.
    """
    order = list(range(len(docs)))
    rng.shuffle(order)
    long: List[List[int]] = []
    used: List[int] = []
    cache = {}
    bar = tqdm(total=nsamples, desc=f"calib {name}: documents", unit="doc", leave=False)
    for start in range(0, len(order), _CHUNK):
        chunk = order[start:start + _CHUNK]
        for i, ids in zip(chunk, _tokenize(tokenizer, [docs[i] for i in chunk])):
            cache[i] = ids
            if len(ids) > seqlen and len(long) < nsamples:
                long.append(ids)
                used.append(i)
                bar.update(1)
        if len(long) >= nsamples:
            break
    bar.close()
    return long, cache, used


def _stream(docs: Sequence[str], tokenizer, cache: dict) -> List[int]:
    """All documents' tokens in document order, joined by the separator's tokens."""
    # Only called after a walk over every document, so `cache` holds them all.
    sep = _tokenize(tokenizer, [_SEPARATOR])[0] if len(docs) > 1 else []
    stream: List[int] = []
    for i in range(len(docs)):
        if i and sep:
            stream.extend(sep)
        stream.extend(cache[i])
    return stream


def sample_windows(docs: Sequence[str], tokenizer, nsamples: int, seqlen: int, seed: int,
                   name: str = "text") -> torch.LongTensor:
    """`nsamples` windows of `seqlen` token ids -> LongTensor [nsamples, seqlen]."""
    return _sample(docs, tokenizer, nsamples, seqlen, seed, name)[0]


def _sample(docs: Sequence[str], tokenizer, nsamples: int, seqlen: int, seed: int, name: str):
    """(windows [nsamples, seqlen], what they used): ("documents", document indices)
    or ("stream", [(start, end) token spans of the stream])."""
    if not docs or not any(d.strip() for d in docs):
        raise CompressError(f"calib.source: the {name} text is empty")
    rng = random.Random(seed)
    long, cache, used = _find_long_documents(docs, tokenizer, nsamples, seqlen, rng, name)
    rows: List[List[int]] = []
    spans: List[tuple] = []
    if len(long) >= nsamples:
        for ids in long:
            start = rng.randint(0, len(ids) - seqlen)  # inclusive: any full window
            rows.append(ids[start:start + seqlen])
        log.info("calib %s: %d windows of %d tokens from %d distinct random documents "
                 "longer than %d tokens (method: documents)",
                 name, nsamples, seqlen, nsamples, seqlen)
    else:
        stream = _stream(docs, tokenizer, cache)
        if len(stream) < seqlen:
            raise CompressError(f"calib.seqlen: the {name} text has only {len(stream)} "
                                f"tokens, fewer than seqlen={seqlen}")
        for _ in range(nsamples):
            start = rng.randint(0, len(stream) - seqlen)
            rows.append(stream[start:start + seqlen])
            spans.append((start, start + seqlen))
        if len(docs) == 1:
            why = "one document (the whole text)"
        else:
            why = (f"only {len(long)} of {len(docs)} documents are longer than {seqlen} "
                   f"tokens (< nsamples={nsamples})")
        log.info("calib %s: %s; %d random windows of the concatenated %d-token stream "
                 "(method: stream)", name, why, nsamples, len(stream))
        return torch.tensor(rows, dtype=torch.long), ("stream", spans)
    return torch.tensor(rows, dtype=torch.long), ("documents", used)


def _cut(stream: List[int], drop: List[tuple], seqlen: int) -> List[List[int]]:
    """Consecutive windows from the stretches of `stream` between the sorted `drop` spans."""
    rows, pos = [], 0
    for lo, hi in drop + [(len(stream), len(stream))]:
        while pos + seqlen <= lo:
            rows.append(stream[pos:pos + seqlen])
            pos += seqlen
        pos = max(pos, hi)
    return rows


def training_windows(docs: Sequence[str], tokenizer, nsamples: int, seqlen: int, seed: int,
                     name: str = "text", exclude: Optional[tuple] = None) -> torch.LongTensor:
    """Up to `nsamples` non-overlapping windows of `seqlen` tokens for training, packed
    from the documents (joined by "\\n\\n", as in LM pre-training) -> [n, seqlen].

    exclude (nsamples, seqlen, seed) of a calibration draw from the same documents:
    the documents it took a window from (method "documents"), or the token spans of
    its windows (method "stream"), are left out, so training and calibration text are
    disjoint. Fewer windows than asked is logged, not an error (training cycles)."""
    if not docs or not any(d.strip() for d in docs):
        raise CompressError(f"calib.source: the {name} text is empty")
    drop_docs: set = set()
    drop_spans: List[tuple] = []
    if exclude is not None:
        kind, used = _sample(docs, tokenizer, *exclude, name=f"{name} (calibration)")[1]
        drop_docs, drop_spans = (set(used), []) if kind == "documents" else (set(), used)
    sep = _tokenize(tokenizer, [_SEPARATOR])[0] if len(docs) > 1 else []
    stream: List[int] = []
    rows: List[List[int]] = []
    for first in range(0, len(docs), _CHUNK):  # document order, as `_stream` (spans refer to it)
        for i, ids in enumerate(_tokenize(tokenizer, docs[first:first + _CHUNK]), first):
            if i and sep:
                stream.extend(sep)
            if i in drop_docs:
                drop_spans.append((len(stream), len(stream) + len(ids)))
            stream.extend(ids)
        rows = _cut(stream, sorted(drop_spans), seqlen)
        if len(rows) >= nsamples:
            break
    if not rows:
        raise CompressError(f"perp.data: the {name} text has no {seqlen}-token stretch outside the calibration windows")
    random.Random(seed).shuffle(rows)
    if len(rows) < nsamples:
        log.warning("training data %s: only %d windows of %d tokens outside the calibration text "
                    "(asked for %d); training cycles over them", name, len(rows), seqlen, nsamples)
    log.info("training data %s: %d windows of %d tokens (packed%s)", name, min(len(rows), nsamples), seqlen,
             ", disjoint from the calibration windows" if exclude else "")
    return torch.tensor(rows[:nsamples], dtype=torch.long)
