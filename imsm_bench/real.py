"""``imsm-bench --model M --protocol real``: a forgetting benchmark for a real (small) pretrained instruct model.

What it measures, and why this way (see ``docs/real-model-protocol.md`` for the protocol's design and ``docs/anchors.md`` for the variants tried):

* **Target task** (``tag``): name the category of a word with a made-up label (``"Tag: zebra"`` -> ``"dax"``).
  The labels are nonce words, so the base model scores 0 by construction; the categories are ones a pretrained
  model already represents, so a few dozen LoRA steps learn it, and test words are disjoint from training words.
* **Retention, informative at any scale**: the base model's own greedy answers to held-out general prompts (everyday
  chat prompts written here, and, when the paper's sets are available, the short inputs of its general sets), scored
  by teacher forcing in one forward per batch:

  - ``agree chat`` / ``agree general``: % of the base answer's tokens that the tuned model also ranks first
    (teacher-forced argmax agreement; 100 for the base model itself);
  - ``lik chat`` / ``lik general``: ``100 * exp(mean log p_tuned - mean log p_base)`` over those tokens, the
    likelihood the tuned model keeps of the base answers (100 for the base model).

* **Target score by teacher forcing**: greedy decoding returns the gold answer exactly iff, given the gold prefix,
  every gold token (and the end-of-turn token) is the argmax; so exact match is one forward, no generation.

Everything uses the tokenizer's chat template when it has one, and short sequences (prompts of at most
``max_prompt_tokens`` tokens, base answers of ``answer_tokens`` tokens).
"""

from __future__ import annotations

import inspect
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from peft_imsm.backbone import model_device
from peft_imsm.padding import left_pad

from .batching import encode_examples, prompt_ids
from .data import load_jsonl
from .engine import Evaluation, run
from .loading import load_model, use_chat_template
from .options import anchor_tokens, anchor_weights, select, settings_from
from .runner import Method, anchored_methods, retrofit_methods, routed_methods

# ------------------------------------------------------------------------------------------------------------------
# The target task: nonce category labels
# ------------------------------------------------------------------------------------------------------------------
TAG_CATEGORIES: dict[str, tuple[str, ...]] = {
    "dax": (  # animals
        "zebra", "horse", "tiger", "rabbit", "eagle", "shark", "camel", "monkey", "sheep", "goat", "wolf", "fox",
        "bear", "lion", "mouse", "whale", "snake", "frog", "duck", "owl", "deer", "donkey", "turtle", "parrot",
        "dolphin", "giraffe", "elephant", "kangaroo", "penguin", "squirrel", "hamster", "leopard",
    ),
    "wug": (  # fruit and vegetables
        "apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach", "pear", "plum", "melon", "carrot",
        "potato", "onion", "garlic", "cabbage", "lettuce", "tomato", "pumpkin", "spinach", "broccoli", "celery",
        "cucumber", "pineapple", "strawberry", "apricot", "avocado", "coconut", "radish", "turnip", "kiwi", "lime",
    ),
    "blick": (  # clothing
        "shirt", "jacket", "coat", "dress", "skirt", "sweater", "scarf", "glove", "sock", "boot", "sandal", "hat",
        "cap", "belt", "tie", "vest", "blouse", "jeans", "trousers", "hoodie", "pajamas", "apron", "shorts",
        "mitten", "slipper", "sneaker", "cardigan", "raincoat", "uniform", "bikini", "tuxedo", "kimono",
    ),
    "toma": (  # jobs
        "doctor", "teacher", "farmer", "baker", "pilot", "nurse", "lawyer", "plumber", "chef", "dentist", "painter",
        "driver", "soldier", "judge", "actor", "singer", "writer", "banker", "barber", "butcher", "carpenter",
        "cashier", "engineer", "firefighter", "gardener", "janitor", "librarian", "mechanic", "sailor", "surgeon",
        "tailor", "waiter",
    ),
}  # fmt: skip
TAG_PROMPT = "Tag: {word}"


