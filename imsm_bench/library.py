"""``imsm-bench --model M --protocol library``: a library of LoRAs (one per task) and the base model behind one router.

The question: given K LoRAs trained separately, one per task, and a base model whose general skills must stay, how
close does each way of serving them together come to the oracle (each task's prompts to its own LoRA, every other
prompt to the base model)? On the real protocol's model and LoRA settings (``imsm_bench.real``):

1. **Tasks** (:mod:`.library_tasks`): ``tag``, ``extract`` and ``cola``, each with training rows and held-out test
   prompts in templates no training row uses; per task, near-surface general prompts (the task's kind of words or
   sentences, another question); and the real protocol's everyday chat prompts.
2. **The library**: per task, a LoRA trained on that task alone (:func:`train_library`), saved under
   ``<out>/adapters/seed<k>/<task>``.
3. **Rows** (:func:`build_row`; every row on the same adapters and prompts):

   - ``base model`` (the reference);
   - ``oracle choice``: each task's test prompts scored with its own LoRA, every general prompt with the base model
     (the upper bound of any router);
   - ``LoRA <task> on every prompt``: one LoRA alone, what serving it without a router gives;
   - ``merged (cat w=1)`` / ``merged (cat w=1/K)``: peft's ``add_weighted_adapter(combination_type="cat")``, whose
     update is exactly ``sum_k w_k * dW_k`` for LoRAs of any ranks ("linear" needs equal ranks and averages the A
     and B factors separately, which is not the sum of the updates); weights 1 (task arithmetic) and 1/K (the mean);
   - ``Arrow (top_k=1)`` / ``Arrow (top_k=K)``: peft's Arrow routing (``create_arrow_model`` + ``ArrowConfig``), per
     token and per layer, by the similarity of the token to each LoRA's top right singular vector;
   - ``IMSM router (hard choice)``: ``peft_imsm.retrofit`` of the whole library with the route gate (one router over
     the base model and the K adapters, ``route_threshold=0.5``), its router trained with ``peft_imsm.train_gate`` on
     each task's training rows plus self anchors (whole chat prompts, ``AnchorConfig.from_tokenizer``).

4. **Measures** (:func:`entry_of`): per task, exact match by teacher forcing (``imsm_bench.real``; ``cola`` also
   Matthews correlation, a wrong answer counting as the other label); retention as the real protocol's ``agree`` /
   ``lik`` against the base model's own greedy answers, on the near-surface prompts (pooled; per task in
   ``metrics``) and on the chat prompts; for the IMSM row, the route of every prompt (``model.base_model.route``):
   the share of each task's test prompts sent to its LoRA and of the general prompts sent to the base model.

The IMSM row is scored with the prompts' labels in the forward (``-100`` on the prompt), so its router reads the
prompt alone, as at ``generate()``'s prefill; the other rows have no query. ``routed_as_lookup`` checks the hard
choice: the share of prompts whose IMSM score equals the score of the model the route names (the base model, or
that LoRA alone).

Not run: peft's GenKnowSub (``ArrowConfig(use_gks=True)``) needs general-knowledge LoRAs (trained on general text)
to subtract, which this library has none of; X-LoRA trains a classifier over the K adapters' scalings with a
two-pass forward, which at this model's size on CPU costs more than the rest of the protocol.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft import ArrowConfig, PeftModel, create_arrow_model

import peft_imsm
from peft_imsm.backbone import model_device
from peft_imsm.padding import left_pad

from .batching import encode_examples, prompt_ids
from .engine import summarize
from .library_tasks import NEAR_PROMPTS, TASKS, TEST_TEMPLATES, TRAIN_TEMPLATES, task_rows
from .loading import load_model, use_chat_template
from .metrics import matthews_corrcoef
from .options import settings_from
from .parallel import default_jobs, map_runs
from .real import (
    CHAT_PROMPTS,
    REAL_SETTINGS,
    Scored,
    exact_match_rate,
    greedy_answers,
    likelihood_kept,
    teacher_forced,
    token_agreement,
)
from .runner import FinetuneSettings, Method, finetune

BASE_ROUTE = "__base__"
"""The route name of the base model (``model.base_model.route`` names the others by their adapter)."""

OPTIONAL_ROWS: tuple[str, ...] = ("merged-sum", "merged-mean", "arrow-1", "arrow-all", "imsm")
"""``--methods`` keys of the rows beyond the base model, the oracle and each LoRA alone (always run)."""


@dataclass
class LibraryProtocol:
    """Sizes of the library protocol."""

    test_per_task: int = 32  # held-out test prompts per task
    gate_examples: int = 128  # training rows per task the router trains on (the real protocol's retrofit_examples)
    answer_tokens: int = 24  # base answers to the general prompts are cut to this many tokens
    eval_batch_size: int = 16


# ------------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------------
def library_requested(argv: Sequence[str]) -> bool:
    """Whether a command line asks for ``--protocol library`` (``imsm-bench``'s own parser does not know it)."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--protocol" and i + 1 < len(argv) and argv[i + 1] == "library":
            return True
        if arg == "--protocol=library":
            return True
    return False


def parse_library_args(argv: Sequence[str]) -> argparse.Namespace:
    """The options of ``imsm-bench --protocol library`` (the real protocol's names where they mean the same)."""
    p = argparse.ArgumentParser(
        prog="imsm-bench --protocol library",
        description="Several LoRAs behind one router: each task's LoRA, merging, Arrow and the IMSM router against the "
        "oracle choice, on a real instruct model (see imsm_bench/library.py).",
    )
    p.add_argument("--protocol", choices=["library"], required=True)
    p.add_argument("--model", required=True, help="local HF folder, hub id, or a GGUF file (converted once)")
    p.add_argument("--out", default="imsm-bench-library", help="output folder (results.json, adapters/)")
    p.add_argument("--overwrite", action="store_true", help="replace the results in an existing --out folder")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (default 1; results are mean ± std)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=None, help="runs at once in forked one-thread workers (default: one "
                   "per CPU core, at most 4; 1 with a GPU)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, at least two of {', '.join(TASKS)}")
    p.add_argument(
        "--paper-sets", "--general-data", dest="paper_sets", default=None, metavar="DIR",
        help="the folder of the paper's prompt-formatted sets; the cola task reads DIR/cola/train.jsonl and "
        "DIR/cola/test.jsonl (default $IMSM_BENCHMARKS_DIR)",
    )  # fmt: skip
    p.add_argument(
        "--methods", default=None,
        help=f"comma-separated subset of {', '.join(OPTIONAL_ROWS)} (the base model, the oracle and each LoRA "
        "alone always run)",
    )  # fmt: skip
    t = p.add_argument_group("LoRA training (default: the real protocol's settings)")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--rank", type=int, default=None)
    t.add_argument("--alpha", type=float, default=None)
    t.add_argument("--dropout", type=float, default=None)
    t.add_argument("--target-modules", default=None)
    t.add_argument("--gate-steps", type=int, default=None, help="the IMSM router's train_gate steps (default --steps)")
    d = p.add_argument_group("data and scoring")
    d.add_argument("--train-size", type=int, default=None, help="training rows per task (default steps x batch)")
    d.add_argument("--eval-size", type=int, default=None, help="test prompts per task; also caps each general set")
    d.add_argument("--max-new-tokens", type=int, default=None, help="length of the base answers (default 24)")
    d.add_argument("--data-seed", type=int, default=0)
    d.add_argument("--no-chat-template", action="store_true")
    d.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    d.add_argument("--cache-dir", default=None, help="cache of converted GGUF models")
    args = p.parse_args(list(argv))
    args.adapter = "lora"  # (Arrow and merging need LoRA)
    args.task_list = [name.strip() for name in args.tasks.split(",") if name.strip()]
    unknown = [name for name in args.task_list if name not in TASKS]
    if unknown or len(set(args.task_list)) < 2 or len(set(args.task_list)) != len(args.task_list):
        raise SystemExit(f"error: --tasks {args.tasks!r}: give at least two different tasks of {', '.join(TASKS)}.")
    args.rows = list(OPTIONAL_ROWS)
    if args.methods:
        args.rows = [name.strip() for name in args.methods.split(",") if name.strip()]
        bad = [name for name in args.rows if name not in OPTIONAL_ROWS]
        if bad:
            raise SystemExit(f"error: --methods: unknown row(s) {bad}; known: {', '.join(OPTIONAL_ROWS)}.")
    for name in ("seeds", "jobs", "gate_steps", "train_size", "eval_size", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {value}.")
    if args.paper_sets is None:
        args.paper_sets = os.environ.get("IMSM_BENCHMARKS_DIR") or None
    return args


def row_names(tasks: Sequence[str]) -> dict[str, str]:
    """``{key: row name}`` of the optional rows for a library of ``tasks``."""
    k = len(tasks)
    return {"merged-sum": "merged (cat w=1)", "merged-mean": f"merged (cat w=1/{k})", "arrow-1": "Arrow (top_k=1)",
            "arrow-all": f"Arrow (top_k={k})", "imsm": "IMSM router (hard choice)"}  # fmt: skip


# ------------------------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def teacher_forced_prompt_query(
    model: Any, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 16
) -> list[Scored]:
    """:func:`imsm_bench.real.teacher_forced` with the labels in the forward (``-100`` on every prompt and padding),
    so that a gate that reads the query (the IMSM router) reads each prompt alone, as at ``generate()``'s prefill;
    without labels the query would be the prompt and the answer. The whole sequence gets the output head (the
    model's loss needs it)."""
    device = model_device(model)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out: list[Scored | None] = [None] * len(pairs)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = left_pad([pairs[i][0] + pairs[i][1] for i in idx], pad_id, device)
            labels, _ = left_pad([[-100] * len(pairs[i][0]) + pairs[i][1] for i in idx], -100, device)
            n_ans = max(len(pairs[i][1]) for i in idx)
            logits = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).logits
            logits = logits[:, -(n_ans + 1) : -1].float()
            logp = F.log_softmax(logits, dim=-1)
            top = logits.argmax(-1)
            for row, i in enumerate(idx):
                ans = pairs[i][1]
                target = torch.tensor(ans, device=logp.device)
                lp = logp[row, n_ans - len(ans) :].gather(-1, target[:, None])[:, 0]
                out[i] = Scored(float(lp.sum()), int((top[row, n_ans - len(ans) :] == target).sum()), len(ans))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


