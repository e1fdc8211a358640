"""`compress run recipe.yaml`: load, calibrate, compress, evaluate, save."""
from __future__ import annotations

import logging
import time
from typing import Optional

import torch

from compress import dist
from compress.api import as_configs, peak_rss_mib, run, versions
from compress.errors import CompressError
from compress.loading import load_model, resolve_model
from compress.recipe import EvalConfig, Recipe
from compress.runner import preflight

log = logging.getLogger(__name__)


def eval_windows_for(cfg: EvalConfig, tokenizer) -> torch.Tensor:
    from calib import load_text
    from compress.eval import eval_windows

    text = load_text(cfg.dataset, cfg.split, cfg.data_dir, prefix="eval.")
    return eval_windows(tokenizer, text, cfg.seqlen, cfg.max_windows)


def task_text(cfg: Optional[EvalConfig]) -> Optional[str]:
    """The WikiText-2 test text the offline task is built from (compress.tasks), read
    before the model is loaded so that missing data fails first; None when that task
    is not asked for."""
    from calib import ENV_VAR, load_text
    from compress.tasks import OFFLINE_TASK

    if cfg is None or OFFLINE_TASK not in (cfg.tasks or ()):
        return None
    try:
        return load_text("wikitext2", "test", cfg.data_dir, prefix="eval.")
    except CompressError as e:
        raise CompressError(f"eval.tasks: {OFFLINE_TASK} is built from the WikiText-2 test text, which was not "
                            f"found ({e}); point {ENV_VAR} or --data-dir (eval.data_dir) at a folder holding "
                            f"wikitext-2-raw/wiki.test.raw") from None


def evaluate_model(model, windows, cfg: EvalConfig, device=None, record=None, reference=None, desc="eval",
                   tokenizer=None, text: Optional[str] = None) -> dict:
    """Perplexity on `windows` (and KL / top-1 against `reference`), plus, when the
    config names tasks, lm-eval's scores under "tasks" (`text`: see task_text)."""
    from compress.eval import evaluate

    result = evaluate(model, windows, batch_size=cfg.batch_size, record=record, reference=reference,
                      device=device, desc=desc)
    if cfg.tasks:
        from compress.tasks import evaluate_tasks

        result["tasks"] = evaluate_tasks(model, tokenizer, cfg.tasks, text=text, num_fewshot=cfg.num_fewshot,
                                         limit=cfg.limit, batch_size=cfg.batch_size, device=device, desc=desc)
    return result


def run_state(recipe: Recipe, ids: torch.Tensor, out_dir: Optional[str], run_dir: Optional[str],
              resume: Optional[str]):
    """The RunState that saves progress block by block: in `resume` (continuing the run
    there), else in `run_dir`, else beside the output as OUTPUT.run; None without an
    output. The processes of a distributed run share it (on a shared file system when
    they run on several nodes)."""
    from compress.resume import RunState, fingerprint

    path = resume or run_dir or (f"{str(out_dir).rstrip('/')}.run" if out_dir else None)
    if path is None:
        return None
    return RunState(path, fingerprint(recipe.sha256, ids), resume=resume is not None)


def load_for(recipe: Recipe, kept: bool):
    """(model, tokenizer) of the recipe; offloaded (blocks left on disk) when the runner
    asks for it, which needs a run folder to keep the compressed blocks in (`kept`)."""
    if not recipe.runner.offload:
        return load_model(recipe.model, getattr(torch, recipe.dtype))
    if not kept:
        raise CompressError("runner.offload: the compressed blocks are kept in a run folder; set output")
    if recipe.calib.source == "self":
        raise CompressError("runner.offload: calib.source 'self' generates text with the whole model; "
                            "use c4, wikitext2, text or jsonl")
    from compress.offload import load_lazy

    where, gguf = resolve_model(recipe.model)
    if gguf:
        raise CompressError("runner.offload: reads a safetensors model folder, not GGUF "
                            "(write one with `compress export MODEL --format hf DIR`)")
    return load_lazy(where, getattr(torch, recipe.dtype))


def write_output(recipe: Recipe, out_dir: str, model, tokenizer, report: dict) -> None:
    """The recipe's output: an export in `output.format`, else our own save."""
    if recipe.output.format is not None:
        from compress.export import export

        export(model, tokenizer, out_dir, recipe.output.export_config(), report=report, recipe=recipe.resolved(),
               inplace=True)
    else:
        from compress.checkpoint import save

        save(out_dir, model, tokenizer, recipe=recipe.resolved(), report=report, dtype=recipe.output.dtype)