def tag_examples(n: int, split: str, seed: int) -> list[dict[str, str]]:
    """``n`` examples ``{"input": "Tag: <word>", "output": <nonce label>}`` drawn with ``seed``.

    Every 4th word of each category (positions 3, 7, ...) is a test word, the others are training words, so the
    splits never share a word. Train examples are drawn with replacement (words repeat), test examples cycle
    through the test words in a seeded order (each test word once before any repeats).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    pool = [
        (word, label)
        for label, words in TAG_CATEGORIES.items()
        for i, word in enumerate(words)
        if (i % 4 == 3) == (split == "test")
    ]
    rng = random.Random(seed)
    if split == "train":
        picked = [rng.choice(pool) for _ in range(n)]
    else:
        picked = []
        while len(picked) < n:
            order = pool[:]
            rng.shuffle(order)
            picked += order
        picked = picked[:n]
    return [{"input": TAG_PROMPT.format(word=w), "output": label} for w, label in picked]


# ------------------------------------------------------------------------------------------------------------------
# Held-out general prompts
# ------------------------------------------------------------------------------------------------------------------
CHAT_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "How do I boil an egg?",
    "Write a short poem about the sea.",
    "What is photosynthesis?",
    "Can you recommend a good book for a long flight?",
    "How many days are there in a leap year?",
    "Explain what a computer virus is.",
    "What should I pack for a weekend camping trip?",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish.",
    "What is the difference between weather and climate?",
    "Suggest a name for a friendly golden retriever.",
    "How can I save money on groceries?",
    "What is 15 multiplied by 4?",
    "Describe a rainbow to a child.",
    "What are the benefits of drinking water?",
    "How do airplanes stay in the air?",
    "Write a one-sentence birthday message for my sister.",
    "What is the largest planet in our solar system?",
    "Give me a simple recipe for pancakes.",
    "How do I stay focused while studying?",
    "Who wrote Romeo and Juliet?",
    "What is a healthy breakfast?",
    "Explain gravity in simple words.",
    "What are some fun things to do on a rainy day?",
    "How do I write a polite email to my boss asking for a day off?",
    "What is the boiling point of water?",
    "Tell me a fun fact about octopuses.",
    "How do plants grow from seeds?",
    "What is the meaning of the word 'generous'?",
    "How can I be more productive in the morning?",
    "Why do we have seasons?",
    "What is a good way to start learning to play the guitar?",
    "Summarize the story of Cinderella in two sentences.",
    "What does a firefighter do?",
    "How do I make a cup of tea?",
    "What are the primary colors?",
    "Give me a motivational quote.",
    "What is the tallest mountain in the world?",
    "How do bees make honey?",
    "What is the best way to learn a new language?",
    "Explain what the internet is.",
    "Why should I exercise regularly?",
    "What is the opposite of 'ancient'?",
    "How many continents are there?",
    "Describe the taste of a lemon.",
    "What are some tips for a job interview?",
)
"""Everyday chat prompts (written for this benchmark): the base model's answers to them are the retention data."""

GENERAL_SETS: tuple[str, ...] = ("webq", "freebase", "cola", "mrpc", "gsm8k")
"""The paper's general sets whose inputs are short enough for the protocol (ROPES and MultiRC inputs are passages
of ~300-700 tokens; they are left out)."""


def general_prompts(data_dir: str | None, per_set: int, seed: int, tokenizer: Any, max_tokens: int) -> list[str]:
    """Up to ``per_set`` seeded-random inputs of each of :data:`GENERAL_SETS` from ``data_dir`` (the paper's sets in
    ``{"input", "output"}`` JSONL, ``<set>/test.jsonl``), keeping inputs of at most ``max_tokens`` tokens."""
    prompts: list[str] = []
    if not data_dir:
        return prompts
    for name in GENERAL_SETS:
        path = os.path.join(data_dir, name, "test.jsonl")
        if not os.path.exists(path):
            continue
        rows = [r["input"] for r in load_jsonl(path) if len(tokenizer(r["input"])["input_ids"]) <= max_tokens]
        random.Random(seed).shuffle(rows)
        prompts += rows[:per_set]
    return prompts


# ------------------------------------------------------------------------------------------------------------------
# Prompt formatting and teacher-forced scoring
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Scored:
    """Teacher-forced figures of one (prompt, answer) pair."""

    logprob: float  # sum of log p(answer token | prefix)
    matches: int  # answer tokens that are the argmax given the gold prefix
    length: int  # answer tokens