@torch.no_grad()
def routes_of(model: Any, prompts: Sequence[list[int]], pad_id: int, batch_size: int = 16) -> list[str]:
    """The route (``"__base__"`` or an adapter name) ``model.base_model.route`` gives each tokenized prompt."""
    routes: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(list(prompts[start : start + batch_size]), pad_id, model_device(model))
        routes += list(model.base_model.route(ids, mask))
    return routes


def label_mcc(scored: Sequence[Scored], golds: Sequence[str]) -> float:
    """Matthews correlation (x100) of yes/no answers scored by teacher forcing: an exact match predicts the gold
    label, anything else the other label (as the paper's metrics count an answer without the right label word)."""
    flip = {"yes": "no", "no": "yes"}
    predictions = [g if s.matches == s.length else flip[g] for s, g in zip(scored, golds, strict=True)]
    return matthews_corrcoef(predictions, list(golds))


def entry_of(
    scored: dict[str, list[Scored]],
    reference: dict[str, list[Scored]],
    tasks: Sequence[str],
    golds: dict[str, list[str]],
) -> dict[str, Any]:
    """One row's per-seed figures from its teacher-forced scores: ``scores`` (the table's cells: each task's exact
    match, ``agree`` / ``lik`` on the near-surface prompts pooled and on the chat prompts, and their averages) and
    ``metrics`` (every figure of every set). ``reference``: the base model's scores of its own answers to the
    general sets (``near <task>``, ``chat``)."""
    scores: dict[str, float] = {}
    metrics: dict[str, dict[str, float]] = {}
    for task in tasks:
        figures = {"exact_match": exact_match_rate(scored[task]), "token_accuracy": token_agreement(scored[task])}
        if task == "cola":
            figures["mcc"] = label_mcc(scored[task], golds[task])
        scores[task] = figures["exact_match"]
        metrics[task] = figures
    near = [f"near {task}" for task in tasks]
    general = {"near": (near, [s for n in near for s in scored[n]], [s for n in near for s in reference[n]]),
               "chat": (["chat"], scored["chat"], reference["chat"])}  # fmt: skip
    for label, (_, mine, ref) in general.items():
        scores[f"agree {label}"] = token_agreement(mine)
        scores[f"lik {label}"] = likelihood_kept(mine, ref)
    for name in [*near, "chat"]:
        metrics[name] = {
            "token_agreement": token_agreement(scored[name]),
            "likelihood_kept": likelihood_kept(scored[name], reference[name]),
            "answer_agreement": exact_match_rate(scored[name]),
        }
    scores["target avg"] = statistics.fmean(scores[task] for task in tasks)
    scores["retention avg"] = statistics.fmean(scores[k] for k in ("agree near", "lik near", "agree chat", "lik chat"))
    return {"scores": scores, "metrics": metrics}


