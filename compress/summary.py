"""The end-of-run summary: a plain-text table a person reads on stderr instead of a JSON
dump, from report.json alone (`compress report OUT_DIR` prints it again for a finished
run, and a test reads every number in it back against the report).

Plain formatting, no table library: the table is a dozen aligned lines, and it must
read the same in a log file as in a terminal.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

GAP = "  "   # between columns; a cell never holds two spaces in a row, so the columns split back apart

# report["eval"][side] keys shown as rows, with their label and decimals
EVAL_ROWS = (("ppl", "perplexity", 2), ("kl", "KL to dense", 4), ("top1", "top-1 agreement", 4))
# report["summary"]["stage_seconds"] keys, in run order, and their labels
STAGES = (("load", "load (s)"), ("calibration", "calibration (s)"), ("eval_dense", "eval dense (s)"),
          ("compression", "compression (s)"), ("eval_compressed", "eval compressed (s)"), ("save", "save (s)"))


def table(report: dict, out_dir: Optional[str] = None) -> str:
    """The summary of a run's report: evaluation (dense against compressed), what the
    compression did to the weights, time and memory, and where the files are."""
    rows = _eval_rows(report.get("eval") or {})
    rows += [()] + _weight_rows(report.get("summary") or {})
    rows += [()] + _time_rows(report.get("summary") or {})
    rows += [()] + _file_rows(out_dir)
    width = max(len(r[0]) for r in rows if r) + len(GAP)
    cells = max((len(c) for r in rows if len(r) > 2 for c in r[1:]), default=0)   # the dense / compressed columns
    lines = [_header(report)]
    for r in rows:
        line = f"{r[0]:<{width}}" + GAP.join(f"{c:<{cells}}" for c in r[1:]) if r else ""
        lines.append(line.rstrip())
    return "\n".join(lines)


def _row(label: str, *cells: str) -> tuple:
    return (label, *cells)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def task_metrics(tasks: dict) -> list[tuple[str, str]]:
    """(task, metric) of {side: report["eval"][side]["tasks"]}, in order of appearance:
    every metric with a number on some side (not "n", not a standard error). The table
    and eval.png (compress.plots) show these rows."""
    names = dict.fromkeys(t for side in tasks.values() for t in side)
    return [(task, m) for task in names
            for m in dict.fromkeys(m for side in tasks.values() for m, v in (side.get(task) or {}).items()
                                   if m != "n" and not m.endswith("_stderr") and is_number(v))]


def number(v, decimals: int) -> str:
    """v with a fixed number of decimals; '-' for a missing value, inf / nan as such."""
    if not is_number(v):
        return "-"
    return f"{v:.{decimals}f}" if math.isfinite(v) else str(float(v))


def _header(report: dict) -> str:
    passes = ", ".join(next(iter(p)) for p in report.get("passes") or [] if isinstance(p, dict) and p)
    return f"compress: {report.get('model', '?')}" + (f"  passes: {passes}" if passes else "")


def _eval_rows(evaluation: dict) -> list[str]:
    """Perplexity, KL and top-1 (dense against itself has no KL or top-1: '-'), then one
    row per task metric, `value ± standard error`."""
    if not evaluation:
        return [(), _row("evaluation", "none (the recipe has no eval section)")]
    sides = ("dense", "compressed")
    ev = {s: evaluation.get(s) or {} for s in sides}
    out = [(), _row("", *sides)]
    for key, label, d in EVAL_ROWS:
        if any(key in ev[s] for s in sides):
            out.append(_row(label, *(number(ev[s].get(key), d) for s in sides)))
    tasks = {s: ev[s].get("tasks") or {} for s in sides}
    for task, m in task_metrics(tasks):
        res = {s: tasks[s].get(task) or {} for s in sides}
        n = next((r["n"] for r in res.values() if isinstance(r.get("n"), int)), None)
        label = f"{task}/{m}" + (f" [n={n}]" if n is not None else "")
        out.append(_row(label, *(_with_stderr(res[s], m) for s in sides)))
    return out


def _with_stderr(result: dict, metric: str) -> str:
    v, se = number(result.get(metric), 4), number(result.get(f"{metric}_stderr"), 4)
    return v if v == "-" or se == "-" else f"{v} ± {se}"


def size(nbytes) -> str:
    """Bytes in MiB, or GiB from 1 GiB on."""
    if not isinstance(nbytes, (int, float)):
        return "-"
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def _weight_rows(summary: dict) -> list[str]:
    out = [_row("sparsity", f"{number(summary.get('targeted_sparsity'), 4)} of the targeted layers, "
                            f"{number(summary.get('sparsity'), 4)} of all decoder weights")]
    out.append(_row("bits per weight", f"{number(summary.get('bits_per_weight'), 2)} in the targeted layers "
                                       "(a plain weight counts 16)"))
    have, dense = summary.get("output_bytes"), summary.get("dense_bytes")
    ratio = f", {have / dense:.3f}x" if isinstance(have, (int, float)) and dense else ""
    out.append(_row("size on disk", f"{size(have)} of weight files (dense in 16 bits: {size(dense)}{ratio})"))
    return out


def _time_rows(summary: dict) -> list[str]:
    # A report of the Python API (compress.run, then compress.save) times only the
    # compression (summary.seconds) and the save.
    stages = {**({"compression": summary["seconds"]} if "seconds" in summary else {}),
              **(summary.get("stage_seconds") or {})}
    out = [_row(label, number(stages[key], 2)) for key, label in STAGES if key in stages]
    if "total_seconds" in summary:
        out.append(_row("total (s)", f"{number(summary['total_seconds'], 1)} before saving"))
    out.append(_row("peak memory", f"{number(summary.get('peak_rss_mib'), 1)} MiB resident"))
    return out


def _file_rows(out_dir: Optional[str]) -> list[str]:
    if out_dir is None:
        return [_row("output", "none (the recipe has no output folder)")]
    folder = Path(out_dir).resolve()
    pngs = sorted(p.name for p in folder.glob("*.png"))
    return [_row("output", str(folder)), _row("report", str(folder / "report.json")),
            _row("plots", ", ".join(pngs) if pngs else "none")]
