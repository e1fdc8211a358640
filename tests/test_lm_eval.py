"""Task accuracy through lm-evaluation-harness (compress.tasks): the offline last-word
task against a hand count, the packed-model path against its dense twin, bad task
names, and the recipe's eval fields."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import compress
from compress.errors import CompressError
from compress.nn.quant_linear import QuantLinear
from compress.recipe import parse_recipe
from compress.tasks import OFFLINE_TASK, lastword_examples, task_results
from test_cli import run_cli, tiny_dir  # noqa: F401  (the CLI tests' model folder)

needs_lm_eval = pytest.mark.skipif(
    __import__("importlib").util.find_spec("lm_eval") is None,
    reason="lm-eval is not installed (pip install -e '.[tasks]'): the task tests need it")


@pytest.fixture
def examples(data_dir):
    """The offline task's first 10 examples, built from $COMPRESS_DATA_DIR's WikiText-2 test text."""
    from calib import load_text

    return lastword_examples(load_text("wikitext2", "test", data_dir))[:10]


def encode(tokenizer, example):
    """(context + continuation token ids, context length), split as lm-eval's HFLM splits
    a causal pair: the whole string encoded once, the context's own length cut off."""
    whole = tokenizer(example["context"] + " " + example["target"]).input_ids
    return whole, len(tokenizer(example["context"]).input_ids)


def hand_scores(model, tokenizer, examples) -> tuple[float, float]:
    """(acc, perplexity) in plain torch: a hit is every target token the argmax; the
    perplexity is exp(-mean log-likelihood of the target)."""
    hits, lls = 0, []
    with torch.no_grad():
        for e in examples:
            whole, n = encode(tokenizer, e)
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0, n - 1:-1].float(), -1)
            target = torch.tensor(whole[n:])
            hits += bool((logp.argmax(-1) == target).all())
            lls.append(float(logp.gather(-1, target[:, None]).sum()))
    return hits / len(examples), math.exp(-sum(lls) / len(lls))