def routing_of(routes: dict[str, list[str]], tasks: Sequence[str]) -> dict[str, Any]:
    """Routing figures of a hard router: per task, % of its test prompts routed to its adapter; per general set
    (``near <task>``, ``chat``), % routed to the base model; ``general``: the same pooled over every general prompt;
    and ``counts``: every set's routes counted."""
    shares: dict[str, float] = {}
    for name, seen in routes.items():
        wanted = name if name in tasks else BASE_ROUTE
        shares[name] = 100.0 * sum(r == wanted for r in seen) / max(1, len(seen))
    general = [r for name, seen in routes.items() if name not in tasks for r in seen]
    shares["general"] = 100.0 * sum(r == BASE_ROUTE for r in general) / max(1, len(general))
    counts = {name: {r: seen.count(r) for r in sorted(set(seen))} for name, seen in routes.items()}
    return {"shares": shares, "counts": counts}


def routed_as_lookup(
    scored: dict[str, list[Scored]], routes: dict[str, list[str]], table: dict[str, dict[str, list[Scored]]]
) -> float:
    """% of prompts whose score equals (argmax matches, and log-likelihood within 1e-3 per token) the score of the
    model their route names: ``table[route][set]`` (``table["__base__"]``: the base model; ``table[task]``: that
    LoRA alone)."""
    same = total = 0
    for name, seen in routes.items():
        for i, route in enumerate(seen):
            mine, other = scored[name][i], table[route][name][i]
            total += 1
            same += mine.matches == other.matches and abs(mine.logprob - other.logprob) <= 1e-3 * max(1, mine.length)
    return 100.0 * same / max(1, total)


