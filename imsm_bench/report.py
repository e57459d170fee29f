"""Tables, results.json and the target-versus-retention plot of ``imsm-bench``."""

from __future__ import annotations

import json
import os
from typing import Any

from peft_imsm.extras import require


def fmt(cell: dict[str, float] | None) -> str:
    if cell is None:
        return "-"
    if cell.get("n", 1) > 1:
        return f"{cell['mean']:.1f}±{cell['std']:.1f}"
    return f"{cell['mean']:.1f}"


def table(results: dict[str, Any]) -> str:
    """A markdown table shaped like the paper's forgetting table: target, each retained task, averages, gates."""
    target = results["target"]
    others = results["retention_tasks"]
    head = ["method", f"{target} (target)", *others, "retention avg", "all avg", "gate target", "gate others"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in results["methods"].items():
        cells = [name, fmt(row["scores"].get(target))]
        cells += [fmt(row["scores"].get(task)) for task in others]
        cells += [fmt(row.get("retention")), fmt(row.get("all"))]
        cells += [_gate(row.get("gate_target")), _gate(row.get("gate_others"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _gate(cell: dict[str, float] | None) -> str:
    return "-" if cell is None else f"{cell['mean']:.2f}"


def write_json(results: dict[str, Any], out_dir: str) -> str:
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=str)
    return path


def require_plotting() -> Any:
    """The matplotlib module, for ``results.png``; an ImportError that names the ``plot`` extra if it is missing."""
    return require("matplotlib", "imsm-bench (its figure, results.png)")


def plot(results: dict[str, Any], out_dir: str) -> str:
    """``results.png``: target score (y) against retention (x) per method, the anchor-weight sweep as a curve.
    Needs matplotlib (the ``plot`` extra; :func:`require_plotting` checks it before a run)."""
    matplotlib = require_plotting()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 6))
    sweep = []
    markers = {"reference": "s", "paper": "o", "baseline": "^", "anchor": "D", "anchor-sweep": "D"}
    colors = plt.get_cmap("tab20")
    for i, (name, row) in enumerate(results["methods"].items()):
        x, y = row["retention"], row["scores"][results["target"]]
        group = row.get("group", "")
        ax.errorbar(x["mean"], y["mean"], xerr=x["std"], yerr=y["std"], fmt=markers.get(group, "o"), capsize=3,
                    color=colors(i % 20), label=name)  # fmt: skip
        if group == "anchor-sweep":
            sweep.append((row.get("anchor_weight"), x["mean"], y["mean"]))
    if len(sweep) > 1:
        sweep.sort()
        ax.plot([s[1] for s in sweep], [s[2] for s in sweep], "--", color="gray", lw=1, label="anchor_weight sweep")
        for w, x, y in sweep:
            ax.annotate(f"w={w:g}", (x, y), textcoords="offset points", xytext=(5, -10), fontsize=8)
    ax.set_xlabel("retention: mean score on the other tasks (%)")
    ax.set_ylabel(f"target task score: {results['target']} (%)")
    ax.set_title(results.get("title", "imsm-bench"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = os.path.join(out_dir, "results.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
