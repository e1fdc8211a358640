"""Task accuracy through lm-evaluation-harness, and one task we build for offline use.

Papers and model cards judge a compressed model by zero-shot task accuracy measured
with lm-evaluation-harness (`lm-eval`), so we run its tasks rather than write our own:
our loaded model object (packed runtime modules such as QuantLinear included, on the
device it is on) goes to lm-eval's HF wrapper, `HFLM(pretrained=model, ...)`. lm-eval
is imported only when tasks are asked for: it is an optional extra (`compress[tasks]`)
and indexing its task folder takes seconds.

The offline task, `lastword_wikitext2`: LAMBADA-style last-word prediction on the
WikiText-2 test text (the data perplexity already uses), for machines without the hub.
Each example is one paragraph that ends in " <word> ." with an alphabetic word: the
target is that word, the context the whole sentences before it in the paragraph (at
most MAX_WORDS words, at least MIN_WORDS). `acc` is the share of targets the model
predicts greedily, token for token (lambada's `is_greedy`); `perplexity` is
exp(-mean log-likelihood of the target). The examples and the task YAML are written at
run time into a temporary folder, never committed, so the task always matches the text
the user has.

This module imports only the standard library, torch, yaml and compress.errors; the
text comes from the caller (the pipeline reads data; see the import contracts).
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import json
import logging
import os
import random
import re
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml

from compress.errors import CompressError

log = logging.getLogger(__name__)

OFFLINE_TASK = "lastword_wikitext2"
MIN_WORDS, MAX_WORDS = 30, 150
INSTALL = "pip install 'compress[tasks]' (lm-eval>=0.4.9)"
# Perplexity-like metrics get a bootstrap stderr; lm-eval's default 100000 draws in a
# process pool would fork a process that holds the model, so we draw fewer, in process.
BOOTSTRAP_ITERS = 1000
# WikiText's raw text is tokenized ("film , television", "guest @-@ starring"); models
# saw natural text, so undo the tokenization as lm-eval's wikitext detokenizer does.
_DETOK = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" ; ", "; "), (" : ", ": "),
          (" 's ", "'s "), (" n't ", "n't "), ("( ", "("), (" )", ")")]


def _detokenize(text: str) -> str:
    for a, b in _DETOK:
        text = text.replace(a, b)
    text = re.sub(r'" ([^"]*?) "', r'"\1"', text)   # quotes hug what they quote
    return re.sub(r" ([.!?])(?= |$)", r"\1", text)


def lastword_examples(text: str) -> list[dict]:
    """The offline task's examples, {"context", "target"}, in text order: one per
    paragraph of `text` (WikiText-2 raw, headings skipped) ending in " <word> ." with
    an alphabetic word, its context the whole sentences before the word (<= MAX_WORDS
    words; a longer last sentence is cut at its start) when they hold >= MIN_WORDS."""
    examples = []
    for line in text.split("\n"):
        words = line.split()
        if len(words) < MIN_WORDS + 2 or words[0] == "=" or words[-1] != "." or not words[-2].isalpha():
            continue
        body = words[:-2]
        starts = [0] + [i + 1 for i, w in enumerate(body) if w in (".", "!", "?")]
        start = next((s for s in starts if len(body) - s <= MAX_WORDS), len(body) - MAX_WORDS)
        context = body[start:]
        if len(context) >= MIN_WORDS:
            examples.append({"context": _detokenize(" ".join(context)), "target": words[-2]})
    return examples


def write_offline_task(folder: Path, text: str) -> Path:
    """Write the offline task (examples as jsonl, an lm-eval task YAML) into `folder`,
    which lm-eval then reads with TaskManager(include_path=folder). The datasets cache
    goes into the folder too, so that nothing outlives it."""
    folder = Path(folder)
    examples = lastword_examples(text)
    if not examples:
        raise CompressError(f"eval.tasks: {OFFLINE_TASK}: the WikiText-2 text holds no paragraph that ends "
                            f"in a word after >= {MIN_WORDS} words of context")
    data = folder / f"{OFFLINE_TASK}.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
    spec = {"task": OFFLINE_TASK, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder / "cache")},
            "output_type": "loglikelihood", "test_split": "test",
            "doc_to_text": "{{context}}", "doc_to_target": "{{' ' + target}}", "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}],
            "metadata": {"version": 1.0, "examples": len(examples)}}
    (folder / f"{OFFLINE_TASK}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    log.info("%s: %d examples from the WikiText-2 test text", OFFLINE_TASK, len(examples))
    return data


def _lm_eval(field: str = "eval.tasks"):
    """lm_eval, or a one-line error saying how to install it."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401
    except ImportError as e:
        raise CompressError(f"{field}: task accuracy needs lm-evaluation-harness ({e}); {INSTALL}") from None
    return lm_eval


