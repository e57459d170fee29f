"""Merge the seeds of split ``imsm-bench --protocol real`` runs into one table (mean ± std over all seeds).

For seeds run in separate processes: seeds from the stderr log of a run (its per-method lines
``[  Ns] seed K METHOD: {scores}``, e.g. of a run stopped after seed 1) and seeds from another run's
``results.json`` (e.g. ``--seeds 1 --first-seed 2``). The per-(method, seed) runs are independent, so the merged
scores equal those of one run over all the seeds (a log gives the scores only, no gates or timings).

    python benchmarks/real_model_merge.py --log full.log --log-seeds 0,1 --json full_s2/results.json --out merged/
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import statistics

from peft_imsm.bench import report
from peft_imsm.bench.runner import summarize

LINE = re.compile(r"\[\s*\d+s\] seed (\d+) (.+?): (\{[^}]*\})")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--log", required=True)
    p.add_argument("--log-seeds", default="0,1")
    p.add_argument("--json", required=True)
    p.add_argument("--out", required=True, help="folder for the merged results.json and results.png")
    a = p.parse_args()
    wanted = {int(s) for s in a.log_seeds.split(",")}
    scores: dict[str, list[tuple[int, dict[str, float]]]] = {}
    for seed, method, cell in LINE.findall(open(a.log).read()):
        if int(seed) in wanted:
            scores.setdefault(method, []).append((int(seed), ast.literal_eval(cell)))
    done = json.load(open(a.json))
    retention = done["retention_tasks"]
    sets = [done["target"], *retention]
    merged = {k: v for k, v in done.items() if k != "methods"}
    merged["methods"] = {}
    merged["merged_from"] = {"log": a.log, "log_seeds": sorted(wanted), "json": a.json}
    for name, row in done["methods"].items():
        if row["kind"] == "base":
            runs = [{"scores": row["per_seed"][0]["scores"]} for _ in wanted]
        else:
            runs = [{"scores": cell, "seed": seed} for seed, cell in scores.get(name, [])]
        runs += row["per_seed"]
        out = {k: row[k] for k in ("kind", "group", "anchor_weight", "gate_mode")}
        out["scores"] = {t: summarize([r["scores"][t] for r in runs]) for t in sets}
        out["retention"] = summarize([statistics.fmean(r["scores"][t] for t in retention) for r in runs])
        out["all"] = summarize([statistics.fmean(r["scores"][t] for t in sets) for r in runs])
        out["gate_target"], out["gate_others"] = row.get("gate_target"), row.get("gate_others")  # last json only
        out["per_seed"] = runs
        merged["methods"][name] = out
    os.makedirs(a.out, exist_ok=True)
    report.write_json(merged, a.out)
    report.plot(merged, a.out)
    print(report.table(merged))


if __name__ == "__main__":
    main()