def stage_seconds(t_start: float, marks: dict, evaluation: dict) -> dict:
    """Seconds per stage from the times the stages ended (`marks`, in run order); an
    evaluation that did not run has no entry. Saving is timed where the weights are
    written (compress.reporting), since report.json is written with them."""
    out, t = {}, t_start
    for name, end in marks.items():
        if not name.startswith("eval_") or name[len("eval_"):] in evaluation:
            out[name] = round(end - t, 2)
        t = end
    return out


def run_recipe(recipe: Recipe, output: Optional[str] = None, run_dir: Optional[str] = None,
               resume: Optional[str] = None) -> dict:
    """Run a validated recipe; return its report (also written beside the output).

    Progress is saved after every block (see run_state); `resume` names the run folder
    of an interrupted run of the same recipe to continue."""
    from compress.checkpoint import check_output_dir

    out_dir = output or recipe.output.dir
    if out_dir is not None:
        check_output_dir(out_dir)  # before the long run, not after it
    created = dist.init(recipe.runner.device)   # torchrun / accelerate launch: one process group
    try:
        dist.check_same("recipe", recipe.sha256)
        return _run_recipe(recipe, out_dir, run_dir, resume)
    finally:
        dist.close(created)


def _run_recipe(recipe: Recipe, out_dir: Optional[str], run_dir: Optional[str], resume: Optional[str]) -> dict:
    from calib import load_calibration
    from compress.eval import ReferenceLogProbs

    t_start = time.perf_counter()
    text = task_text(recipe.eval)   # the offline task's data, before the model: missing data fails first
    model, tokenizer = load_for(recipe, kept=out_dir is not None or run_dir is not None or resume is not None)
    configs = as_configs(recipe.passes)
    preflight(model, configs)
    # Evaluation data first: a missing data set should fail before minutes of work.
    windows = eval_windows_for(recipe.eval, tokenizer) if recipe.eval else None
    marks = {"load": time.perf_counter()}   # when each stage ended, for the summary's seconds per stage
    ids = load_calibration(recipe.calib, tokenizer, model)
    marks["calibration"] = time.perf_counter()
    state = run_state(recipe, ids, out_dir, run_dir, resume)

    # Under torchrun / accelerate launch every process runs the recipe, each calibrating
    # on its own samples (compress.dist); only the first evaluates and writes the output.
    main = dist.rank() == 0
    windows = windows if main else None
    evaluation, reference = {}, None
    if windows is not None and recipe.eval.compare:
        reference = ReferenceLogProbs()
        evaluation["dense"] = evaluate_model(model, windows, recipe.eval, recipe.runner.device,
                                             record=reference, desc="eval dense", tokenizer=tokenizer, text=text)
    marks["eval_dense"] = time.perf_counter()
    try:
        model, report = run(model, configs, ids, tokenizer, calib_config=recipe.calib, device=recipe.runner.device,
                            batch_size=recipe.runner.batch_size, true_sequential=recipe.runner.true_sequential,
                            compute_dtype=recipe.runner.compute_dtype, state=state,
                            moe_calibration=recipe.runner.moe_calibration, moe_min_tokens=recipe.runner.moe_min_tokens)
        marks["compression"] = time.perf_counter()
        if windows is not None:
            evaluation["compressed"] = evaluate_model(model, windows, recipe.eval, recipe.runner.device,
                                                      reference=reference, desc="eval compressed",
                                                      tokenizer=tokenizer, text=text)
        marks["eval_compressed"] = time.perf_counter()
    finally:
        if reference is not None:
            reference.close()
    report = {"model": recipe.model, "recipe_sha256": recipe.sha256, **report,
              "calibration": {**report["calibration"], "source": recipe.calib.source, "seed": recipe.calib.seed},
              "eval": evaluation or None}
    report["summary"].update(total_seconds=round(time.perf_counter() - t_start, 1), peak_rss_mib=round(peak_rss_mib(), 1),
                             stage_seconds=stage_seconds(t_start, marks, evaluation))
    report["versions"] = versions()
    if out_dir is not None and main:
        write_output(recipe, out_dir, model, tokenizer, report)
    if state is not None and out_dir is not None:
        state.close()
    for name, ev in evaluation.items():
        log.info("%s: %s", name, ", ".join(f"{k}={v:.4g}" for k, v in ev.items() if isinstance(v, float)))
    return report
