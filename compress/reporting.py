"""What goes beside every output folder: the resolved recipe, a machine-readable
report.json, and the pictures a person would rather look at than read (the training
loss curve of each model-level stage, as a PNG).
"""
from __future__ import annotations

import json
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
