"""Shared test fixtures: a tiny local tokenizer and a tiny random LLaMA.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on a few lines
(so it can encode any text, with no <unk>), wrapped in PreTrainedTokenizerFast. Like
LLaMA's, it puts a BOS in front of encoded text unless add_special_tokens=False.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter (numpy on the CPU). It must
# be chosen before any kernel is defined, i.e. before compress.kernels' Triton modules load.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `pytest -m cuda` tests take the `cuda_device` fixture. Without a GPU they skip, unless
# COMPRESS_REHEARSE_CUDA=1: then those that can run on the CPU (Triton in its interpreter,
# at `rehearsal` sizes) do, so that a GPU check's test code is debugged before device time
# is spent on it (benchmarks/gpu_check.sh --dry-run).
REHEARSE_CUDA = os.environ.get("COMPRESS_REHEARSE_CUDA") == "1" and not torch.cuda.is_available()

TINY_VOCAB = 320  # 256 byte tokens + 3 specials + merges

_TRAINING_LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "A model is compressed after training, with a little calibration data.",
    "Perplexity is the exponential of the mean negative log-likelihood per token.",
    " = Valkyria Chronicles III = ",
    "The game began development in 2010, carrying over a large portion of the work.",
    "It was released in January 2011 in Japan, and was the third game in the series.",
    "Beginners BBQ Class Taking Place in Missoula! Do you want to get better at making",
    "delicious BBQ? You will have the opportunity, put this on your calendar now.",
    "Pruning removes weights; quantization stores the remaining ones in fewer bits.",
]


def _build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TRAINING_LINES * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE tokenizer, vocab ~TINY_VOCAB; adds <s> (BOS) by default."""
    return _build_tiny_tokenizer()


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    """A fresh random LlamaForCausalLM (hidden 64, 2 layers), vocab = len(tiny_tokenizer).

    Function-scoped, so a test may change its weights. Built under torch.manual_seed(0)
    inside fork_rng: always the same weights, and the global RNG state is not touched.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id,
        tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model.eval()


@pytest.fixture
def cuda_device() -> torch.device:
    """The GPU for a `cuda`-marked test; the CPU in a rehearsal; else the test skips."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if REHEARSE_CUDA:
        return torch.device("cpu")
    pytest.skip("needs a CUDA GPU (benchmarks/gpu_check.sh runs these on one)")


@pytest.fixture
def rehearsal() -> bool:
    """True when `cuda`-marked tests run on the CPU at small sizes (see REHEARSE_CUDA)."""
    return REHEARSE_CUDA


@pytest.fixture
def data_dir() -> Path:
    """The local benchmark-text folder from $COMPRESS_DATA_DIR (skip when unset)."""
    value = os.environ.get("COMPRESS_DATA_DIR")
    if not value:
        pytest.skip("COMPRESS_DATA_DIR not set: point it at a folder laid out like "
                    "shared/data (wikitext-2-raw/, c4/) to run the real-text tests")
    return Path(value)


@pytest.fixture
def tiny4_dir(tmp_path, tiny_tokenizer):
    """A random 4-block LLaMA (tied head) saved with the tiny tokenizer: a model folder
    for CLI runs that cut off, resume or offload between blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    d = tmp_path / "tiny4"
    model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def corpus(tmp_path):
    """A plain-text calibration (and training) source for `calib: {source: text}`."""
    p = tmp_path / "corpus.txt"
    p.write_text(" ".join(f"Sentence number {i} talks about pruning and the weights of models." for i in range(600)))
    return p
