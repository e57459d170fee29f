"""``imsm-bench``'s command line: the options, and what they turn into (fine-tuning settings, methods, weights).

:func:`parse_args` is the whole command line (every flag and default of ``imsm-bench``; its description, the text
``--help`` shows, is :data:`DESCRIPTION`). The protocols (:mod:`.default`, :mod:`.custom`, :mod:`.real`) read the
parsed options through :func:`settings_from` (fine-tuning settings: the protocol's defaults overridden by the flags
given), :func:`anchor_weights` (``--anchor-weights``) and :func:`select` (``--methods``). Bad values exit with a
message that names the option, the value and what it accepts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from peft_imsm.anchors import AnchorConfig, chat_start_tokens

from .runner import ADAPTERS, FinetuneSettings, Method

# --anchor-start: the names and meanings of imsm-sft's --imsm_anchor_start (chat: AnchorConfig.from_tokenizer's whole
# chat prompts), plus user-turn (the user-turn start and the sampled text only).
ANCHOR_STARTS = ("auto", "chat", "user-turn", "bos")

DESCRIPTION = """``imsm-bench``: does IMSM learn the target task like LoRA and forget less? Measure it.

With no arguments: the offline default (the project's own skills LM, a target task outside its skills, LoRA vs IMSM
vs ablations vs baselines). With ``--model``/``--train``/``--eval``: your model and your JSONL sets.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="imsm-bench", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
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
    t.add_argument(
        "--anchor-batch-size",
        type=int,
        default=None,
        help="anchors per anchored step, for every gate mode (default: the protocol's, 8 or 4; the route "
        "gate's half of it)",
    )
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
        "--protocol", choices=["custom", "real", "library"], default="custom",
        help="custom: your --train/--eval JSONL files; real: the built-in real-model forgetting protocol "
        "(docs/real-model-protocol.md; no data files needed); library: several LoRAs behind one router "
        "(docs/library.md; its own options: imsm-bench --protocol library --help)",
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
        "--anchor-start", choices=ANCHOR_STARTS, default="auto",
        help="--protocol real: what self anchors look like, as imsm-sft's --imsm_anchor_start. chat: whole chat "
        "prompts, as AnchorConfig.from_tokenizer gives (the chat template's user-turn start, the sampled text, the "
        "end of the turn and the generation prompt; needs a chat template). auto (default): chat where the "
        "prompts go through a chat template, else bos. user-turn: the user-turn start and the sampled text only "
        "(AnchorConfig(start_tokens=chat_start_tokens(tokenizer)); needs a chat template). bos: from the BOS token",
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
    if getattr(args, "anchor_batch_size", None) is not None:  # (one anchor batch for every gate mode)
        settings.route_anchor_batch_size = args.anchor_batch_size
    modules = getattr(args, "target_modules", None)
    if modules:
        names = [m.strip() for m in modules.split(",") if m.strip()]
        settings.target_modules = "all-linear" if names == ["all-linear"] else names
    for name in ("steps", "batch_size", "r", "anchor_batch_size", "anchor_every"):
        if getattr(settings, name) < 1:
            raise SystemExit(f"error: {name} must be >= 1, got {getattr(settings, name)}.")
    return settings


def select(methods: list[Method], names: str | None, optional: Sequence[Method] = ()) -> list[Method]:
    """The rows named in ``--methods`` (``names``; all of ``methods`` without it), among ``methods`` and the
    ``optional`` rows, which run only when named."""
    if not names:
        return methods
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {m.name: m for m in [*methods, *optional]}
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


def anchor_tokens(anchor_start: str, tokenizer: Any, chat: bool) -> tuple[list[int] | None, list[int] | None]:
    """``--anchor-start`` as the self anchors' ``(start_tokens, end_tokens)`` (``(None, None)``: from BOS, nothing
    appended). ``chat`` is whether the run's prompts go through the tokenizer's chat template.

    ``chat``: ``AnchorConfig.from_tokenizer(tokenizer)``'s tokens, whole chat prompts (what ``imsm-sft
    --imsm_anchor_start chat`` sets); ``auto``: those with a chat template, else from BOS; ``user-turn``: the
    user-turn start only; ``bos``: from BOS. ``chat`` and ``user-turn`` without a chat template exit with a message.
    """
    if anchor_start not in ANCHOR_STARTS:
        raise SystemExit(f"error: --anchor-start {anchor_start!r} is not one of {', '.join(ANCHOR_STARTS)}.")
    if anchor_start == "bos" or (anchor_start == "auto" and not chat):
        return None, None
    if not chat:
        raise SystemExit(
            f"error: --anchor-start {anchor_start} builds anchors from the chat template, but this run's prompts do "
            "not use one (--no-chat-template, or a tokenizer without a chat template). Use --anchor-start bos (or "
            "auto)."
        )
    if anchor_start == "user-turn":
        return chat_start_tokens(tokenizer), None
    config = AnchorConfig.from_tokenizer(tokenizer)
    return config.start_tokens, config.end_tokens
