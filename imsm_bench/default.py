"""The default protocol (``imsm-bench`` with no ``--model``): the shipped skills LM, fine-tuned on a task it lacks.

The base model is the project's skills LM (:mod:`.pretrain`, pretrained on the mixture of :mod:`.skills`); every
method fine-tunes it on the target task ``ends`` (LoRA r=8 on q/v, 200 steps); the score of a set is the exact match
of greedy answers (:func:`~.pretrain.evaluate_tasks`), and the gates are read during that generation. Retention is
the mean over the mixture's tasks. The route gate runs with self anchors and, as the skills LM samples nothing like
its prompts, with data anchors too: prompts of the mixture tasks (:func:`~.skills.general_prompts`).
``--eval-split validation`` scores fresh draws of the train split instead of the test sets (for choosing settings
such as the anchor weight).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

import torch

from .batching import encode_examples
from .engine import Evaluation, run
from .options import anchor_weights, select, settings_from
from .pretrain import DEFAULT_RECIPE, evaluate_tasks, float_kernels, load_or_build_skills_model
from .runner import data_anchored_methods, default_methods, routed_methods
from .skills import (
    EVAL_TASKS,
    GENERAL_PROMPTS_PER_TASK,
    MIXTURE_TASKS,
    TARGET_TASK,
    general_prompts,
    make_examples,
    validation_sets,
)


def run_default(args: argparse.Namespace) -> dict[str, Any]:
    """``imsm-bench`` with no ``--model``: the skills LM fine-tuned on the target task (see the module docstring)."""
    progress = not args.no_progress
    recipe = DEFAULT_RECIPE
    if args.pretrain_steps is not None:
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
    weights = anchor_weights(args, "1")
    per_task = f"{GENERAL_PROMPTS_PER_TASK} train-split prompts of each"
    no_recall = tuple(t for t in MIXTURE_TASKS if t != "recall")
    data_rows, data_optional = data_anchored_methods(
        weights, tuple(general_prompts()), f"{per_task} mixture task",
        held_out=("recall", tuple(general_prompts(tasks=no_recall)), f"{per_task} of {', '.join(no_recall)}"),
    )  # fmt: skip
    rows = default_methods(weights)
    route = next(i for i, m in enumerate(rows) if m.gate_mode == "route")
    rows[route + 1 : route + 1] = data_rows  # (next to the route gate with self anchors)
    methods = select(rows, args.methods, optional=[*routed_methods(weights), *data_optional])
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
