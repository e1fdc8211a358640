"""Data-free calibration: the model writes its own calibration text (as in LLM-QAT).

Each sample starts from one random vocabulary token (special tokens excluded), drawn
from a local `torch.Generator(seed)`. If the tokenizer puts a BOS in front of text it
encodes (LLaMA-style), the prompt is [BOS, random token], so the model sees the same
kind of prefix as in training. The rest is sampled from the model at temperature 1.0
with nucleus sampling (top_p = 0.95, top_k off): close to the model's own
distribution, as LLM-QAT samples, but without the far tail, where tiny probabilities
produce broken text. EOS is suppressed (min_new_tokens) so every sample has exactly
`seqlen` tokens.

Generation runs inside `torch.random.fork_rng` with `torch.manual_seed(seed)`, so the
same seed gives the same ids and the caller's global RNG state is left untouched.
"""
from __future__ import annotations

import logging
from typing import List

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

log = logging.getLogger(__name__)

TOP_P = 0.95
BATCH_SIZE = 16


def _prompt_prefix(tokenizer) -> List[int]:
    """[BOS] if the tokenizer itself adds a BOS when encoding text, else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def _start_tokens(tokenizer, vocab_size: int, n: int, seed: int) -> torch.LongTensor:
    """`n` random non-special token ids below `vocab_size` -> [n] (seeded, local RNG)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    allowed = torch.tensor([i for i in range(vocab_size) if i not in special], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(len(allowed), (n,), generator=gen)]


def _generation_config(tokenizer, new_tokens: int) -> GenerationConfig:
    """Sampling settings; set here in full so model-specific defaults do not leak in."""
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)
    return GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=TOP_P, num_beams=1,
        repetition_penalty=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        eos_token_id=eos, pad_token_id=pad, use_cache=True)


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def generate_self(model, tokenizer, nsamples: int, seqlen: int, seed: int,
                  batch_size: int = BATCH_SIZE) -> torch.LongTensor:
    """`nsamples` model-written sequences of exactly `seqlen` ids -> LongTensor [nsamples, seqlen].

    Runs on the model's device, `batch_size` sequences per `generate` call.
    """
    device = _device_of(model)
    prefix = _prompt_prefix(tokenizer)[: max(seqlen - 1, 0)]
    head_out = model.get_output_embeddings()
    model_vocab = head_out.weight.shape[0] if head_out is not None else model.config.vocab_size
    vocab = min(len(tokenizer), model_vocab)  # a start token must exist on both sides
    starts = _start_tokens(tokenizer, vocab, nsamples, seed)            # [nsamples]
    prompt_len = len(prefix) + 1
    config = _generation_config(tokenizer, seqlen - prompt_len)
    log.info("calib self: the model writes %d samples of %d tokens (start: %s random token; "
             "temperature 1.0, top_p %.2f)", nsamples, seqlen,
             "BOS +" if prefix else "one", TOP_P)

    rows: List[torch.Tensor] = []
    saved_config, was_training = model.generation_config, model.training
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        model.eval()
        model.generation_config = config  # no model defaults (e.g. repetition penalty)
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)
            for b in tqdm(range(0, nsamples, batch_size), desc="calib self: generate",
                          unit="batch", leave=False):
                first = starts[b:b + batch_size, None]                     # [B, 1]
                head = torch.tensor(prefix, dtype=torch.long).expand(len(first), -1)
                prompt = torch.cat([head, first], dim=1).to(device)        # [B, prompt_len]
                if seqlen <= prompt_len:
                    rows.append(prompt[:, :seqlen].cpu())
                    continue
                out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                     generation_config=config)             # [B, seqlen]
                if out.shape[1] < seqlen:  # cannot happen with min_new_tokens; guard anyway
                    raise RuntimeError(f"generate returned {out.shape[1]} < {seqlen} tokens")
                rows.append(out[:, :seqlen].cpu())
    finally:
        model.generation_config = saved_config
        model.train(was_training)
    return torch.cat(rows).long()