def teach(model, tokenizer, examples) -> None:
    """Fit the (untied) output head so that the model predicts the targets of `examples`
    greedily: a random model scores 0 on every example, which would make the hand count
    trivial. Only the head learns, on hidden states computed once: a second."""
    feats, labels = [], []
    with torch.no_grad():
        for e in examples:
            whole, n = encode(tokenizer, e)
            feats.append(model.model(torch.tensor([whole])).last_hidden_state[0, n - 1:-1])
            labels.append(torch.tensor(whole[n:]))
    h, y = torch.cat(feats), torch.cat(labels)
    opt = torch.optim.Adam(model.lm_head.parameters(), lr=0.05)
    for _ in range(200):
        loss = F.cross_entropy(model.lm_head(h), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture
def taught_dir(tmp_path, tiny_llama, tiny_tokenizer, examples):
    """A tiny Llama folder that knows the targets of the first 5 of the 10 examples."""
    teach(tiny_llama, tiny_tokenizer, examples[:5])
    d = tmp_path / "taught"
    tiny_llama.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def cli_tasks(capsys, model_dir, *extra) -> dict:
    assert run_cli("eval", model_dir, "--tasks", OFFLINE_TASK, "--limit", 10, "--seqlen", 64, "--max-windows", 1,
                   *extra) == 0
    return json.loads(capsys.readouterr().out)


@needs_lm_eval
def test_offline_task_through_compress_eval_matches_a_hand_count(taught_dir, tiny_tokenizer, examples, capsys):
    out = cli_tasks(capsys, taught_dir)
    scores = out["model"]["tasks"][OFFLINE_TASK]
    assert out["model"]["ppl"] > 0                      # perplexity stays beside the task scores
    assert scores["n"] == 10 and 0 <= scores["acc"] <= 1
    model, _ = compress.load(str(taught_dir))
    acc, ppl = hand_scores(model, tiny_tokenizer, examples)
    assert 0 < acc < 1                                  # the taught examples are hit, not all the others
    assert scores["acc"] == acc
    assert scores["acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / 9))
    assert scores["perplexity"] == pytest.approx(ppl, rel=1e-4)


def dense_twin(model):
    """`model` with every QuantLinear replaced by an nn.Linear of its effective weight."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, m.to_linear(torch.float32))
    return model


@needs_lm_eval
def test_packed_model_scores_like_its_effective_weight_twin(taught_dir, tiny_tokenizer, tmp_path, capsys):
    from compress.loading import load_model

    model, _ = compress.load(str(taught_dir))
    ids = torch.randint(0, len(tiny_tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    model, _ = compress.run(model, [{"quant": {"bits": 8, "group_size": 32, "method": "rtn", "clip_search": False}}],
                            calib=ids)
    compress.save(str(tmp_path / "packed"), model, tiny_tokenizer)
    loaded, _ = load_model(str(tmp_path / "packed"))               # what compress eval loads
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 14
    compress.save(str(tmp_path / "twin"), dense_twin(loaded), tiny_tokenizer)   # a plain folder: no packed layer

    packed = cli_tasks(capsys, tmp_path / "packed")["model"]["tasks"][OFFLINE_TASK]
    twin = cli_tasks(capsys, tmp_path / "twin")["model"]["tasks"][OFFLINE_TASK]
    assert packed["acc"] > 0 and packed["acc"] == twin["acc"] and packed["n"] == twin["n"] == 10
    assert packed["perplexity"] == pytest.approx(twin["perplexity"], rel=1e-4)


@needs_lm_eval
def test_run_reports_task_scores_of_the_dense_and_the_compressed_model(taught_dir, tiny_tokenizer, examples,
                                                                       corpus, data_dir, tmp_path):
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "model": str(taught_dir), "calib": {"source": "text", "path": str(corpus), "nsamples": 4, "seqlen": 32},
        "passes": [{"magnitude": {"sparsity": 0.5}}],
        "eval": {"seqlen": 64, "max_windows": 1, "data_dir": str(data_dir), "tasks": [OFFLINE_TASK], "limit": 10},
        "output": str(out)}))
    assert run_cli("run", recipe) == 0
    ev = json.loads((out / "report.json").read_text())["eval"]
    dense, compressed = (ev[k]["tasks"][OFFLINE_TASK] for k in ("dense", "compressed"))
    assert set(dense) == set(compressed) == {"acc", "acc_stderr", "perplexity", "perplexity_stderr", "n"}
    assert dense["n"] == compressed["n"] == 10 and ev["dense"]["ppl"] > 0
    assert dense["acc"] == hand_scores(compress.load(str(taught_dir))[0], tiny_tokenizer, examples)[0]
    assert compressed["perplexity"] != dense["perplexity"]


@needs_lm_eval
def test_bad_task_name_is_one_line_with_close_matches_before_the_model_loads(tiny_dir, tmp_path, monkeypatch,
                                                                          capsys):
    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded for a bad task name")

    monkeypatch.setattr("compress.loading.load_model", no_load)
    monkeypatch.setattr("compress.pipeline.load_model", no_load)
    assert run_cli("eval", tiny_dir, "--tasks", f"arc_esay,{OFFLINE_TASK},hellaswg") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("compress: error: eval.tasks:")
    assert "'arc_esay'" in err and "arc_easy" in err and "hellaswag" in err and "Traceback" not in err

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {tiny_dir}\npasses: [{{magnitude: {{sparsity: 0.5}}}}]\n"
                      f"eval: {{tasks: [lastword_wikitext3]}}\noutput: {tmp_path / 'out'}\n")
    assert run_cli("run", recipe) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"(close: {OFFLINE_TASK}" in err and not (tmp_path / "out").exists()


def test_missing_offline_data_is_one_line_before_the_model_loads(tiny_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval", reason="the task check needs lm-eval")
    monkeypatch.setattr("compress.loading.load_model", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "empty").mkdir()
    assert run_cli("eval", tiny_dir, "--tasks", OFFLINE_TASK, "--data-dir", tmp_path / "empty") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "empty") in err
    assert "COMPRESS_DATA_DIR" in err and "--data-dir" in err


RECIPE = {"model": "m", "passes": [{"magnitude": {}}]}


@pytest.mark.parametrize("fields, message", [
    ({"tasks": "arc_easy"}, "eval.tasks: expected a non-empty list"),
    ({"tasks": []}, "eval.tasks: expected a non-empty list"),
    ({"tasks": [1]}, "eval.tasks: expected a non-empty list"),
    ({"tasks": [""]}, "eval.tasks: expected a non-empty list"),
    ({"tasks": ["arc_easy,piqa"]}, "eval.tasks: expected a non-empty list"),
    ({"tasks": [OFFLINE_TASK], "num_fewshot": -1}, "eval.num_fewshot: expected an integer >= 0"),
    ({"tasks": [OFFLINE_TASK], "num_fewshot": True}, "eval.num_fewshot: expected an integer >= 0"),
    ({"tasks": [OFFLINE_TASK], "limit": 0}, "eval.limit: expected an integer >= 1"),
    ({"tasks": [OFFLINE_TASK], "limit": 2.5}, "eval.limit: expected an integer >= 1"),
    ({"limit": 10}, "eval.limit: applies to task accuracy only"),
    ({"num_fewshot": 0}, "eval.num_fewshot: applies to task accuracy only"),
    ({"task": [OFFLINE_TASK]}, "eval"),                       # unknown key
])
def test_recipe_refuses_bad_eval_task_fields(fields, message):
    with pytest.raises(CompressError, match="^" + message.replace("[", r"\[")):
        parse_recipe({**RECIPE, "eval": fields})


@needs_lm_eval
def test_recipe_accepts_eval_task_fields():
    recipe = parse_recipe({**RECIPE, "eval": {"tasks": [OFFLINE_TASK], "num_fewshot": 0, "limit": 5}})
    assert (recipe.eval.tasks, recipe.eval.num_fewshot, recipe.eval.limit) == ([OFFLINE_TASK], 0, 5)
    assert recipe.resolved()["eval"]["tasks"] == [OFFLINE_TASK]
    assert parse_recipe({**RECIPE, "eval": {}}).eval.tasks is None


def test_task_results_strip_the_filter_and_count_examples():
    out = {"results": {"a": {"alias": "a", "acc,none": 0.5, "acc_stderr,none": 0.1,
                             "exact_match,strict-match": 1.0, "exact_match_stderr,strict-match": "N/A"},
                       "g": {"alias": "g", "acc,none": 0.25}, "b": {"acc,none": 0.0}},
           "n-samples": {"a": {"original": 100, "effective": 10}, "b": {"original": 4, "effective": 4}},
           "group_subtasks": {"g": ["a", "b"]}}
    assert task_results(out) == {
        "a": {"acc": 0.5, "acc_stderr": 0.1, "exact_match/strict-match": 1.0,
              "exact_match/strict-match_stderr": None, "n": 10},
        "g": {"acc": 0.25, "n": 14}, "b": {"acc": 0.0, "n": 4}}


def test_lastword_examples_end_paragraphs_in_a_word():
    words = " ".join(f"w{i}" for i in range(20))
    text = (f" = Heading = \n {words} . {words} , the end of it all came at the Drum Theatre in London . \n"
            f" too short to count London . \n {words} . {words} ends with a number 1999 . \n")
    ex = lastword_examples(text)
    assert len(ex) == 1 and ex[0]["target"] == "London"
    assert ex[0]["context"] == f"{words}. {words}, the end of it all came at the Drum Theatre in"