@functools.lru_cache(maxsize=1)
def harness_task_names() -> tuple:
    """Every name lm-eval knows (tasks, groups, tags): indexing its folder takes seconds,
    so once per process."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    return tuple(TaskManager().all_tasks)


def check_task_names(tasks: Sequence[str], field: str = "eval.tasks") -> None:
    """Refuse unknown task names in one line that lists the close matches, so that a
    typo fails before the model is loaded, not after."""
    _lm_eval(field)
    unknown = [t for t in tasks if t != OFFLINE_TASK]
    if not unknown:
        return
    known = set(harness_task_names()) | {OFFLINE_TASK}
    parts = []
    for name in (t for t in unknown if t not in known):
        close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
        parts.append(f"{name!r} (close: {', '.join(close)})" if close else f"{name!r} (no close match)")
    if parts:
        raise CompressError(f"{field}: unknown task {'; '.join(parts)}; `lm-eval ls tasks` (older lm-eval: "
                            f"`lm_eval --tasks list`) lists them all; {OFFLINE_TASK} is the offline one")


@contextlib.contextmanager
def _quiet(name: str):
    """HFLM warns that a model object was passed instead of a name (which is what we
    mean to do) and that a single process is assumed (only process 0 evaluates)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _isolated():
    """lm-eval seeds python's, numpy's and torch's global generators and prints to
    stdout; keep both from leaking into the run (stdout carries our JSON)."""
    import numpy as np

    py, npy, env = random.getstate(), np.random.get_state(), os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"   # bootstrap stderr in process (see BOOTSTRAP_ITERS)
    try:
        with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        if env is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = env


def _first_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def evaluate_tasks(model, tokenizer, tasks: Sequence[str], text: Optional[str] = None,
                   num_fewshot: Optional[int] = None, limit: Optional[int] = None, batch_size: int = 4,
                   device=None, desc: str = "tasks") -> dict:
    """Run lm-eval `tasks` on the loaded `model`; return {task: {metric: value,
    metric_stderr: value, "n": examples}} (see `task_results`).

    `text` is the WikiText-2 test text, needed for OFFLINE_TASK. `device`: where the
    model is evaluated (moved there and back; default: where it is). The tokenizer is
    copied, since lm-eval may give it a pad token and ours is saved with the model."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    ours = OFFLINE_TASK in tasks
    if ours and text is None:
        raise ValueError(f"{OFFLINE_TASK} needs the WikiText-2 test text")
    home = _first_device(model)
    device = torch.device(device) if device is not None else home
    was_training = getattr(model, "training", False)
    with tempfile.TemporaryDirectory(prefix="compress-tasks-") as tmp, _isolated():
        if ours:
            write_offline_task(Path(tmp), text)
        manager = TaskManager(include_path=tmp if ours else None,
                              include_defaults=any(t != OFFLINE_TASK for t in tasks))
        if device != home:
            model.to(device)
        try:
            with _quiet(HFLM.__module__):
                lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
            out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False)
        finally:
            model.train(was_training)
            if device != home:
                model.to(home)
    scores = task_results(out)
    for task, metrics in scores.items():
        log.info("%s %s: %s", desc, task, ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in metrics.items() if not k.endswith("_stderr")))
    return scores


def _number(value):
    """lm-eval writes "N/A" where a stderr cannot be computed: keep numbers only."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def task_results(out: dict) -> dict:
    """lm-eval's results as {task: {metric: value, metric + "_stderr": value, "n": n}}:
    metric names lose lm-eval's ",none" filter suffix (another filter stays, as
    "metric/filter"); n is the number of examples scored (summed over a group's tasks)."""
    counts = {t: c.get("effective", c.get("original")) for t, c in out.get("n-samples", {}).items()}
    scores = {}
    for task, metrics in out["results"].items():
        row = {}
        for key, value in metrics.items():
            if "," not in key:
                continue    # "alias", "name", ...
            metric, filt = key.split(",", 1)
            stderr = metric.endswith("_stderr")
            name = metric[: -len("_stderr")] if stderr else metric
            name = name if filt == "none" else f"{name}/{filt}"
            row[name + ("_stderr" if stderr else "")] = _number(value)
        subtasks = out.get("group_subtasks", {}).get(task) or []
        n = counts.get(task) if task in counts else sum(counts.get(t) or 0 for t in subtasks) or None
        scores[task] = {**row, "n": n}
    return scores