def _supports_logits_to_keep(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


@torch.no_grad()
def teacher_forced(
    model: Any,
    pairs: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
    batch_size: int = 16,
    gates: list[float] | None = None,
) -> list[Scored]:
    """Score ``(prompt ids, answer ids)`` pairs in one forward per batch (sorted by length to bound the padding).

    Left-padded, so every answer ends at the last column and only the last ``max answer length`` positions need the
    output head (``logits_to_keep`` where the model supports it). ``gates``: extended with the mean gate value of
    every sequence (IMSM models only; the gate over the prompt and answer tokens).
    """
    device = model_device(model)
    tuner = getattr(model, "base_model", None)
    record = gates is not None and hasattr(tuner, "record_gate")
    keep = _supports_logits_to_keep(model)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out: list[Scored | None] = [None] * len(pairs)
    gate_rows: list[float | None] = [None] * len(pairs)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = left_pad([pairs[i][0] + pairs[i][1] for i in idx], pad_id, device)
            n_ans = max(len(pairs[i][1]) for i in idx)
            kwargs: dict[str, Any] = {
                "input_ids": ids,
                "attention_mask": mask,
                "use_cache": False,
            }
            if keep:
                kwargs["logits_to_keep"] = n_ans + 1
            if record:
                with tuner.record_gate() as log:
                    logits = model(**kwargs).logits
                for row, value in zip(idx, torch.cat(log).tolist(), strict=True):
                    gate_rows[row] = value
            else:
                logits = model(**kwargs).logits
            logits = logits[:, -(n_ans + 1) : -1].float()  # position t predicts token t + 1
            logp = F.log_softmax(logits, dim=-1)
            top = logits.argmax(-1)
            for row, i in enumerate(idx):
                ans = pairs[i][1]
                a = len(ans)
                target = torch.tensor(ans, device=logp.device)
                lp = logp[row, n_ans - a :].gather(-1, target[:, None])[:, 0]
                out[i] = Scored(float(lp.sum()), int((top[row, n_ans - a :] == target).sum()), a)
    finally:
        model.train(was_training)
    if record:
        gates.extend(g for g in gate_rows if g is not None)
    return out  # type: ignore[return-value]


def exact_match_rate(scored: Sequence[Scored]) -> float:
    """% of pairs whose every answer token is the argmax: greedy decoding would return exactly that answer."""
    return 100.0 * sum(s.matches == s.length for s in scored) / max(1, len(scored))


def token_agreement(scored: Sequence[Scored]) -> float:
    """% of answer tokens (pooled over pairs) that are the argmax given the gold prefix."""
    return 100.0 * sum(s.matches for s in scored) / max(1, sum(s.length for s in scored))


def likelihood_kept(scored: Sequence[Scored], reference: Sequence[Scored]) -> float:
    """``100 * exp(mean per-token log p - mean per-token log p_reference)`` over the same pairs."""
    tokens = sum(s.length for s in scored)
    delta = (sum(s.logprob for s in scored) - sum(r.logprob for r in reference)) / max(1, tokens)
    return 100.0 * math.exp(delta)


# ------------------------------------------------------------------------------------------------------------------
# The protocol
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class RealProtocol:
    """Sizes of the real-model protocol (every figure fixed here is what ``docs/real-model-protocol.md`` reports)."""

    target_eval: int = 32  # held-out target prompts: each of the 32 test words of the tag task once
    general_per_set: int = 8  # inputs per paper general set, when the sets are available
    max_prompt_tokens: int = 96  # general inputs longer than this (before the chat template) are left out
    answer_tokens: int = 24  # base answers are cut to this many tokens
    eval_batch_size: int = 16


REAL_SETTINGS: dict[str, Any] = dict(
    steps=50, batch_size=8, lr=1e-3, r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
    max_length=128, anchor_samples=32, anchor_length=16, anchor_batch_size=4,
    route_anchor_batch_size=2, retrofit_examples=128,
    retrofit_anchor_samples=64,
)  # fmt: skip
"""The protocol's fine-tuning defaults (each can be overridden from the command line)."""


def real_methods(
    chat_prefix: list[int] | None, weights: Sequence[float] = (1.0,), chat_suffix: list[int] | None = None
) -> list[Method]:
    """The protocol's methods: base, LoRA, IMSM, and per anchor weight the anchored methods and the retrofit.
    ``chat_prefix``: the chat template's user-turn prefix, where self anchors start (else BOS); ``chat_suffix``:
    the end of the turn and generation prompt appended to them (None: nothing)."""
    methods = [
        Method("base model", "base", group="reference"),
        Method("LoRA", "lora", group="paper"),
        Method("IMSM", "imsm", "query", group="paper"),
    ]
    methods += anchored_methods(tuple(weights)) + retrofit_methods(tuple(weights))
    return start_anchors_at(methods, chat_prefix, chat_suffix)


def start_anchors_at(
    methods: list[Method], chat_prefix: list[int] | None, chat_suffix: list[int] | None = None
) -> list[Method]:
    """``methods``, with the self anchors of the anchored ones starting from ``chat_prefix`` (None: from BOS) and
    ending with ``chat_suffix`` (None: nothing appended)."""
    for m in methods:
        if m.anchor_weight is not None:
            if chat_prefix:
                m.extra["start_tokens"] = list(chat_prefix)
            if chat_suffix:
                m.extra["end_tokens"] = list(chat_suffix)
    return methods


def _answer_ids(tokenizer: Any, answer: str) -> list[int]:
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@torch.no_grad()
def greedy_answers(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16):
    """The model's greedy answers (token ids, up to and including the first eos) to tokenized prompts."""
    pad = tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = left_pad([prompts[i] for i in idx], pad, model_device(model))
        width = ids.shape[1]
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        for i, row in zip(idx, out[:, width:].tolist(), strict=True):
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id) + 1]
            answers[i] = row
    return answers