# ------------------------------------------------------------------------------------------------------------------
# The library and the rows
# ------------------------------------------------------------------------------------------------------------------
def lora_seed(seed: int, index: int) -> int:
    """The training seed of the ``index``-th task's LoRA in run ``seed``: the LoRAs of a library are trained
    separately, each from its own initialisation."""
    return 1000 * seed + index


def adapter_paths(out: str, seed: int, tasks: Sequence[str]) -> dict[str, str]:
    return {task: os.path.join(out, "adapters", f"seed{seed}", task) for task in tasks}


def build_row(
    key: str, base: Any, paths: dict[str, str], seed: int, context: dict[str, Any]
) -> tuple[Any, dict[str, Any]]:
    """The model of row ``key`` on a copy of ``base`` (``"adapter:<task>"`` or an :data:`OPTIONAL_ROWS` key), and
    what building it logged."""
    tasks = list(paths)
    model = copy.deepcopy(base)
    if key.startswith("adapter:"):
        return PeftModel.from_pretrained(model, paths[key.split(":", 1)[1]]).eval(), {}
    if key in ("merged-sum", "merged-mean"):
        peft_model = PeftModel.from_pretrained(model, paths[tasks[0]], adapter_name=tasks[0])
        for task in tasks[1:]:
            peft_model.load_adapter(paths[task], adapter_name=task)
        weight = 1.0 if key == "merged-sum" else 1.0 / len(tasks)
        peft_model.add_weighted_adapter(tasks, [weight] * len(tasks), "merged", combination_type="cat")
        peft_model.set_adapter("merged")
        return peft_model.eval(), {"combination_type": "cat", "weights": [weight] * len(tasks)}
    if key in ("arrow-1", "arrow-all"):
        top_k = 1 if key == "arrow-1" else len(tasks)
        config = ArrowConfig(top_k=top_k, router_temperature=1.0, rng_seed=seed)
        arrow = create_arrow_model(model, [paths[t] for t in tasks], config)
        return arrow.eval(), {"top_k": top_k, "router_temperature": 1.0}
    if key == "imsm":
        settings: FinetuneSettings = context["settings"]
        tokenizer = context["tokenizer"]
        anchor_kwargs = dict(num_samples=settings.retrofit_anchor_samples, sample_length=settings.anchor_length,
                             seed=seed)  # fmt: skip
        anchor = (
            peft_imsm.AnchorConfig.from_tokenizer(tokenizer, **anchor_kwargs)
            if context["chat"]
            else peft_imsm.AnchorConfig(**anchor_kwargs)
        )
        start = time.perf_counter()
        torch.manual_seed(seed)  # the router's initialisation
        imsm = peft_imsm.retrofit(model, dict(paths), gate_mode="route", anchor=anchor, route_threshold=0.5)
        rows = {task: context["train"][task][: context["protocol"].gate_examples] for task in tasks}
        logs = peft_imsm.train_gate(imsm, rows, tokenizer, steps=context["gate_steps"], seed=seed)
        imsm.eval()
        routers = {name: {"seconds": log.seconds_total, "final_loss": log.loss[-1] if log.loss else None,
                          "gate_mean": log.gate_mean, "anchor_gate_mean": log.anchor_gate_mean}
                   for name, log in logs.items()}  # fmt: skip
        return imsm, {"train_seconds": time.perf_counter() - start, "gate_steps": context["gate_steps"],
                      "gate_examples_per_task": context["protocol"].gate_examples,
                      "anchor_samples": anchor.num_samples, "routers": routers}  # fmt: skip
    raise ValueError(f"unknown row {key!r}")


