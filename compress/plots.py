"""The pictures beside report.json, drawn from the report alone (so that `compress
report OUT_DIR` can draw them again for a finished run):

- `layers.png`: each layer's relative output error ‖(W−Ŵ)X‖²/‖WX‖² as a heat map,
  block × projection, and each block's sparsity beside it: where the error went, which
  is what a user looks at before choosing `ignore` or an allocation;
- `eval.png`: dense against compressed for every metric of the evaluation;
- `sparsity.png`: each block's sparsity (and what an allocation asked for) and mean error;
- `<stage>_loss.png`: the training loss curve of a model-level stage (PERP).

matplotlib draws them with its Agg backend: no display is needed.
"""
from __future__ import annotations

import math
import re

from compress.summary import is_number, task_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)


def plot_loss(curve: list[float], path, title: str) -> None:
    """The loss per optimizer step."""
    fig, ax = _pyplot().subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(range(1, len(curve) + 1), curve, lw=1.2)
    ax.set(xlabel="optimizer step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    _save(fig, path)


def final_rows(rows: list[dict]) -> list[dict]:
    """One row per layer, its last: a layer that several sweeps compressed has a row per
    sweep, and the last one describes the weight as it was saved."""
    return list({r["layer"]: r for r in rows}.values())


def split_name(layer: str) -> tuple[int, str] | None:
    """(block, projection) of a layer name: the block is the first number in it, the
    projection the rest with expert indices folded (model.layers.3.mlp.experts.5.down_proj
    -> (3, 'mlp.experts.*.down_proj')), so that a block's experts share one column."""
    m = re.search(r"\.(\d+)\.(.+)$", layer)
    if m is None:
        return None
    return int(m.group(1)), re.sub(r"(^|\.)\d+(?=\.)", r"\1*", m.group(2))


def per_block(rows: list[dict]) -> dict:
    """{block index: (sparsity weighted by layer size, mean relative output error)} of
    report rows."""
    acc: dict = {}
    for r in rows:
        where = split_name(r["layer"])
        if where is None or "sparsity" not in r:
            continue
        n = math.prod(r.get("shape") or [1])
        a = acc.setdefault(where[0], [0, 0.0, []])
        a[0] += n
        a[1] += r["sparsity"] * n
        if r.get("rel_error") is not None:
            a[2].append(r["rel_error"])
    return {b: (z / max(n, 1), sum(e) / len(e) if e else float("nan")) for b, (n, z, e) in sorted(acc.items())}


def error_grid(rows: list[dict]) -> tuple[list[int], list[str], list[list[float]]]:
    """(blocks, projections, grid[block][projection]): the mean relative output error of
    the layers in each cell (experts of one projection are averaged), NaN where a block
    has no such layer or no error was measured (no XᵀX collected)."""
    cells: dict = {}
    for r in final_rows(rows):
        where = split_name(r["layer"])
        if where is not None:
            cells.setdefault(where, []).append(r.get("rel_error"))
    blocks = sorted({b for b, _ in cells})
    projs = list(dict.fromkeys(p for _, p in cells))   # in the order the blocks hold them
    grid = [[float("nan")] * len(projs) for _ in blocks]
    for (b, p), errs in cells.items():
        errs = [e for e in errs if e is not None]
        if errs:
            grid[blocks.index(b)][projs.index(p)] = sum(errs) / len(errs)
    return blocks, projs, grid


def plot_layers(report: dict, path) -> None:
    """Relative output error per layer (heat map, block × projection) and the sparsity
    of each block beside it, on the same rows."""
    import numpy as np

    plt = _pyplot()
    rows = final_rows(report.get("layers") or [])
    blocks, projs, grid = error_grid(rows)
    sparsity = per_block(rows)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(3 + 0.9 * len(projs) + 2.5, 1.5 + 0.3 * len(blocks)), dpi=100,
                                  sharey=True, gridspec_kw={"width_ratios": [max(len(projs), 1), 2.5]})
    data = np.ma.masked_invalid(np.array(grid, dtype=float).reshape(len(blocks), len(projs)))
    im = ax.imshow(data, aspect="auto", cmap="magma_r", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02, label="‖(W−Ŵ)X‖² / ‖WX‖²")
    if len(blocks) * len(projs) <= 400:   # small enough to print each cell's number
        for (i, j), v in np.ndenumerate(data.filled(np.nan)):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=6,
                        color="white" if im.norm(v) > 0.5 else "black")
    ax.set_xticks(range(len(projs)), [p.replace(".", ".\n", 1) for p in projs], rotation=90, fontsize=7)
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
    title = "relative output error per layer" if data.count() else "no output error measured (no XᵀX collected)"
    title += " (experts: their mean)" if any("*" in p for p in projs) else ""
    ax.set(ylabel="block", title=title)
    ax2.barh(range(len(blocks)), [sparsity.get(b, (0.0,))[0] for b in blocks], color="C0")
    ax2.set(xlabel="sparsity", title="sparsity per block", xlim=(0, 1))
    ax2.grid(axis="x", alpha=0.3)
    _save(fig, path)