def run_real(args: Any) -> dict[str, Any]:
    """``imsm-bench --model M --protocol real``: see the module docstring and ``docs/real-model-protocol.md``."""
    protocol = RealProtocol()
    if args.eval_size is not None:  # caps every set: target prompts, chat prompts, inputs per general set
        protocol.target_eval = protocol.general_per_set = args.eval_size
    if args.max_new_tokens is not None:
        protocol.answer_tokens = args.max_new_tokens
    base, tokenizer = load_model(args)
    chat = use_chat_template(args, tokenizer)
    progress = not args.no_progress
    settings = settings_from(args, **REAL_SETTINGS)
    train_rows = tag_examples(args.train_size or settings.steps * settings.batch_size, "train", args.data_seed)
    train = encode_examples(tokenizer, train_rows, settings.max_length, chat=chat)
    t0 = time.perf_counter()
    target_pairs = [
        (prompt_ids(tokenizer, r["input"], chat), _answer_ids(tokenizer, r["output"]))
        for r in tag_examples(protocol.target_eval, "test", args.data_seed + 1)
    ]
    data_dir = args.general_data or os.environ.get("IMSM_BENCHMARKS_DIR")
    general = general_prompts(
        data_dir, protocol.general_per_set, args.data_seed, tokenizer, protocol.max_prompt_tokens
    )
    retention_prompts = {"chat": list(CHAT_PROMPTS[: args.eval_size])}
    if general:
        retention_prompts["general"] = general
    elif progress:
        print("imsm-bench: no --general-data folder: retention uses the chat prompts only", file=sys.stderr)
    retention_pairs: dict[str, list[tuple[list[int], list[int]]]] = {}
    for name, texts in retention_prompts.items():
        ids = [prompt_ids(tokenizer, t, chat) for t in texts]
        retention_pairs[name] = list(
            zip(ids, greedy_answers(base, tokenizer, ids, protocol.answer_tokens), strict=True)
        )
    pad = tokenizer.pad_token_id
    bs = protocol.eval_batch_size
    reference = {name: teacher_forced(base, pairs, pad, bs) for name, pairs in retention_pairs.items()}
    if progress:
        print(f"imsm-bench: base answers to {sum(map(len, retention_pairs.values()))} prompts in "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)  # fmt: skip
    set_names = ["tag"] + [f"{kind} {name}" for name in retention_pairs for kind in ("agree", "lik")]

    def score(model: Any, sets: Any) -> Evaluation:
        out: Evaluation = {"scores": {}, "metrics": {}, "gates": {}}
        gates: list[float] = []
        tag = teacher_forced(model, target_pairs, pad, bs, gates=gates)
        out["scores"]["tag"] = exact_match_rate(tag)
        out["metrics"]["tag"] = {"exact_match": exact_match_rate(tag), "token_accuracy": token_agreement(tag)}
        out["gates"]["tag"] = gates
        for name, pairs in retention_pairs.items():
            gates = []
            scored = teacher_forced(model, pairs, pad, bs, gates=gates)
            figures = {
                "token_agreement": token_agreement(scored),
                "likelihood_kept": likelihood_kept(scored, reference[name]),
                "answer_agreement": exact_match_rate(scored),
            }
            out["scores"][f"agree {name}"] = figures["token_agreement"]
            out["scores"][f"lik {name}"] = figures["likelihood_kept"]
            out["metrics"][f"agree {name}"] = figures
            out["metrics"][f"lik {name}"] = {"likelihood_kept": figures["likelihood_kept"]}
            out["gates"][f"agree {name}"] = gates
        return out

    start_tokens, end_tokens = anchor_tokens(args.anchor_start, tokenizer, chat)
    weights = anchor_weights(args, "1")
    routed = start_anchors_at(routed_methods(weights), start_tokens, end_tokens)
    methods = select(real_methods(start_tokens, weights, end_tokens), args.methods, optional=routed)
    sets = dict.fromkeys(set_names)
    results = run(base, tokenizer, methods, train, sets, score, "tag", settings, args.seeds, progress,
                  retention_tasks=set_names[1:], first_seed=args.first_seed, jobs=args.jobs)  # fmt: skip
    results["title"] = f"imsm-bench --protocol real: {os.path.basename(str(args.model))} on 'tag' ({args.adapter})"
    results["metric"] = {"tag": "exact match (teacher-forced)", "agree": "token agreement with the base answers",
                         "lik": "likelihood of the base answers kept"}  # fmt: skip
    results["settings"] = {**vars(args), "chat_template": chat, "protocol": vars(protocol),
                           "finetune": vars(settings), "anchor_start_tokens": start_tokens,
                           "anchor_end_tokens": end_tokens,
                           "general_prompts": len(general)}  # fmt: skip
    return results
