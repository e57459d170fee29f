"""Pick each anchored method's anchor weight on a validation run of ``imsm-bench``, by a rule fixed in advance.

Rule, per method family (the row names without their ``(w=...)``): among the weights whose mean target score is
within ``--target-margin`` points (default 2) of plain LoRA's, the weight with the highest mean retention; if no
weight keeps the target, the weight with the highest target score (said so). Ties go to the smaller weight.

    imsm-bench --eval-split validation --anchor-weights 1,3,10,30 --out val \\
        --methods "LoRA,LoRA + anchor KL (w=1),...,LoRA + retrofit [gate] (w=30)"
    python benchmarks/select_anchor_weight.py val/results.json

Then run the test split with the picked weights only (the validation sets are draws of the train split that no
training example is; see ``imsm-bench --help``, ``--eval-split``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys

_WEIGHTED = re.compile(r"^(?P<family>.+) \(w=(?P<weight>[0-9.eE+-]+)\)$")


def pick(results: dict, margin: float) -> dict[str, dict]:
    """``{family: {"weight", "target", "retention", "kept_target"}}`` for every family with a weight in ``results``."""
    methods, target = results["methods"], results["target"]
    if "LoRA" not in methods:
        raise SystemExit(
            "error: the results hold no 'LoRA' row, the reference of the target margin; add it to --methods."
        )
    floor = methods["LoRA"]["scores"][target]["mean"] - margin
    families: dict[str, list[tuple[float, float, float]]] = {}
    for name, row in methods.items():
        match = _WEIGHTED.match(name)
        if match:
            families.setdefault(match["family"], []).append(
                (float(match["weight"]), row["scores"][target]["mean"], row["retention"]["mean"])
            )
    picked = {}
    for family, rows in families.items():
        rows.sort()
        kept = [r for r in rows if r[1] >= floor]
        if kept:
            weight, score, retention = max(kept, key=lambda r: (r[2], -r[0]))
        else:
            weight, score, retention = max(rows, key=lambda r: (r[1], -r[0]))
        picked[family] = {"weight": weight, "target": score, "retention": retention, "kept_target": bool(kept)}
    return picked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="results.json of an imsm-bench run with --eval-split validation")
    parser.add_argument("--target-margin", type=float, default=2.0)
    args = parser.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    split = results.get("settings", {}).get("eval_split")
    if split != "validation":
        print(f"warning: these results were scored on the {split or 'unknown'} split, not on --eval-split "
              "validation: a weight picked on the test sets overstates the test figures.", file=sys.stderr)  # fmt: skip
    lora = results["methods"].get("LoRA", {}).get("scores", {}).get(results["target"], {}).get("mean")
    print(f"LoRA target {lora:.1f}; rule: highest retention with target >= {lora - args.target_margin:.1f}")
    for family, p in pick(results, args.target_margin).items():
        why = "" if p["kept_target"] else "  (no weight kept the target: highest target)"
        print(f"{family}: w={p['weight']:g}  target {p['target']:.1f}  retention {p['retention']:.1f}{why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