def plot_sparsity(report: dict, path) -> None:
    """Per block: the sparsity each pruning allocation asked for and the zeros it has,
    and the mean relative output error ||(W - W_hat) X|| / ||W X|| of its layers."""
    import matplotlib.ticker

    blocks = per_block(report.get("layers") or [])
    fig, (ax, ax2) = _pyplot().subplots(2, 1, figsize=(7, 5), dpi=100, sharex=True)
    ax.plot(list(blocks), [v[0] for v in blocks.values()], "o-", ms=3, label="zeros (all passes)")
    for key, entry in (report.get("allocation") or {}).items():
        alloc = [(int(re.search(r"(\d+)$", b).group(1)), v["sparsity"]) for b, v in entry["blocks"].items()]
        ax.plot(*zip(*alloc), "--", lw=1, label=f"{key}: {entry['method']}")
    ax.set(ylabel="sparsity", title="sparsity per block")
    ax.legend(fontsize=8)
    ax2.plot(list(blocks), [v[1] for v in blocks.values()], "o-", ms=3, color="C3")
    ax2.set(xlabel="block", ylabel="relative output error", title="mean relative output error of the block's layers")
    ax2.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for a in (ax, ax2):
        a.grid(alpha=0.3)
    _save(fig, path)


def eval_metrics(evaluation: dict) -> list[tuple[str, dict, dict]]:
    """[(name, {side: value}, {side: standard error})] of report["eval"]: perplexity,
    KL and top-1 against the dense model (the compressed side only: dense against
    itself is 0 and 1), then every task metric with the standard error lm-eval gave."""
    out = []
    for key, name in (("ppl", "perplexity"), ("kl", "KL to dense"), ("top1", "top-1 agreement")):
        vals = {s: ev[key] for s, ev in evaluation.items() if isinstance(ev, dict) and is_number(ev.get(key))}
        if vals:
            out.append((name, vals, {}))
    tasks = {s: ev.get("tasks") or {} for s, ev in evaluation.items() if isinstance(ev, dict)}
    for task, m in task_metrics(tasks):
        vals = {s: t[task][m] for s, t in tasks.items() if is_number((t.get(task) or {}).get(m))}
        errs = {s: t[task][f"{m}_stderr"] for s, t in tasks.items()
                if is_number((t.get(task) or {}).get(f"{m}_stderr"))}
        out.append((f"{task}/{m}", vals, errs))
    return out


def plot_eval(report: dict, path) -> None:
    """Dense against compressed, one small panel per metric (their scales differ: a
    perplexity in the hundreds beside an accuracy in [0, 1]), stderr as error bars."""
    metrics = eval_metrics(report.get("eval") or {})
    cols = min(len(metrics), 4) or 1
    nrows = max(math.ceil(len(metrics) / cols), 1)
    fig, axes = _pyplot().subplots(nrows, cols, figsize=(2.6 * cols, 2.6 * nrows), dpi=100, squeeze=False)
    for ax, (name, vals, errs) in zip(axes.flat, metrics):
        sides = [s for s in ("dense", "compressed") if s in vals]
        heights = [vals[s] if math.isfinite(vals[s]) else float("nan") for s in sides]
        yerr = [errs.get(s, 0.0) for s in sides] if errs else None
        bars = ax.bar(sides, heights, yerr=yerr, capsize=4, color=["C0" if s == "dense" else "C3" for s in sides])
        ax.bar_label(bars, labels=[f"{vals[s]:.4g}" for s in sides], fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    if not metrics:
        axes.flat[0].set_title("no evaluation in this report")
    _save(fig, path)
