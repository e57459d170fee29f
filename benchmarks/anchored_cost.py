"""Training step time of anchored IMSM against plain LoRA, IMSM and LoRA + anchor KL, side by side in one run.

Setting: exactly the training step of ``imsm-bench``'s default run (the cached skills LM, LoRA r=8 alpha 16 on q/v,
AdamW lr 2e-3, batch 32 of the target task, anchors: 64 self-sampled, 24 new tokens each, 8 per step, weight 1).
One step = forward (+ the anchor term) + backward + AdamW step + ``zero_grad``. Methods are interleaved step by
step and the median wall time is reported, with the ratio to plain LoRA:

* ``LoRA``, ``IMSM``: no anchors;
* ``IMSM + self anchors [gate] (w=1)``: the anchor term trains the gate only (the adapted view runs without autograd
  there);
* ``IMSM + self anchors [gate+adapter] (w=1)``: the anchor term trains the adapter too;
* ``IMSM w/o gate + self anchors [adapter] (w=1)``: the gate fixed at 0.5, the anchor term trains the adapter;
* ``IMSM route gate + self anchors [gate+adapter] (w=1)``: the route gate with its routing term;
* ``IMSM route gate + self anchors [gate] (w=1)``: the same, the anchor term's KL reaching the router only (the
  adapted view runs without autograd on the anchors);
* ``LoRA + anchor KL (w=1)``: ``imsm-bench``'s self-distillation baseline (the frozen logits on the anchors computed once,
  under ``disable_adapter()``, as IMSM computes its frozen side once);
* ``... (every k)``: the anchor term on every k-th step only, weighted k x there (``AnchorConfig.every``); the figure
  is the mean over k consecutive steps (one anchored, k - 1 not), medians over the timed runs of k steps;
* ``LoRA + retrofit [gate] (whole run)``: no training step of its own: the LoRA trained as above for the benchmark's
  step count, then retrofitted as ``imsm-bench``'s retrofit rows do (``retrofit()`` + ``train_gate`` on stored
  states: anchor sampling, the stored pass, gate training; timed once, after the steps). Its figure is the whole
  run per LoRA step, ``(steps x LoRA's step + retrofit seconds) / steps`` (``--no-retrofit`` leaves it out).

    python benchmarks/anchored_cost.py [--steps 32] [--threads 1] [--every 4] [--no-retrofit] [--whole-run]
    python benchmarks/anchored_cost.py --model <SmolLM2 folder or GGUF> --steps 8   # imsm-bench --protocol real's step

``--whole-run`` also gives each method's whole training run of the benchmark's step count (50 with ``--model``, 200
without) in process CPU time (one thread: the compute itself, whatever else runs on the machine): the setup (self
anchors sampled by ``prepare_anchors``; LoRA + anchor KL's frozen anchor logits), the first period of steps, timed
alone because it holds the one-off work (the anchors' frozen pass and cached query summaries, lazy initialisation),
and the median period's CPU time for the other steps. The ratio is to LoRA's whole run, computed the same way.

With ``--model``, self anchors are whole chat prompts (``AnchorConfig.from_tokenizer``'s).

The anchors are sampled before the timed steps (as ``prepare_anchors`` does before training).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from typing import Any

import torch

import peft_imsm
from imsm_bench import TARGET_TASK, load_skills_lm, make_examples
from imsm_bench.batching import collate, encode_examples
from imsm_bench.loading import load_model
from imsm_bench.options import parse_args, settings_from
from imsm_bench.real import REAL_SETTINGS, tag_examples
from imsm_bench.runner import (
    FinetuneSettings,
    Method,
    SelfDistillation,
    anchored_methods,
    build_model,
    retrofit_lora,
    retrofit_methods,
    routed_methods,
    training_loss,
)
from peft_imsm.anchors import chat_end_tokens, chat_start_tokens

_ANCHORED = {m.name: m for m in anchored_methods((1.0,)) + routed_methods((1.0,))}  # the benchmark's rows
METHODS = [
    Method("LoRA", "lora"),
    Method("IMSM", "imsm"),
    _ANCHORED["IMSM + self anchors [gate] (w=1)"],
    _ANCHORED["IMSM + self anchors [gate+adapter] (w=1)"],
    _ANCHORED["IMSM w/o gate + self anchors [adapter] (w=1)"],
    _ANCHORED["IMSM route gate + self anchors [gate+adapter] (w=1)"],
    _ANCHORED["IMSM route gate + self anchors [gate] (w=1)"],
    _ANCHORED["LoRA + anchor KL (w=1)"],
]


def with_every(methods: list[Method], every: int) -> list[Method]:
    """The anchored methods again, named ``... (every k)``, with ``extra["every"] = k``."""
    return [
        dataclasses.replace(m, name=f"{m.name} (every {every})", extra={**m.extra, "every": every})
        for m in methods
        if m.anchor_weight is not None
    ]


class Trainee:
    def __init__(self, method: Method, settings: FinetuneSettings, base: Any, tokenizer: Any) -> None:
        base, self.tokenizer = copy.deepcopy(base), tokenizer
        self.method = method
        self.every = method.extra.get("every", 1)
        settings = dataclasses.replace(settings, anchor_every=self.every)
        self.model = build_model(base, method, settings, seed=0)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=0.0)
        self.settings = settings
        self.distill = None
        setup = time.process_time()
        if method.kind == "imsm" and method.anchor_weight is not None:
            peft_imsm.prepare_anchors(self.model)
        elif method.anchor_weight is not None:
            self.distill = SelfDistillation(self.model, method, settings, seed=0, device=torch.device("cpu"))
        self.setup_cpu = time.process_time() - setup
        self.steps = 0
        self.step_cpu: list[float] = []

    def step(self, batch: dict) -> float:
        start, cpu = time.perf_counter(), time.process_time()
        loss, _ = training_loss(self.model, batch, self.distill, self.steps)
        self.steps += 1
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_cpu.append(time.process_time() - cpu)
        return time.perf_counter() - start

    def whole_run_cpu(self, steps: int) -> float:
        """CPU seconds of a run of ``steps`` steps: setup, the first (warm-up) period, then median periods."""
        first = sum(self.step_cpu[: self.every])
        periods = [sum(self.step_cpu[i : i + self.every]) for i in range(self.every, len(self.step_cpu), self.every)]
        return self.setup_cpu + first + (steps - self.every) / self.every * statistics.median(periods)

    def period(self, batches: list[dict], first: int) -> float:
        """Mean seconds per step over ``every`` consecutive steps (one of them anchored)."""
        return sum(self.step(batches[(first + i) % len(batches)]) for i in range(self.every)) / self.every


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=32, help="timed steps per method")
    parser.add_argument("--every", type=int, default=4, help="also time the anchored methods with AnchorConfig.every")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the rows (LoRA is always timed)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-retrofit", action="store_true", help="leave out the retrofit's whole-run row")
    parser.add_argument(
        "--whole-run", action="store_true",
        help="also each method's whole training run of the benchmark's step count, in process CPU time",
    )  # fmt: skip
    parser.add_argument(
        "--model", default=None,
        help="a real model (HF folder or GGUF, as imsm-bench --model): the training step of imsm-bench --protocol "
        "real instead of the default run's",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:  # imsm-bench --protocol real: the tag task, chat template, anchors from the user turn
        bench_args = parse_args(["--model", args.model, "--protocol", "real", "--no-progress"])
        base, tokenizer = load_model(bench_args)
        settings = settings_from(bench_args, **REAL_SETTINGS)
        examples = max(4 * settings.batch_size, settings.retrofit_examples)
        train = encode_examples(tokenizer, tag_examples(examples, "train", 0), settings.max_length, chat=True)
        start_tokens, end_tokens = chat_start_tokens(tokenizer), chat_end_tokens(tokenizer)
        setting = f"{args.model}, --protocol real"
    else:
        base, tokenizer = load_skills_lm()
        settings = FinetuneSettings(target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16, lr=2e-3)  # default run
        examples = max(4 * settings.batch_size, settings.retrofit_examples)
        train = encode_examples(tokenizer, make_examples(TARGET_TASK, examples, 0, "train"), 64)
        start_tokens = end_tokens = None
        setting = "skills LM"
    # timed steps cycle through 4 batches of the first examples; the retrofit takes its sample from all of them
    batches = [
        collate(train[i : i + settings.batch_size], tokenizer.pad_token_id)
        for i in range(0, 4 * settings.batch_size, settings.batch_size)
    ]
    methods = METHODS + (with_every(METHODS, args.every) if args.every > 1 else [])
    if args.methods:
        wanted = {"LoRA", *(name.strip() for name in args.methods.split(","))}
        unknown = wanted - {m.name for m in methods}
        if unknown:
            raise SystemExit(f"error: unknown method(s) {sorted(unknown)}; known: {[m.name for m in methods]}")
        methods = [m for m in methods if m.name in wanted]
    anchors = {"start_tokens": start_tokens, "end_tokens": end_tokens}
    methods = [dataclasses.replace(m, extra={**m.extra, **anchors}) for m in methods]
    trainees = [Trainee(m, settings, base, tokenizer) for m in methods]
    for t in trainees:  # warm-up
        t.period(batches, 0)
    times: dict[str, list[float]] = {t.method.name: [] for t in trainees}
    for step in range(0, args.steps, args.every):
        for t in trainees:
            for k in range(0, args.every, t.every):
                times[t.method.name].append(t.period(batches, step + k))
    lora = statistics.median(times["LoRA"]) * 1e3
    if not args.no_retrofit:  # the retrofit of the LoRA just trained, as imsm-bench derives it (see the docstring)
        method = retrofit_methods((1.0,))[0]
        method.extra.update(anchors)
        lora_model = next(t for t in trainees if t.method.name == "LoRA").model
        _, log = retrofit_lora(copy.deepcopy(lora_model), tokenizer, train, settings, 0, method)
        name = f"LoRA + retrofit [gate] (whole run of {settings.steps} steps)"
        times[name] = [(settings.steps * lora / 1e3 + log.seconds_total) / settings.steps]
    print(f"{setting}, batch {settings.batch_size}, anchors {settings.anchor_batch_size} (route gate {settings.route_anchor_batch_size}) x "
          f"{settings.anchor_length} new tokens, {args.steps} interleaved steps, threads={torch.get_num_threads()}")  # fmt: skip
    width = max(len(name) for name in times) + 2
    print(f"{'method':<{width}}{'ms/step':>10}{'x LoRA':>9}")
    for name, values in times.items():
        ms = statistics.median(values) * 1e3
        print(f"{name:<{width}}{ms:>10.1f}{ms / lora:>8.2f}x")
    if args.whole_run:
        whole = {t.method.name: (t.setup_cpu, t.whole_run_cpu(settings.steps)) for t in trainees}
        print(f"\nwhole run of {settings.steps} steps, process CPU seconds (setup: anchor sampling, frozen logits)")
        print(f"{'method':<{width}}{'setup s':>9}{'run s':>9}{'x LoRA':>9}")
        for name, (setup, seconds) in whole.items():
            print(f"{name:<{width}}{setup:>9.1f}{seconds:>9.1f}{seconds / whole['LoRA'][1]:>8.2f}x")


if __name__ == "__main__":
    main()
