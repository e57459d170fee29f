"""``imsm-bench``: does IMSM learn the target task like LoRA and forget less? Measure it.

With no arguments: the offline default (the project's own skills LM, a target task outside its skills, LoRA vs IMSM
vs ablations vs baselines). With ``--model``/``--train``/``--eval``: your model and your JSONL sets.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, TypedDict

import torch

from . import report
from .batching import encode_examples, format_prompt, has_chat_template
from .parallel import default_jobs, map_runs
from .runner import (
    ADAPTERS,
    FinetuneSettings,
    Method,
    default_methods,
    finetune,
    retrofit_lora,
    summarize,
)


class Evaluation(TypedDict, total=False):
    """What a benchmark's ``score(model, eval_sets)`` returns."""

    scores: dict[str, float]  # set -> primary score (the table's cell)
    metrics: dict[str, dict[str, float]]  # set -> every metric of the set (e.g. ROPES exact match AND token F1)
    gates: dict[str, list[float]]  # set -> mean gate value of each scored prompt (IMSM only)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="imsm-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="imsm-bench-results", help="output folder (must not hold results already)")
    p.add_argument("--overwrite", action="store_true", help="replace the results in an existing --out folder")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (results are mean ± std)")
    p.add_argument(
        "--first-seed", type=int, default=0,
        help="run seeds first-seed .. first-seed + seeds - 1 (e.g. to split the seeds of one run over processes)",
    )  # fmt: skip
    p.add_argument(
        "--anchor-weights", default=None,
        help="anchor weights: one row of each anchored method (LoRA + anchor KL, IMSM + self anchors [gate], [gate+adapter]) per weight (default 1)",
    )  # fmt: skip
    p.add_argument("--methods", default=None, help="comma-separated subset of method names to run")
    p.add_argument(
        "--jobs", type=int, default=None,
        help="(method, seed) runs trained at once, each in its own one-thread process; the figures do not depend on "
        "it (default: one per CPU core, at most 4, for the default run and --protocol real; 1 with a GPU or for "
        "--model with your own --train/--eval sets)",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    t = p.add_argument_group("fine-tuning (every method gets the same; defaults depend on the run)")
    t.add_argument("--adapter", choices=ADAPTERS, default="lora")
    t.add_argument("--steps", type=int, default=None, help="fine-tuning steps per method")
    t.add_argument("--lr", type=float, default=None, help="AdamW learning rate (10 warmup steps, cosine decay)")
    t.add_argument("--batch-size", type=int, default=None, help="training examples per step")
    t.add_argument("--rank", type=int, default=None, help="adapter rank r (LoRA/DoRA; AdaLoRA's init_r)")
    t.add_argument("--alpha", type=float, default=None, help="LoRA alpha (scaling alpha / r)")
    t.add_argument("--dropout", type=float, default=None, help="LoRA dropout")
    t.add_argument(
        "--target-modules", default=None, help="comma-separated module names (e.g. q_proj,v_proj) or all-linear"
    )
    t.add_argument("--anchor-batch-size", type=int, default=None, help="anchors per anchored step")
    t.add_argument(
        "--anchor-every", type=int, default=None,
        help="the anchor term (anchored IMSM's and LoRA + anchor KL's) on every k-th step only, weighted k x there "
        "(AnchorConfig.every; default 1)",
    )  # fmt: skip
    g = p.add_argument_group("default run (offline skills LM)")
    g.add_argument("--train-examples", type=int, default=2000)
    g.add_argument("--eval-examples", type=int, default=100, help="test examples per task")
    g.add_argument(
        "--eval-split", choices=["test", "validation"], default="test",
        help="score the held-out test split (default), or a validation set for choosing settings such as the "
        "anchor weight: fresh draws from the train split, none of them a training example of the run",
    )  # fmt: skip
    g.add_argument(
        "--rebuild", action="store_true",
        help="pretrain the skills LM on this machine (one thread) instead of using the copy shipped with the "
        "package: to check that this machine rebuilds the shipped weights, or after changing the skills world; float "
        "kernels differ between CPUs, so another CPU may build another model",
    )  # fmt: skip
    g.add_argument(
        "--pretrain-steps", type=int, default=None,
        help="pretrain a skills LM with this many steps (built and cached, not the shipped model)",
    )  # fmt: skip
    g.add_argument(
        "--cache-dir", default=None, help="cache of the skills LM and of converted GGUF models (~/.cache/peft_imsm)"
    )
    c = p.add_argument_group("your model and data")
    c.add_argument(
        "--model",
        default=None,
        help="local HF folder, hub id, or a GGUF file (or a folder holding one): converted once",
    )
    c.add_argument(
        "--protocol", choices=["custom", "real"], default="custom",
        help="custom: your --train/--eval JSONL files; real: the built-in real-model forgetting protocol "
        "(docs/real-model-protocol.md; no data files needed)",
    )  # fmt: skip
    c.add_argument("--train", default=None, help="training JSONL ({'input', 'output'} per line)")
    c.add_argument("--eval", action="append", default=[], metavar="NAME=PATH", help="evaluation JSONL (repeatable)")
    c.add_argument("--target", default=None, help="which --eval set is the target task (default: the first)")
    c.add_argument("--metric", action="append", default=None, help="metric(s) for every --eval set (override)")
    c.add_argument("--train-size", type=int, default=None, help="train on a seeded random sample of N training rows")
    c.add_argument("--eval-size", type=int, default=None, help="score a seeded random sample of N rows of each --eval")
    c.add_argument("--data-seed", type=int, default=0, help="seed of the --train-size / --eval-size samples")
    c.add_argument("--limit", type=int, default=None, help="deprecated: same as --eval-size (evaluation only)")
    c.add_argument(
        "--no-chat-template", action="store_true",
        help="give instruct models raw prompts (default: the tokenizer's chat template, where it has one)",
    )  # fmt: skip
    c.add_argument(
        "--general-data", default=None, metavar="DIR",
        help="--protocol real: the paper's sets (<DIR>/<set>/test.jsonl); their short general inputs join the "
        "retention prompts (default $IMSM_BENCHMARKS_DIR; without: the built-in chat prompts only)",
    )  # fmt: skip
    c.add_argument(
        "--anchor-start", choices=["chat", "bos"], default="chat",
        help="--protocol real: self anchors start from the chat template's user-turn prefix (chat) or the BOS token",
    )  # fmt: skip
    c.add_argument(
        "--max-new-tokens", type=int, default=None,
        help="generated tokens per answer (custom: default 32; real: length of the base answers, default 24)",
    )  # fmt: skip
    c.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    if args.limit is not None:
        print("imsm-bench: --limit is deprecated; it now means --eval-size (evaluation only).", file=sys.stderr)
        if args.eval_size is None:
            args.eval_size = args.limit
    return args


def prepare_out_dir(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise SystemExit(f"error: --out {path!r} is a file; give a folder.")
    existing = [n for n in ("results.json", "results.png") if os.path.exists(os.path.join(path, n))]
    if existing and not overwrite:
        raise SystemExit(
            f"error: {path!r} already holds results ({', '.join(existing)}); nothing was overwritten. Pass another "
            "--out folder, or --overwrite to replace them."
        )
    os.makedirs(path, exist_ok=True)


def settings_from(args: argparse.Namespace, **defaults: Any) -> FinetuneSettings:
    """The run's defaults, overridden by every fine-tuning option given on the command line."""
    settings = FinetuneSettings(adapter=args.adapter, **defaults)
    options = {"steps": "steps", "lr": "lr", "batch_size": "batch_size", "rank": "r", "alpha": "lora_alpha",
               "dropout": "lora_dropout", "anchor_batch_size": "anchor_batch_size",
               "anchor_every": "anchor_every"}  # fmt: skip
    for option, field_name in options.items():
        value = getattr(args, option, None)
        if value is not None:
            setattr(settings, field_name, value)
    modules = getattr(args, "target_modules", None)
    if modules:
        names = [m.strip() for m in modules.split(",") if m.strip()]
        settings.target_modules = "all-linear" if names == ["all-linear"] else names
    for name in ("steps", "batch_size", "r", "anchor_batch_size", "anchor_every"):
        if getattr(settings, name) < 1:
            raise SystemExit(f"error: {name} must be >= 1, got {getattr(settings, name)}.")
    return settings


def select(methods: list[Method], names: str | None) -> list[Method]:
    if not names:
        return methods
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {m.name: m for m in methods}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {unknown}; known: {list(known)}")
    chosen = [known[n] for n in wanted]
    for m in list(chosen):
        if m.derive_from and m.derive_from not in wanted:
            chosen.insert(0, known[m.derive_from])
    if "base model" not in wanted:
        chosen.insert(0, known["base model"])
    return list({m.name: m for m in chosen}.values())


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


def run_default(args: argparse.Namespace) -> dict[str, Any]:
    from .pretrain import DEFAULT_RECIPE, evaluate_tasks, float_kernels, load_or_build_skills_model
    from .skills import EVAL_TASKS, TARGET_TASK, make_examples, validation_sets

    progress = not args.no_progress
    recipe = DEFAULT_RECIPE
    if args.pretrain_steps is not None:
        from dataclasses import replace

        recipe = replace(DEFAULT_RECIPE, steps=args.pretrain_steps)
    torch.manual_seed(0)
    base, tokenizer = load_or_build_skills_model(
        args.cache_dir, progress=progress, recipe=recipe, rebuild=args.rebuild
    )
    train_rows = make_examples(TARGET_TASK, args.train_examples, seed=0, split="train")
    if args.eval_split == "test":
        eval_sets = {task: make_examples(task, args.eval_examples, seed=1, split="test") for task in EVAL_TASKS}
    else:
        eval_sets = validation_sets(args.eval_examples, train_rows)
    methods = select(default_methods(anchor_weights(args, "1")), args.methods)
    # LoRA r=8 on the attention's q/v projections: plain LoRA learns the target and forgets part of the skills
    # mixture, the regime where the methods differ (docs/benchmarks.md).
    settings = settings_from(args, target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16, lr=2e-3, steps=200)

    def score(model: Any, sets: dict[str, list[dict]]) -> Evaluation:
        gates: dict[str, list[float]] = {}
        scores = evaluate_tasks(model, tokenizer, sets, gates=gates)
        return {"scores": scores, "metrics": {k: {"exact_match": v} for k, v in scores.items()}, "gates": gates}

    train = encode_examples(tokenizer, train_rows, settings.max_length)
    results = run(base, tokenizer, methods, train, eval_sets, score, TARGET_TASK, settings, args.seeds, progress,
                  first_seed=args.first_seed, jobs=args.jobs)  # fmt: skip
    results["title"] = f"imsm-bench default: skills LM fine-tuned on '{TARGET_TASK}' ({args.adapter})"
    results["metric"] = "exact match (%)"
    results["settings"] = {**vars(args), "finetune": vars(settings), "pretrain_recipe": vars(recipe),
                           "float_kernels": float_kernels()}  # fmt: skip
    return results


def run_custom(args: argparse.Namespace) -> dict[str, Any]:
    from .data import load_jsonl, parse_eval_arg, sample_rows
    from .metrics import METRICS_BY_SET, compute_metrics, get_metric
    from .pretrain import generate_answers

    if not args.train or not args.eval:
        raise SystemExit("error: with --model, pass --train FILE.jsonl and at least one --eval NAME=FILE.jsonl.")
    try:
        train_rows = sample_rows(load_jsonl(args.train), args.train_size, args.data_seed)
        eval_specs = [parse_eval_arg(e) for e in args.eval]
        eval_sets = {name: sample_rows(load_jsonl(path), args.eval_size, args.data_seed) for name, path in eval_specs}
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None
    metric_names: dict[str, list[str]] = {}
    for name in eval_sets:
        names = args.metric or METRICS_BY_SET.get(name.lower())
        if not names:
            raise SystemExit(
                f"error: no metric known for the eval set {name!r}; name it after a paper set "
                f"({', '.join(METRICS_BY_SET)}) or pass --metric (e.g. --metric exact_match)."
            )
        for metric in names:
            try:
                get_metric(metric)
            except ValueError as exc:
                raise SystemExit(f"error: {exc}") from None
        metric_names[name] = list(names)
    target = args.target or next(iter(eval_sets))
    if target not in eval_sets:
        raise SystemExit(f"error: --target {target!r} is not one of the --eval names {list(eval_sets)}.")
    base, tokenizer = load_model(args)
    chat = use_chat_template(args, tokenizer)
    progress = not args.no_progress
    all_methods = default_methods(anchor_weights(args, "1"))
    default_names = "base model,LoRA,IMSM,LoRA + anchor KL (w=1),IMSM + self anchors [gate+adapter] (w=1)"
    methods = select(all_methods, args.methods or default_names)
    settings = settings_from(args, steps=200, batch_size=8, lr=3e-4, r=16, lora_alpha=16, lora_dropout=0.1,
                             max_length=512, anchor_length=64)  # fmt: skip
    prompts = {name: [format_prompt(tokenizer, r["input"], chat) for r in rows] for name, rows in eval_sets.items()}

    def score(model: Any, sets: dict[str, list[dict]]) -> Evaluation:
        out: Evaluation = {"scores": {}, "metrics": {}, "gates": {}}
        for name, rows in sets.items():
            desc = None if args.no_progress else f"eval {name}"
            gates: list[float] = []
            preds = generate_answers(model, tokenizer, prompts[name], 16, args.max_new_tokens or 32, desc,
                                     add_special_tokens=not chat, gates=gates)  # fmt: skip
            figures = compute_metrics(metric_names[name], preds, [r["output"] for r in rows])
            out["metrics"][name] = figures
            out["scores"][name] = figures[metric_names[name][0]]
            out["gates"][name] = gates
        return out

    train = encode_examples(tokenizer, train_rows, settings.max_length, chat=chat)
    results = run(base, tokenizer, methods, train, eval_sets, score, target, settings, args.seeds, progress,
                  first_seed=args.first_seed, jobs=args.jobs)  # fmt: skip
    results["title"] = f"imsm-bench: {args.model} fine-tuned on {os.path.basename(args.train)} ({args.adapter})"
    results["metric"] = {name: names[0] for name, names in metric_names.items()}
    results["settings"] = {**vars(args), "chat_template": chat, "train_rows": len(train_rows),
                           "eval_rows": {k: len(v) for k, v in eval_sets.items()}, "finetune": vars(settings)}  # fmt: skip
    return results


def anchor_weights(args: argparse.Namespace, default: str) -> tuple[float, ...]:
    """``--anchor-weights`` (or ``default``) as floats, with a clear error for a bad value."""
    text = args.anchor_weights or default
    try:
        weights = tuple(float(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise SystemExit(f"error: --anchor-weights expects comma-separated numbers, got {text!r}.") from None
    if not weights or min(weights) < 0:
        raise SystemExit(f"error: --anchor-weights needs numbers >= 0, got {text!r}.")
    return weights


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """``--model`` as a model + tokenizer; a GGUF file is converted once (cached under ``--cache-dir``)."""
    from .gguf import resolve_model_path
    from .runner import load_causal_lm

    try:
        path = resolve_model_path(args.model, cache_root=args.cache_dir, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None
    return load_causal_lm(path, dtype=args.dtype)


def use_chat_template(args: argparse.Namespace, tokenizer: Any) -> bool:
    """Chat-template prompts unless ``--no-chat-template`` or the tokenizer has none (said on stderr either way)."""
    chat = has_chat_template(tokenizer) and not args.no_chat_template
    if not args.no_progress:
        why = "--no-chat-template" if args.no_chat_template else "the tokenizer has none"
        print(f"imsm-bench: prompts {'use the chat template' if chat else f'are raw ({why})'}", file=sys.stderr)
    return chat


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        raise SystemExit(f"error: --jobs must be >= 1 (got {args.jobs}).")
    prepare_out_dir(args.out, args.overwrite)
    if args.seeds < 1:
        raise SystemExit("error: --seeds must be >= 1.")
    start = time.perf_counter()
    custom = args.model and args.protocol != "real"
    if args.jobs is None:
        args.jobs = 1 if custom else default_jobs()
    if custom:
        results = run_custom(args)
    else:
        # The default run and the real-model protocol train and score on ONE thread per run (--jobs runs several at
        # once): float sums depend on the thread count, so this makes their figures the same on every machine and
        # for every --jobs, and another busy process cannot slow two OpenMP threads that wait on each other several-fold.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if args.protocol == "real":
                if not args.model:
                    raise SystemExit("error: --protocol real needs --model (an HF folder, hub id or GGUF file).")
                from .real import run_real

                results = run_real(args)
            else:
                results = run_default(args)
        finally:
            torch.set_num_threads(threads)
    results["wall_seconds"] = time.perf_counter() - start
    text = report.table(results)
    print(f"\n{results['title']}  ({args.seeds} seed(s), metric: {results['metric']})\n")
    print(text)
    for name, row in results["methods"].items():
        if row.get("lora_train_seconds") and row.get("train_seconds"):
            retro, lora = row["train_seconds"]["mean"], row["lora_train_seconds"]["mean"]
            print(f"\n{name}: retrofit {retro:.2f} s vs the LoRA's training {lora:.2f} s ({retro / lora:.2f}x)")
    json_path = report.write_json(results, args.out)
    png_path = report.plot(results, args.out)
    print(f"\nwrote {json_path} and {png_path} in {results['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
