"""Calibration data: config checks, determinism, window sampling, local benchmark text."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from calib import CalibConfig, load_calibration, load_text, resolve_data_dir
from calib.sources import load_rows
from compress.errors import CompressError


def _contains(haystack: torch.Tensor, needle: torch.Tensor) -> bool:
    """Whether `needle` [L] occurs as a contiguous run in `haystack` [N]."""
    runs = haystack.unfold(0, needle.numel(), 1)          # [N-L+1, L]
    return bool((runs == needle).all(-1).any())


def _write_text(tmp_path, n_lines=200):
    lines = [f"Line {i}: the calibration text talks about item {i * 7 % 13} and more."
             for i in range(n_lines)]
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# -- config validation ---------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    (dict(source="wiki"), "calib.source"),
    (dict(nsamples=-3), "calib.nsamples"),
    (dict(nsamples=0), "calib.nsamples"),
    (dict(nsamples=2.5), "calib.nsamples"),
    (dict(seqlen=0), "calib.seqlen"),
    (dict(seqlen=True), "calib.seqlen"),
    (dict(seed=-1), "calib.seed"),
    (dict(source="text"), "calib.path"),
    (dict(source="jsonl", path="/no/such/file.jsonl"), "calib.path"),
    (dict(source="c4", split="test"), "calib.split"),
    (dict(source="jsonl", path=__file__, field=""), "calib.field"),
])
def test_validate_names_the_field(kwargs, field):
    with pytest.raises(CompressError) as err:
        CalibConfig(**kwargs).validate()
    message = str(err.value)
    assert message.startswith(field + ":"), message
    assert "\n" not in message


def test_unknown_source_lists_valid_ones():
    with pytest.raises(CompressError, match="c4, wikitext2, text, jsonl, self"):
        CalibConfig(source="pile").validate()


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(CompressError, match=r"^calib\.n_samples: unknown key; valid keys: source, nsamples"):
        CalibConfig.from_dict({"n_samples": 4})
    cfg = CalibConfig.from_dict({"source": "self", "nsamples": 4, "seqlen": 8})
    assert (cfg.nsamples, cfg.seqlen) == (4, 8)


def test_self_needs_model(tiny_tokenizer):
    with pytest.raises(CompressError, match="calib.source: 'self' needs the model"):
        load_calibration(CalibConfig(source="self", nsamples=2, seqlen=8), tiny_tokenizer)


# -- text / jsonl sources ------------------------------------------------------------
def test_text_source_is_seeded_windows_of_the_stream(tmp_path, tiny_tokenizer, caplog):
    path = _write_text(tmp_path)
    cfg = CalibConfig(source="text", path=str(path), nsamples=6, seqlen=40, seed=3)
    with caplog.at_level(logging.INFO, logger="calib"):
        a = load_calibration(cfg, tiny_tokenizer)
    assert "method: stream" in caplog.text  # one file = one document < nsamples
    b = load_calibration(cfg, tiny_tokenizer)
    c = load_calibration(CalibConfig(**{**cfg.__dict__, "seed": 4}), tiny_tokenizer)
    assert a.shape == (6, 40) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Every sample is a contiguous window of the file's tokens, with no BOS added.
    stream = torch.tensor(tiny_tokenizer(path.read_text(), add_special_tokens=False).input_ids)
    assert all(_contains(stream, row) for row in a)
    assert (a != tiny_tokenizer.bos_token_id).all()


def test_global_rng_untouched(tmp_path, tiny_tokenizer):
    path = _write_text(tmp_path)
    state = torch.get_rng_state()
    load_calibration(CalibConfig(source="text", path=str(path), nsamples=3, seqlen=16),
                     tiny_tokenizer)
    assert torch.equal(state, torch.get_rng_state())


def test_jsonl_documents_method(tmp_path, tiny_tokenizer, caplog):
    # 12 long documents (distinct words per document) and 20 short ones.
    docs = [" ".join(f"doc{d}word{i}" for i in range(60)) for d in range(12)]
    docs += [f"short {d}" for d in range(20)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(docs)))
    cfg = CalibConfig(source="jsonl", path=str(path), field="body", nsamples=8, seqlen=32)
    with caplog.at_level(logging.INFO, logger="calib"):
        ids = load_calibration(cfg, tiny_tokenizer)
    assert "method: documents" in caplog.text
    assert ids.shape == (8, 32)
    tokenized = [torch.tensor(tiny_tokenizer(t, add_special_tokens=False).input_ids)
                 for t in docs[:12]]
    homes = [[k for k, doc in enumerate(tokenized) if _contains(doc, row)] for row in ids]
    assert all(len(h) >= 1 for h in homes)                 # each window inside one document
    assert len({h[0] for h in homes}) == 8                   # ... and all from different ones


def test_jsonl_too_few_long_documents_falls_back_to_stream(tmp_path, tiny_tokenizer, caplog):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document number {i} is short."})
                              for i in range(50)))
    cfg = CalibConfig(source="jsonl", path=str(path), nsamples=4, seqlen=24)
    with caplog.at_level(logging.INFO, logger="calib"):
        ids = load_calibration(cfg, tiny_tokenizer)
    assert ids.shape == (4, 24)
    assert "only 0 of 50 documents are longer than 24 tokens" in caplog.text
    assert "method: stream" in caplog.text


def test_jsonl_missing_field(tmp_path, tiny_tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"content": "hello"}) + "\n")
    cfg = CalibConfig(source="jsonl", path=str(path), nsamples=1, seqlen=4)
    with pytest.raises(CompressError, match=r"^calib\.field: line 1 .* no string field 'text'"):
        load_calibration(cfg, tiny_tokenizer)


def test_text_shorter_than_seqlen(tmp_path, tiny_tokenizer):
    path = tmp_path / "tiny.txt"
    path.write_text("just a few words")
    cfg = CalibConfig(source="text", path=str(path), nsamples=1, seqlen=500)
    with pytest.raises(CompressError, match=r"^calib\.seqlen: .* fewer than seqlen=500"):
        load_calibration(cfg, tiny_tokenizer)


# -- self (data-free) ---------------------------------------------------------------
def test_self_generation_deterministic(tiny_llama, tiny_tokenizer):
    cfg = CalibConfig(source="self", nsamples=18, seqlen=8, seed=5)  # 2 batches of 16
    state = torch.get_rng_state()
    a = load_calibration(cfg, tiny_tokenizer, tiny_llama)
    assert torch.equal(state, torch.get_rng_state())
    b = load_calibration(cfg, tiny_tokenizer, tiny_llama)
    c = load_calibration(CalibConfig(source="self", nsamples=18, seqlen=8, seed=6),
                         tiny_tokenizer, tiny_llama)
    assert a.shape == (18, 8) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    # The tiny tokenizer adds BOS, so each sample is [BOS, random token, generated...].
    assert (a[:, 0] == tiny_tokenizer.bos_token_id).all()
    specials = torch.tensor(tiny_tokenizer.all_special_ids)
    assert not torch.isin(a[:, 1:], specials[specials != tiny_tokenizer.pad_token_id]).any()
    assert a[:, 1].unique().numel() > 9  # random starts differ
    assert int(a.max()) < len(tiny_tokenizer)


# -- data folder -----------------------------------------------------------------------
def test_resolve_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("COMPRESS_DATA_DIR", raising=False)
    assert resolve_data_dir(None) is None
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    other = tmp_path / "other"
    other.mkdir()
    assert resolve_data_dir(str(other)) == other  # the recipe field wins
    with pytest.raises(CompressError, match=r"^calib\.data_dir: data folder not found"):
        resolve_data_dir(tmp_path / "missing", field="calib.data_dir")
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(CompressError, match=r"^COMPRESS_DATA_DIR: data folder not found"):
        resolve_data_dir(None)


def test_offline_hub_error_says_how_to_fix(monkeypatch, tiny_tokenizer):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.delenv("COMPRESS_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CompressError) as err:
        load_calibration(CalibConfig(source="wikitext2", nsamples=1, seqlen=8), tiny_tokenizer)
    message = str(err.value)
    assert message.startswith("calib.data_dir:") and "\n" not in message
    assert "COMPRESS_DATA_DIR" in message and "data_dir in the recipe" in message


def test_wikitext2_test_split_standard_text(data_dir):
    rows = load_rows("wikitext2", "test", data_dir)
    assert len(rows) == 4358 and sum(1 for r in rows if r) == 2891
    text = load_text("wikitext2", "test", data_dir)
    assert len(text) == 1_294_336                          # README: "\n\n".join(rows)
    assert text.startswith("\n\n = Robert Boulter = \n")  # row 0 is ""
    assert len(load_rows("wikitext2", "validation", data_dir)) == 3760


def test_wikitext2_train_missing_locally(data_dir, tiny_tokenizer):
    if (data_dir / "wikitext-2-raw" / "wiki.train.raw").exists():
        pytest.skip("this data folder has wiki.train.raw")
    cfg = CalibConfig(source="wikitext2", nsamples=2, seqlen=16, data_dir=str(data_dir))
    with pytest.raises(CompressError, match=r"^calib\.split: .*use split: valid, or source: c4"):
        load_calibration(cfg, tiny_tokenizer)


def test_c4_local(data_dir, tiny_tokenizer, caplog):
    text = load_text("c4", "validation", data_dir)
    docs = load_rows("c4", "validation", data_dir)
    assert len(docs) == 1025 and text == " ".join(docs)   # fewer than the 1100 standard
    assert text.startswith("The woman who died after falling from a bridge over the A21")
    cfg = CalibConfig(source="c4", nsamples=8, seqlen=64, seed=0, data_dir=str(data_dir))
    with caplog.at_level(logging.INFO, logger="calib"):
        a = load_calibration(cfg, tiny_tokenizer)
    assert "method: documents" in caplog.text
    assert a.shape == (8, 64) and torch.equal(a, load_calibration(cfg, tiny_tokenizer))


def test_wikitext2_valid_calibration(data_dir, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(data_dir))  # found through the environment
    cfg = CalibConfig(source="wikitext2", split="valid", nsamples=4, seqlen=32, seed=1)
    ids = load_calibration(cfg, tiny_tokenizer)
    assert ids.shape == (4, 32)
    assert torch.equal(ids, load_calibration(cfg, tiny_tokenizer))
