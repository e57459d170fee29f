"""The run engine of ``imsm-bench``: every (method, seed) trained and scored, then mean ± std over the seeds.

:func:`run` is the loop every protocol shares: it scores the base model once, trains each trainable method for each
seed (:func:`~.runner.finetune`, in ``--jobs`` forked workers through :func:`~.parallel.map_runs`), derives the
post-hoc variants of a trained LoRA (weight interpolation, intruder reduction, the retrofit), scores each with the
protocol's ``score(model, eval_sets)`` (an :class:`Evaluation`), and summarises the per-seed figures into the rows
of ``results.json`` (:func:`summarize`: mean, std, n). What the protocols add (data, scoring, title, settings) is in
:mod:`.default`, :mod:`.custom` and :mod:`.real`.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, TypedDict

from .parallel import map_runs
from .runner import FinetuneSettings, Method, finetune, retrofit_lora


class Evaluation(TypedDict, total=False):
    """What a benchmark's ``score(model, eval_sets)`` returns."""

    scores: dict[str, float]  # set -> primary score (the table's cell)
    metrics: dict[str, dict[str, float]]  # set -> every metric of the set (e.g. ROPES exact match AND token F1)
    gates: dict[str, list[float]]  # set -> mean gate value of each scored prompt (IMSM only)


def run(
    base: Any,
    tokenizer: Any,
    methods: list[Method],
    train: list[tuple[list[int], list[int]]],
    eval_sets: dict[str, Any],
    score: Callable[[Any, dict[str, Any]], Evaluation],
    target: str,
    settings: FinetuneSettings,
    seeds: int,
    progress: bool,
    retention_tasks: list[str] | None = None,
    first_seed: int = 0,
    jobs: int = 1,
) -> dict[str, Any]:
    """Train every method for every seed, score every eval set, and aggregate (mean ± std over seeds).

    ``train``: encoded ``(input_ids, labels)`` examples. ``score(model, eval_sets)`` returns an :class:`Evaluation`:
    the primary score per set, every metric per set, and (IMSM) the mean gate of every scored prompt, read during
    the scoring itself. ``retention_tasks``: the sets averaged into "retention" (default: every set but the target).
    ``jobs``: (method, seed) runs trained and scored at once, in forked one-thread workers (:mod:`.parallel`).
    """
    others = retention_tasks if retention_tasks is not None else [name for name in eval_sets if name != target]
    per_seed: dict[str, list[dict[str, Any]]] = {m.name: [] for m in methods}
    t0 = time.perf_counter()
    base_eval = score(base, eval_sets)

    def entry_of(evaluation: Evaluation) -> dict[str, Any]:
        entry: dict[str, Any] = {"scores": evaluation["scores"], "metrics": evaluation["metrics"]}
        gates = evaluation.get("gates") or {}
        target_gates = gates.get(target) or []
        other_gates = [g for name in eval_sets if name != target for g in gates.get(name) or []]
        entry["gate_target"] = statistics.fmean(target_gates) if target_gates else None
        entry["gate_others"] = statistics.fmean(other_gates) if other_gates else None
        return entry

    def train_and_score(seed: int, method: Method) -> list[tuple[str, dict[str, Any]]]:
        """One trained method (and the variants derived from it) for one seed: ``[(row name, per-seed entry)]``."""
        model, log = finetune(copy.deepcopy(base), tokenizer, method, train, settings, seed, progress and jobs <= 1)
        entry = entry_of(score(model, eval_sets))
        entry.update(train_seconds=log["seconds"], final_loss=log["loss"][-1])
        if log["anchor_kl"]:
            entry["final_anchor_kl"] = log["anchor_kl"][-1]
        out = [(method.name, entry)]
        for derived in methods:
            if derived.derive_from == method.name and derived.extra.get("retrofit"):
                variant, rlog = retrofit_lora(copy.deepcopy(model), tokenizer, train, settings, seed, derived)
                out.append((derived.name, {**entry_of(score(variant, eval_sets)), "train_seconds": rlog.seconds_total,
                                           "lora_train_seconds": log["seconds"]}))  # fmt: skip
            elif derived.derive_from == method.name:
                variant = derived.derive(copy.deepcopy(model))
                out.append((derived.name, entry_of(score(variant, eval_sets))))
        if progress:
            done = {k: round(v, 1) for k, v in entry["scores"].items()}
            print(f"  [{time.perf_counter() - t0:6.0f}s] seed {seed} {method.name}: {done}", file=sys.stderr)
        return out

    seed_range = range(first_seed, first_seed + seeds)
    runs = [(seed, method) for seed in seed_range for method in methods if method.kind not in ("base", "derived")]
    for entries in map_runs(train_and_score, runs, jobs):
        for name, entry in entries:
            per_seed[name].append(entry)
    for method in methods:
        if method.kind == "base":
            per_seed[method.name] = [entry_of(base_eval) for _ in seed_range]
    methods_out: dict[str, Any] = {}
    for method in methods:
        runs = per_seed[method.name]
        if not runs:
            continue
        row: dict[str, Any] = {"kind": method.kind, "group": method.group, "anchor_weight": method.anchor_weight,
                               "gate_mode": method.gate_mode if method.kind == "imsm" else None}  # fmt: skip
        if method.extra.get("anchor_texts"):
            row["anchor_data"] = method.extra.get("anchor_texts_are") or f"{len(method.extra['anchor_texts'])} texts"
        row["scores"] = {name: summarize([r["scores"][name] for r in runs]) for name in eval_sets}
        row["metrics"] = {
            name: {
                metric: summarize([r["metrics"][name][metric] for r in runs]) for metric in runs[0]["metrics"][name]
            }
            for name in eval_sets
        }
        row["retention"] = summarize([sum(r["scores"][n] for n in others) / max(1, len(others)) for r in runs])
        row["all"] = summarize([sum(r["scores"].values()) / len(eval_sets) for r in runs])
        for key in (
            "gate_target",
            "gate_others",
            "train_seconds",
            "lora_train_seconds",
            "final_loss",
            "final_anchor_kl",
        ):
            values = [r[key] for r in runs if r.get(key) is not None]
            row[key] = summarize(values) if values else None
        row["per_seed"] = runs
        methods_out[method.name] = row
    return {"target": target, "retention_tasks": others, "methods": methods_out, "seconds": time.perf_counter() - t0}


def summarize(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value) and count of per-seed figures."""
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": spread, "n": len(values)}
