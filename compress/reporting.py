"""What goes beside every output folder: the resolved recipe, a machine-readable
report.json, and the pictures a person would rather look at than read (the training
loss curve of each model-level stage, and each block's sparsity and output error, as
PNGs).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import yaml


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_extras(folder: Path, recipe: Optional[dict], report: Optional[dict]) -> None:
    """recipe.yaml, report.json and the training loss curves beside the weights."""
    if recipe is not None:
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    if report is not None:
        write_json(folder / "report.json", report)
        for name, entry in (report.get("training") or {}).items():
            plot_loss(entry["loss_curve"], folder / f"{name}_loss.png", f"{name}: training loss")
        if any(r.get("sparsity", 0) > 0.01 for r in report.get("layers") or []):
            plot_sparsity(report, folder / "sparsity.png")


def plot_loss(curve: list[float], path, title: str) -> None:
    """The loss per optimizer step as a PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(range(1, len(curve) + 1), curve, lw=1.2)
    ax.set(xlabel="optimizer step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def per_block(rows: list[dict]) -> dict:
    """{block index: (sparsity weighted by layer size, mean relative output error)} of
    report rows (a row's block is the first number in its layer name)."""
    acc: dict = {}
    for r in rows:
        m = re.search(r"\.(\d+)\.", r["layer"])
        if m is None or "sparsity" not in r:
            continue
        n = 1
        for d in r.get("shape") or [1]:
            n *= d
        a = acc.setdefault(int(m.group(1)), [0, 0.0, []])
        a[0] += n
        a[1] += r["sparsity"] * n
        if r.get("rel_error") is not None:
            a[2].append(r["rel_error"])
    return {b: (z / max(n, 1), sum(e) / len(e) if e else float("nan")) for b, (n, z, e) in sorted(acc.items())}


def plot_sparsity(report: dict, path) -> None:
    """Per block: the sparsity each pruning allocation asked for and the zeros it has,
    and the mean relative output error ||(W - W_hat) X|| / ||W X|| of its layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    blocks = per_block(report.get("layers") or [])
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 5), dpi=100, sharex=True)
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
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