def train_library(
    base: Any, tokenizer: Any, train: dict[str, list[tuple[list[int], list[int]]]], settings: FinetuneSettings,
    seed: int, out: str, jobs: int, progress: bool,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Train and save one LoRA per task (:func:`imsm_bench.runner.finetune`, the real protocol's settings) in
    ``<out>/adapters/seed<seed>/<task>``; returns each one's training seconds and final loss."""
    tasks = list(train)
    paths = adapter_paths(out, seed, tasks)

    def train_one(index: int, task: str) -> dict[str, float]:
        model, log = finetune(copy.deepcopy(base), tokenizer, Method(f"LoRA {task}", "lora"), train[task], settings,
                              lora_seed(seed, index), progress and jobs <= 1)  # fmt: skip
        model.save_pretrained(paths[task])
        return {"train_seconds": log["seconds"], "final_loss": log["loss"][-1]}

    logs = dict(zip(tasks, map_runs(train_one, list(enumerate(tasks)), jobs), strict=True))
    if progress:
        print(f"imsm-bench: seed {seed}: trained " + ", ".join(f"{t} ({v['train_seconds']:.0f} s, loss "
              f"{v['final_loss']:.3f})" for t, v in logs.items()), file=sys.stderr)  # fmt: skip
    return logs


# ------------------------------------------------------------------------------------------------------------------
# The protocol
# ------------------------------------------------------------------------------------------------------------------
def run_library(args: argparse.Namespace) -> dict[str, Any]:
    """``imsm-bench --model M --protocol library``: see the module docstring."""
    protocol = LibraryProtocol()
    if args.eval_size is not None:
        protocol.test_per_task = args.eval_size
    if args.max_new_tokens is not None:
        protocol.answer_tokens = args.max_new_tokens
    tasks = list(args.task_list)
    progress = not args.no_progress
    jobs = args.jobs if args.jobs is not None else default_jobs()
    settings = settings_from(args, **REAL_SETTINGS)
    gate_steps = args.gate_steps or settings.steps
    n_train = args.train_size or settings.steps * settings.batch_size
    try:
        train_rows = {t: task_rows(t, n_train, "train", args.data_seed, args.paper_sets) for t in tasks}
        test_rows = {
            t: task_rows(t, protocol.test_per_task, "test", args.data_seed + 1, args.paper_sets) for t in tasks
        }
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    t0 = time.perf_counter()
    base, tokenizer = load_model(args)
    chat = use_chat_template(args, tokenizer)
    pad, bs = tokenizer.pad_token_id, protocol.eval_batch_size
    train = {t: encode_examples(tokenizer, rows, settings.max_length, chat=chat) for t, rows in train_rows.items()}

    def answer(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    sets: dict[str, list[tuple[list[int], list[int]]]] = {
        t: [(prompt_ids(tokenizer, r["input"], chat), answer(r["output"])) for r in rows]
        for t, rows in test_rows.items()
    }
    golds = {t: [r["output"] for r in rows] for t, rows in test_rows.items()}
    general = {f"near {t}": list(NEAR_PROMPTS[t][: args.eval_size]) for t in tasks}
    general["chat"] = list(CHAT_PROMPTS[: args.eval_size])
    for name, texts in general.items():
        ids = [prompt_ids(tokenizer, text, chat) for text in texts]
        sets[name] = list(zip(ids, greedy_answers(base, tokenizer, ids, protocol.answer_tokens, bs), strict=True))
    reference = {name: teacher_forced(base, sets[name], pad, bs) for name in general}
    base_scored = {**{t: teacher_forced(base, sets[t], pad, bs) for t in tasks}, **reference}
    if progress:
        print(f"imsm-bench: base answers to {sum(map(len, general.values()))} general prompts in "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)  # fmt: skip
    names = row_names(tasks)
    context = {"settings": settings, "tokenizer": tokenizer, "chat": chat, "train": train, "protocol": protocol,
               "gate_steps": gate_steps}  # fmt: skip

    per_seed: dict[str, list[dict[str, Any]]] = {}
    lora_logs: list[dict[str, dict[str, float]]] = []
    seeds = range(args.first_seed, args.first_seed + args.seeds)

    def evaluate(seed: int, key: str) -> dict[str, Any]:
        """Row ``key`` of run ``seed`` built and scored on every set (and, with a hard router, every route)."""
        start = time.perf_counter()
        model, built = build_row(key, base, adapter_paths(args.out, seed, tasks), seed, context)
        routed = key == "imsm"
        score = teacher_forced_prompt_query if routed else teacher_forced
        scored = {name: score(model, pairs, pad, bs) for name, pairs in sets.items()}
        routes = None
        if routed:
            routes = {name: routes_of(model, [p for p, _ in pairs], pad, bs) for name, pairs in sets.items()}
        result = {"key": key, "scored": scored, "routes": routes, "built": built,
                  "seconds": time.perf_counter() - start}  # fmt: skip
        if progress:
            print(f"imsm-bench: seed {seed}: {key} scored in {result['seconds']:.0f} s", file=sys.stderr)
        return result

    for seed in seeds:
        lora_logs.append(train_library(base, tokenizer, train, settings, seed, args.out, jobs, progress))
        keys = sorted([f"adapter:{t}" for t in tasks] + list(args.rows), key=lambda k: k != "imsm")  # (longest first)
        results = {r["key"]: r for r in map_runs(evaluate, [(seed, k) for k in keys], jobs)}
        table = {BASE_ROUTE: base_scored, **{t: results[f"adapter:{t}"]["scored"] for t in tasks}}
        rows: dict[str, dict[str, Any]] = {"base model": entry_of(base_scored, reference, tasks, golds)}
        oracle = {**reference, **{t: table[t][t] for t in tasks}}
        rows["oracle choice"] = entry_of(oracle, reference, tasks, golds)
        for t in tasks:
            r = results[f"adapter:{t}"]
            rows[f"LoRA {t} on every prompt"] = {**entry_of(r["scored"], reference, tasks, golds),
                                                  "seconds": r["seconds"]}  # fmt: skip
        for key in args.rows:
            r = results[key]
            entry = {**entry_of(r["scored"], reference, tasks, golds), "seconds": r["seconds"], "built": r["built"]}
            if r["routes"] is not None:
                entry["routing"] = routing_of(r["routes"], tasks)
                entry["routed_as_lookup"] = routed_as_lookup(r["scored"], r["routes"], table)
            rows[names[key]] = entry
        for name, entry in rows.items():
            per_seed.setdefault(name, []).append(entry)

    methods = {name: summarize_row(entries) for name, entries in per_seed.items()}
    return {
        "protocol": "library",
        "title": f"imsm-bench --protocol library: {os.path.basename(str(args.model).rstrip('/'))}, LoRAs for "
        f"{', '.join(tasks)}",
        "tasks": tasks,
        "metric": {"<task>": "exact match (teacher-forced)", "agree": "token agreement with the base answers",
                   "lik": "likelihood of the base answers kept", "near": "near-surface general prompts (pooled)",
                   "chat": "everyday chat prompts",
                   "routing": "% of a task's test prompts routed to its LoRA; of general prompts, to the base model"},
        "task_design": {t: {"train_templates": list(TRAIN_TEMPLATES[t]), "test_templates": list(TEST_TEMPLATES[t]),
                            "train_rows": len(train[t]), "test_prompts": len(sets[t]),
                            "near_prompts": len(general[f"near {t}"]), "train_example": train_rows[t][0],
                            "test_example": test_rows[t][0], "near_example": general[f"near {t}"][0]}
                        for t in tasks},
        "methods": methods,
        "lora_training": {t: {k: summarize([log[t][k] for log in lora_logs]) for k in ("train_seconds", "final_loss")}
                          for t in tasks},
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("rows", "task_list")},
                     "rows": list(args.rows), "chat_template": chat, "protocol": vars(protocol),
                     "finetune": vars(settings), "gate_steps": gate_steps, "train_rows_per_task": n_train,
                     "general_prompts": {name: len(texts) for name, texts in general.items()}, "jobs": jobs},
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip


def summarize_row(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over the seeds of one row's per-seed entries (scores, metrics, routing shares, seconds)."""
    first = entries[0]
    row: dict[str, Any] = {
        "scores": {k: summarize([e["scores"][k] for e in entries]) for k in first["scores"]},
        "metrics": {
            name: {m: summarize([e["metrics"][name][m] for e in entries]) for m in figures}
            for name, figures in first["metrics"].items()
        },
    }
    if "routing" in first:
        row["routing"] = {
            k: summarize([e["routing"]["shares"][k] for e in entries]) for k in first["routing"]["shares"]
        }
        row["routed_as_lookup"] = summarize([e["routed_as_lookup"] for e in entries])
    if "seconds" in first:
        row["seconds"] = summarize([e["seconds"] for e in entries])
    row["per_seed"] = entries
    return row


# ------------------------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------------------------
def _cell(cell: dict[str, float] | None) -> str:
    if cell is None:
        return "-"
    return f"{cell['mean']:.1f}±{cell['std']:.1f}" if cell.get("n", 1) > 1 else f"{cell['mean']:.1f}"


def library_tables(results: dict[str, Any]) -> str:
    """The results table (per row: each task's exact match, the retention measures, the averages) and, for the
    rows with a hard router, the routing table, in markdown."""
    tasks = results["tasks"]
    columns = [*tasks, "target avg", "agree near", "lik near", "agree chat", "lik chat", "retention avg"]
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in results["methods"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(row["scores"].get(c)) for c in columns) + " |")
    routed = {name: row for name, row in results["methods"].items() if "routing" in row}
    if routed:
        heads = [*(f"{t} -> {t}" for t in tasks), *(f"near {t} -> base" for t in tasks), "chat -> base"]
        keys = [*tasks, *(f"near {t}" for t in tasks), "chat"]
        lines += ["", "| router | " + " | ".join(heads) + " | routed as lookup |", "|---" * (len(heads) + 2) + "|"]
        for name, row in routed.items():
            cells = [_cell(row["routing"].get(k)) for k in keys] + [_cell(row["routed_as_lookup"])]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
