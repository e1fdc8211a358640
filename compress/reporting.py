"""What goes beside every output folder: the resolved recipe, a machine-readable
report.json, and the pictures a person would rather look at than read
(compress.plots). report.json is complete on its own: the end-of-run summary
(compress.summary) and the pictures are drawn from it alone, so `compress report
OUT_DIR` can show both again for a finished run.
"""
from __future__ import annotations

import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Optional

import yaml

from compress.errors import CompressError
from compress.plots import plot_eval, plot_layers, plot_loss, plot_sparsity

log = logging.getLogger(__name__)

# The files that hold a model's weights in the formats we write (ours, hf and
# compressed-tensors: safetensors; GGUF); their sum is the size on disk.
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin")


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_extras(folder: Path, recipe: Optional[dict], report: Optional[dict], started: Optional[float] = None) -> None:
    """recipe.yaml, report.json and the pictures beside the weights, which are already
    written: their size goes into the report (and `started`, the time.perf_counter()
    when writing began, gives the seconds it took) before the report is written."""
    if recipe is not None:
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    if report is not None:
        record_output(folder, report, started)
        write_json(folder / "report.json", report)
        draw(folder, report)


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


def record_output(folder: Path, report: dict, started: Optional[float] = None) -> None:
    """summary.output_bytes (the weight files' size) and stage_seconds.save, in place:
    the caller's report then says what the saved one says."""
    summary = report.get("summary")
    if not isinstance(summary, dict):
        return
    summary["output_bytes"] = weight_bytes(folder)
    if started is not None:
        summary.setdefault("stage_seconds", {})["save"] = round(time.perf_counter() - started, 2)


def draw(folder: Path, report: dict) -> list[Path]:
    """Every picture the report has data for, beside it; returns their paths. A picture
    that fails to draw is a warning, not a lost run: the weights are already written."""
    folder = Path(folder)
    jobs = [(f"{name}_loss.png", partial(plot_loss, entry["loss_curve"], title=f"{name}: training loss"))
            for name, entry in (report.get("training") or {}).items()]
    rows = report.get("layers") or []
    if rows:
        jobs.append(("layers.png", partial(plot_layers, report)))
    if any((r.get("sparsity") or 0) > 0.01 for r in rows):
        jobs.append(("sparsity.png", partial(plot_sparsity, report)))
    if report.get("eval"):
        jobs.append(("eval.png", partial(plot_eval, report)))
    drawn = []
    for name, plot in jobs:
        try:
            plot(folder / name)
            drawn.append(folder / name)
        except Exception as e:   # noqa: BLE001 - a picture is never worth the run
            log.warning("could not draw %s: %s", name, e)
    return drawn


def read_report(folder) -> dict:
    """FOLDER/report.json of a finished run, or a CompressError saying what is wrong."""
    path = Path(folder) / "report.json"
    if not Path(folder).is_dir():
        raise CompressError(f"report: {str(folder)!r} is not a folder (expected the output folder of `compress run`)")
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise CompressError(f"report: no report.json in {str(folder)!r} (expected the output folder of "
                            "`compress run`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompressError(f"report: {path} is not readable JSON ({e})") from None
    if not isinstance(report, dict) or not isinstance(report.get("summary"), dict):
        raise CompressError(f"report: {path} is not a report of `compress run` (no summary section)")
    return report
