"""The custom-data protocol (``--model`` with ``--train`` / ``--eval``): your model, your JSONL sets, the paper's metrics.

Rows are ``{"input", "output"}`` JSON Lines (:mod:`.data`); ``--train-size`` / ``--eval-size`` take seeded samples.
Prompts go through the tokenizer's chat template where it has one (:func:`~.loading.use_chat_template`); each eval
set is scored on greedy answers (:func:`~.pretrain.generate_answers`) with the metrics named after its set
(:data:`~.metrics.METRICS_BY_SET`) or given by ``--metric``; the first metric is the table's cell. The target is
``--target`` (default: the first ``--eval``); retention is the mean over the other sets.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from .batching import encode_examples, format_prompt
from .data import load_jsonl, parse_eval_arg, sample_rows
from .engine import Evaluation, run
from .loading import load_model, use_chat_template
from .metrics import METRICS_BY_SET, compute_metrics, get_metric
from .options import anchor_weights, select, settings_from
from .pretrain import generate_answers
from .runner import default_methods


def run_custom(args: argparse.Namespace) -> dict[str, Any]:
    """``imsm-bench --model M --train T --eval NAME=E ...``: see the module docstring."""
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
