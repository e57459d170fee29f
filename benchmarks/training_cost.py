"""Training step time and peak memory of IMSM versus plain peft LoRA, measured side by side in one run.

Model: the ~60M-parameter Llama of ``generation_speed.py`` (random weights: cost does not depend on them), LoRA r=16
on all linear layers, batch 4 x 128 tokens, the first half of each row the prompt (labels -100 there), AdamW. One
training step = forward (with labels) + backward + ``optimizer.step()`` + ``zero_grad(set_to_none=True)``. Settings:

* ``fp32``:  plain float32.
* ``gc``:    float32 with gradient checkpointing (``gradient_checkpointing_enable(gradient_checkpointing_kwargs=
  {"use_reentrant": False})`` and ``enable_input_require_grads()`` on the base model before wrapping).
* ``qlora``: base saved in float32 and reloaded in 4-bit NF4 with double quantization (bitsandbytes, float32
  compute), then ``prepare_model_for_kbit_training`` (gradient checkpointing on, non-reentrant). bitsandbytes' CPU
  4-bit path can be slow, so on CPU it runs fewer steps (``--qlora-steps``, 8 by default on CPU).

    python benchmarks/training_cost.py [--steps 15] [--qlora-steps 8] [--threads 1] [--device cpu|cuda] [--profile]
        [--json out.json] [--model PATH] [--imsm plain|route] [--generate]

``--model``: a real model instead of the random ~60M Llama (a Hugging Face folder, hub id, or a GGUF file or a
folder holding one, converted once as ``imsm-bench --model`` does), in float32; the batch draws random ids from its
vocabulary. ``--imsm``: ``plain`` (default), ``IMSMConfig(adapter_config=lora)``, the paper's gate without anchors;
``route``, the recommended setting, ``IMSMConfig(adapter_config=lora, gate_mode="route",
anchor=AnchorConfig.from_tokenizer(tokenizer))`` (self anchors that are whole chat prompts; from BOS without a
tokenizer), its anchors sampled before the first step as ``prepare_anchors`` does. With ``route`` both models' memory
is traced over one anchor period (``AnchorConfig.every`` steps, the first of them anchored) instead of one step, so
that the anchor term and its cached frozen states are inside the trace. ``--generate`` also measures ``generate()``
(``--gen-batch`` prompts of ``--gen-prompt`` random tokens, ``--gen-new`` new tokens, greedy, no early stop): the
parameters and buffers plus the high-water mark of what ``generate()`` allocates.

CPU threads: 1 by default on CPU. When other processes compete for the cores, two OpenMP threads made single steps
vary up to 8x (a thread spins at each barrier while its sibling is descheduled), in process CPU time as well as wall
time; one thread gave steps within ~2% of each other. Both models run the same kernels, so the IMSM/LoRA ratios do not
depend on it. ``--threads 0`` keeps torch's default.

Step time: after one untimed step per model (the memory-traced one, which is also the warm-up), LoRA and IMSM steps
are interleaved (LoRA, IMSM, LoRA, IMSM, ...) and the median wall time is reported, so machine noise hits both alike;
on CPU the ratio of median process CPU times is printed too (steadier on busy cores).

Peak memory: see ``step_peak_bytes``; the same definition on CPU and CUDA: the model's own parameters, buffers,
quantization state and AdamW state, plus the high-water mark of everything allocated during one training step.

``--profile`` then profiles a few IMSM steps (setting ``--profile-setting``, fp32 by default): a breakdown of the step
(frozen view, adapted view, gate, head + loss, backward, optimizer) next to plain LoRA's, and ``torch.profiler``'s top
ops by self time (see ``Breakdown``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # keep the profiler's start/stop log lines out of the table

import torch  # noqa: E402
from bench_model import CONFIG  # noqa: E402  (benchmarks/bench_model.py)
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)
from transformers.utils import logging as hf_logging  # noqa: E402

import peft_imsm  # noqa: E402

PLAIN, ROUTE = "plain", "route"
SETTINGS = {
    "fp32": "fp32",
    "gc": "fp32 + grad ckpt",
    "qlora": "QLoRA nf4 + grad ckpt",
}
KINDS = ("lora", "imsm")
BUDGET_TIME, BUDGET_MEMORY = 1.4, 1.10  # the cost users judge IMSM by, relative to LoRA
MB = 2**20
# transformers 5 renamed gradient checkpointing to "activation checkpointing"; the old names still work.
warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*", category=FutureWarning)


# ----------------------------------------------------------------------------------------------------- models
def build_base(setting: str, device: str, workdir: Path, model_path: str | None = None) -> PreTrainedModel:
    """The base model of ``setting``: the random ~60M Llama, or ``model_path`` (a converted folder) in float32."""
    torch.manual_seed(0)
    if model_path is None:
        model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    elif setting != "qlora":
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if setting == "qlora":
        from transformers import BitsAndBytesConfig

        path = Path(model_path) if model_path is not None else workdir / "base-fp32"
        if not path.exists():
            model.save_pretrained(path)
            del model
        bnb = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=bnb, dtype=torch.float32, device_map={"": device}
        )
        model.config.use_cache = False
        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    model.to(device)
    if setting == "gc":
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


@dataclass
class Source:
    """What the models are built from: ``model_path`` (None: the random ~60M Llama) and its tokenizer, and which
    IMSM setting (``imsm``: :data:`PLAIN` or :data:`ROUTE`)."""

    model_path: str | None = None
    tokenizer: Any = None
    imsm: str = PLAIN

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer) if self.tokenizer is not None else CONFIG["vocab_size"]


def imsm_config(lora: LoraConfig, source: Source) -> peft_imsm.IMSMConfig:
    """The paper's IMSM around ``lora`` (``plain``), or the recommended setting (``route``): the route gate with self
    anchors that are whole chat prompts (from BOS without a tokenizer)."""
    if source.imsm == PLAIN:
        return peft_imsm.IMSMConfig(adapter_config=lora)
    tokenizer = source.tokenizer
    anchor = peft_imsm.AnchorConfig.from_tokenizer(tokenizer) if tokenizer is not None else peft_imsm.AnchorConfig()
    return peft_imsm.IMSMConfig(adapter_config=lora, gate_mode="route", anchor=anchor)


class Trainee:
    """A peft model (LoRA or IMSM-wrapped LoRA) and its AdamW optimizer. ``period``: the steps of one anchor period
    of the IMSM setting (``AnchorConfig.every`` with anchors, else 1), which the memory trace covers for both kinds."""

    def __init__(
        self, kind: str, setting: str, device: str, workdir: Path, lr: float, source: Source | None = None
    ) -> None:
        self.kind = kind
        source = source or Source()
        lora = LoraConfig(r=16, lora_alpha=16, target_modules="all-linear")
        imsm = imsm_config(lora, source)
        self.model = get_peft_model(
            build_base(setting, device, workdir, source.model_path), imsm if kind == "imsm" else lora
        )
        self.period = imsm.anchor.every if imsm.anchor is not None else 1  # (the same for LoRA, for a like trace)
        if kind == "imsm" and imsm.anchor is not None:
            peft_imsm.prepare_anchors(self.model)  # sampled now, outside the traced and timed steps
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr)
        # Create AdamW's state now (one step on zero gradients at lr=0: the weights do not change), so that the
        # first training step, whose allocations are traced for the peak memory, already runs in the steady state.
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.params)

    def step(self, batch: dict, timer: Breakdown | None = None) -> tuple[float, float]:
        """One training step; returns its wall time and the process's CPU time (all threads), in seconds."""
        device = batch["input_ids"].device
        timer = timer or Breakdown.NONE
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        with timer.span("forward (model(...) total)"):
            loss = self.model(**batch).loss
        with timer.span("backward"):
            loss.backward()
        with timer.span("optimizer step + zero_grad"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - start, time.process_time() - cpu_start


def make_batch(batch: int, seq: int, device: str, vocab_size: int = CONFIG["vocab_size"]) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab_size, (batch, seq), generator=gen)
    labels = ids.clone()
    labels[:, : seq // 2] = -100  # the prompt: unsupervised, IMSM's query
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
    }


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------------ memory
def static_bytes(trainee: Trainee) -> int:
    """Bytes of the model's parameters, buffers, bitsandbytes quantization state and optimizer state.

    Counted once per storage (tied or shared tensors are not counted twice). Gradients are not here: they are None
    between steps (``zero_grad(set_to_none=True)``) and are counted as they are allocated during the step.
    """
    return sum(_storages(trainee.model, trainee.optimizer).values())


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters, buffers and bitsandbytes quantization state (no optimizer)."""
    return sum(_storages(model, None).values())


def _storages(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[tuple[str, int], int]:
    seen: dict[tuple[str, int], int] = {}

    def add(t: object) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[(str(t.device), storage.data_ptr())] = storage.nbytes()

    for t in (*model.parameters(), *model.buffers()):
        add(t)
    for p in model.parameters():
        stack, visited = [getattr(p, "quant_state", None)], set()
        while stack:  # bitsandbytes QuantState: absmax, code, offset and the nested state2 of double quantization
            qs = stack.pop()
            if qs is None or id(qs) in visited:
                continue
            visited.add(id(qs))
            for value in vars(qs).values():
                add(value)
                if type(value).__name__ == "QuantState":
                    stack.append(value)
    for state in optimizer.state.values() if optimizer is not None else ():
        for value in state.values():
            add(value)
    return seen


def step_peak_bytes(trainee: Trainee, batch: dict) -> int:
    """High-water mark of the bytes allocated during one training step (``trainee.period`` steps: one anchor period),
    above what was live when it began.

    CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus ``memory_allocated()`` at
    the start. CPU: the same quantity from the CPU allocator's own trace: ``torch.profiler`` with
    ``profile_memory=True`` records every allocation and free made through torch's CPU allocator (size and address);
    the running sum of the blocks allocated during the step, in time order, gives the live bytes at every moment, and
    its maximum is the peak. Deterministic (allocation sizes do not depend on timing) and it includes everything a
    GPU allocator would see: saved activations, transient intermediates (also the frozen view's, and recomputation
    under gradient checkpointing), logits, gradients, AdamW's temporaries.
    """

    def steps() -> None:
        for _ in range(trainee.period):
            trainee.step(batch)

    return traced_peak_bytes(steps, batch["input_ids"].device)


def generate_peak_bytes(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[int, int]:
    """(parameters + buffers, that + the high-water mark of what one greedy ``generate()`` of ``new_tokens`` tokens
    on the prompts ``ids`` allocates), in eval mode."""
    model.eval()
    mask = torch.ones_like(ids)

    def run() -> None:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=0)  # fmt: skip

    run()  # warm-up (lazy initialisations are not the step's)
    peak = traced_peak_bytes(run, ids.device)
    model.train()
    static = model_bytes(model)
    return static, static + peak


def traced_peak_bytes(fn: Any, device: torch.device) -> int:
    """High-water mark of the bytes allocated while ``fn()`` runs, above what was live when it began (CUDA: the
    allocator's peak; CPU: the CPU allocator's trace, see :func:`step_peak_bytes`)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        return torch.cuda.max_memory_allocated(device) - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        fields = event.typed
        if type(fields[1]).__name__ == "_ExtraFields_Allocation" and fields[1].device.type == "cpu":
            events.append((event.start_time_ns, fields[1].ptr, fields[1].alloc_size))
        stack.extend(event.children)
    live, current, peak = {}, 0, 0
    for _, ptr, size in sorted(events, key=lambda e: e[0]):
        if size > 0:
            live[ptr] = size
            current += size
            peak = max(peak, current)
        elif ptr in live:  # frees of blocks allocated before the step are already outside the count
            current -= live.pop(ptr)
    return peak


def peak_bytes(trainee: Trainee, batch: dict) -> tuple[int, int]:
    """(static bytes, static + step peak): the peak memory of training this model alone."""
    static = static_bytes(trainee)
    return static, static + step_peak_bytes(trainee, batch)


# ----------------------------------------------------------------------------------------------------- profile
class Breakdown:
    """Wall time of the parts of a training step, from forward hooks on the backbone (``get_decoder()``).

    IMSM hooks the same backbone: its forward pre-hook runs the FROZEN view by calling the backbone again under
    ``torch.no_grad()``; then the backbone runs as the ADAPTED view; then IMSM's forward hook computes the gate and
    interweaves the two views. This class adds, without touching the package:

    * a forward pre-hook registered after IMSM's (so it fires inside IMSM's pre-hook for the nested frozen call, and
      after it for the adapted call): starts "frozen view" when autograd is off, "adapted view" when it is on;
    * a forward hook prepended before IMSM's: ends that span (and starts "gate + interweave" for the adapted call);
    * a forward hook appended after IMSM's: ends "gate + interweave".

    What is left of ``model(...)`` is the output head, the loss and IMSM's query indexing. Each span is also a
    ``torch.profiler.record_function`` range, so it shows in the profiler trace. Spans synchronize CUDA at their ends.
    """

    NONE: Breakdown

    def __init__(self, trainee: Trainee | None) -> None:
        self.times: dict[str, list[float]] = {}
        self.open: dict[str, tuple[float, record_function]] = {}
        self.handles = []
        self.device = None
        if trainee is None:
            return
        self.imsm = trainee.kind == "imsm"
        backbone = trainee.model.get_base_model().get_decoder()
        self.device = next(backbone.parameters()).device
        self.handles = [
            backbone.register_forward_pre_hook(self._pre),
            backbone.register_forward_hook(self._post_first, prepend=True),
            backbone.register_forward_hook(self._post_last),
        ]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def begin(self, name: str) -> None:
        if self.device is None:
            return
        _sync(self.device)
        rf = record_function(f"bench::{name}")
        rf.__enter__()
        self.open[name] = (time.perf_counter(), rf)

    def end(self, name: str) -> None:
        if name not in self.open:
            return
        _sync(self.device)
        start, rf = self.open.pop(name)
        rf.__exit__(None, None, None)
        self.times.setdefault(name, []).append(time.perf_counter() - start)

    @contextmanager
    def span(self, name: str):
        self.begin(name)
        try:
            yield
        finally:
            self.end(name)

    def _view(self) -> str:
        return "adapted view (backbone)" if torch.is_grad_enabled() else "frozen view (backbone, no_grad)"

    def _pre(self, module, args):
        self.begin(self._view())

    def _post_first(self, module, args, output):
        self.end(self._view())
        if self.imsm and torch.is_grad_enabled():
            self.begin("gate + interweave")

    def _post_last(self, module, args, output):
        self.end("gate + interweave")

    def medians(self) -> dict[str, float]:
        med = {k: statistics.median(v) for k, v in self.times.items()}
        forward = med.get("forward (model(...) total)", 0.0)
        parts = ("frozen view (backbone, no_grad)", "adapted view (backbone)", "gate + interweave")
        med["head + loss + other"] = forward - sum(med.get(p, 0.0) for p in parts)
        return med


Breakdown.NONE = Breakdown(None)

ROWS = (
    "frozen view (backbone, no_grad)",
    "adapted view (backbone)",
    "gate + interweave",
    "head + loss + other",
    "forward (model(...) total)",
    "backward",
    "optimizer step + zero_grad",
)


def run_profile(setting: str, trainees: dict[str, Trainee], batch: dict, steps: int, top: int) -> dict:
    device = batch["input_ids"].device
    print(f"\n=== profile: {SETTINGS[setting]}, {steps} steps each ===")
    print(
        "Method: forward hooks on the backbone (model.get_base_model().get_decoder()) time the nested frozen-view\n"
        "call IMSM makes from its pre-hook (autograd off), the adapted backbone call (autograd on) and IMSM's\n"
        "post-hook (gate + interweave); 'head + loss + other' is the rest of model(...). The same hooks on the\n"
        "plain LoRA model give its adapted-backbone time. Interleaved steps, medians, no profiler attached; then\n"
        "torch.profiler on the IMSM steps only for the top ops (self time; the bench:: rows are the spans above)."
    )
    timers = {kind: Breakdown(t) for kind, t in trainees.items()}
    for _ in range(steps):
        for kind, t in trainees.items():
            timers[kind].times.setdefault("step", []).append(t.step(batch, timers[kind])[0])
    medians = {kind: timer.medians() for kind, timer in timers.items()}
    for timer in timers.values():
        timer.remove()
    print(f"{'ms (median)':<34}{'LoRA':>10}{'IMSM':>10}{'IMSM-LoRA':>11}")
    for row in (*ROWS, "step"):
        lora, imsm = medians["lora"].get(row, 0.0) * 1e3, medians["imsm"].get(row, 0.0) * 1e3
        print(f"{row:<34}{lora:>10.1f}{imsm:>10.1f}{imsm - lora:>+11.1f}")
    extra = (medians["imsm"]["step"] - medians["lora"]["step"]) * 1e3
    for row in ("frozen view (backbone, no_grad)", "gate + interweave") if extra > 0 else ():
        print(f"  {row}: {medians['imsm'][row] * 1e3:.1f} ms = {medians['imsm'][row] * 1e3 / extra:.0%} of IMSM's "
              f"extra {extra:.1f} ms/step")  # fmt: skip

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    timer = Breakdown(trainees["imsm"])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainees["imsm"].step(batch, timer)
    timer.remove()
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    print(f"\ntop {top} ops of {steps} IMSM steps by {sort_by}:")
    table = averages.table(sort_by=sort_by, row_limit=top, max_name_column_width=48)
    print(table)
    spans = {e.key: e.cpu_time_total / 1e3 / steps for e in averages if e.key.startswith("bench::")}
    print("profiled spans (ms/step, CPU time incl. profiler overhead): "
          + ", ".join(f"{k[7:]} {v:.1f}" for k, v in spans.items()))  # fmt: skip
    return {"medians_ms": {k: {r: v * 1e3 for r, v in m.items()} for k, m in medians.items()}, "spans_ms": spans}


# -------------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per model (fp32, gc)")
    parser.add_argument("--qlora-steps", type=int, default=None, help="timed steps for qlora (default: 8 on CPU)")
    parser.add_argument("--warmup", type=int, default=0, help="extra untimed steps after the memory-traced one")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--settings", default="fp32,gc,qlora")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: 1 on CPU; 0: torch's default)"
    )
    parser.add_argument("--profile", action="store_true", help="then profile a few IMSM steps")
    parser.add_argument("--profile-setting", default="fp32", choices=list(SETTINGS))
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=15, help="rows of the profiler's op table")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--model", default=None,
        help="a real model (HF folder, hub id, or GGUF file / folder, converted once as imsm-bench --model does) "
        "instead of the random ~60M Llama",
    )  # fmt: skip
    parser.add_argument("--cache-dir", default=None, help="where converted GGUF models are cached (as imsm-bench)")
    parser.add_argument(
        "--imsm", choices=[PLAIN, ROUTE], default=PLAIN,
        help="plain: IMSMConfig(adapter_config=lora), the paper's gate; route: the recommended setting (the route "
        "gate, self anchors from AnchorConfig.from_tokenizer)",
    )  # fmt: skip
    parser.add_argument("--generate", action="store_true", help="also measure generate()'s peak memory")
    parser.add_argument("--gen-batch", type=int, default=4, help="prompts per generate() call")
    parser.add_argument("--gen-prompt", type=int, default=64, help="tokens per prompt")
    parser.add_argument("--gen-new", type=int, default=64, help="new tokens per prompt")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    settings = [s for s in args.settings.split(",") if s]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    on_cpu = torch.device(args.device).type == "cpu"
    qlora_steps = args.qlora_steps or (8 if on_cpu else args.steps)
    threads = args.threads if args.threads is not None else (1 if on_cpu else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    source = Source(imsm=args.imsm)
    if args.model:
        from transformers import AutoTokenizer

        from imsm_bench.gguf import resolve_model_path

        source.model_path = resolve_model_path(args.model, cache_root=args.cache_dir, progress=False)
        source.tokenizer = AutoTokenizer.from_pretrained(source.model_path)
        described = f"{args.model} (float32)"
    else:
        described = f"Llama ~60M params ({CONFIG['num_hidden_layers']} layers, d={CONFIG['hidden_size']})"
    batch = make_batch(args.batch, args.seq, args.device, source.vocab_size)
    imsm = "IMSMConfig(adapter_config=lora)" if args.imsm == PLAIN else "the route gate with self anchors"
    print(f"model: {described}, LoRA r=16 all-linear, IMSM: {imsm}, AdamW, batch {args.batch} x {args.seq} (first "
          f"half prompt), device={args.device}, threads={torch.get_num_threads()}")  # fmt: skip
    mem_method = "CPU allocator trace (torch.profiler)" if on_cpu else "torch.cuda.max_memory_allocated"
    traced = "one step" if args.imsm == PLAIN else "one anchor period (AnchorConfig.every steps, the first anchored)"
    print(f"peak memory = parameters + buffers + quant state + AdamW state + high-water mark of the bytes allocated "
          f"during {traced} [{mem_method}]", flush=True)  # fmt: skip
    results: dict = {"device": args.device, "threads": torch.get_num_threads(), "batch": args.batch,
                     "seq": args.seq, "model": args.model, "imsm": args.imsm, "rows": []}  # fmt: skip
    prompts = make_batch(args.gen_batch, args.gen_prompt, args.device, source.vocab_size)["input_ids"]
    keep = None
    with tempfile.TemporaryDirectory() as tmp:
        for setting in settings:
            steps = qlora_steps if setting == "qlora" else args.steps
            trainees = {kind: Trainee(kind, setting, args.device, Path(tmp), args.lr, source) for kind in KINDS}
            # The first step (anchor period) of each model is traced for memory and is also its warm-up (not timed).
            memory = {kind: peak_bytes(t, batch) for kind, t in trainees.items()}
            generate = {}
            if args.generate:
                generate = {kind: generate_peak_bytes(t.model, prompts, args.gen_new) for kind, t in trainees.items()}
            for _ in range(args.warmup):
                for t in trainees.values():
                    t.step(batch)
            wall: dict[str, list[float]] = {kind: [] for kind in KINDS}
            cpu: dict[str, list[float]] = {kind: [] for kind in KINDS}
            for _ in range(steps):
                for kind, t in trainees.items():
                    w, c = t.step(batch)
                    wall[kind].append(w)
                    cpu[kind].append(c)
            ms = {kind: statistics.median(v) * 1e3 for kind, v in wall.items()}
            cpu_ms = {kind: statistics.median(v) * 1e3 for kind, v in cpu.items()}
            peak = {kind: memory[kind][1] / MB for kind in KINDS}
            results["rows"].append({
                "setting": setting, "steps": steps, "lora_ms": ms["lora"], "imsm_ms": ms["imsm"],
                "time_ratio": ms["imsm"] / ms["lora"], "lora_peak_mb": peak["lora"], "imsm_peak_mb": peak["imsm"],
                "memory_ratio": peak["imsm"] / peak["lora"], "static_mb": {k: memory[k][0] / MB for k in KINDS},
                "lora_cpu_ms": cpu_ms["lora"], "imsm_cpu_ms": cpu_ms["imsm"],
                "cpu_ratio": cpu_ms["imsm"] / cpu_ms["lora"],
                "trainable": {k: trainees[k].trainable for k in KINDS}, "wall_s": wall, "cpu_s": cpu,
                "traced_steps": {k: trainees[k].period for k in KINDS},
            })  # fmt: skip
            if generate:
                results["rows"][-1].update({
                    "generate": {"batch": args.gen_batch, "prompt": args.gen_prompt, "new": args.gen_new},
                    "lora_generate_peak_mb": generate["lora"][1] / MB, "imsm_generate_peak_mb": generate["imsm"][1] / MB,
                    "generate_memory_ratio": generate["imsm"][1] / generate["lora"][1],
                    "generate_static_mb": {k: generate[k][0] / MB for k in KINDS},
                })  # fmt: skip
            print(f"  done {SETTINGS[setting]}: static MB (params, buffers, quant state, AdamW state) LoRA "
                  f"{memory['lora'][0] / MB:.1f} / IMSM {memory['imsm'][0] / MB:.1f}; trainable params LoRA "
                  f"{trainees['lora'].trainable:,} / IMSM {trainees['imsm'].trainable:,}", flush=True)  # fmt: skip
            if args.profile and setting == args.profile_setting:
                keep = trainees  # reused (already warm) by the profile below
            del trainees
            gc.collect()
            if not on_cpu:
                torch.cuda.empty_cache()

        print(f"\nbudgets: IMSM/LoRA step time <= {BUDGET_TIME}x, peak memory <= {BUDGET_MEMORY:.2f}x "
              f"(step time: median of interleaved steps; !! = over the budget)")  # fmt: skip
        header = (f"{'setting':<23}{'steps':>6}{'LoRA ms':>10}{'IMSM ms':>10}{'ratio':>8}   "
                  f"{'LoRA MB':>9}{'IMSM MB':>9}{'ratio':>8}")  # fmt: skip
        print(header)
        print("-" * len(header))
        for r in results["rows"]:
            t_ok = "ok" if r["time_ratio"] <= BUDGET_TIME else "!!"
            m_ok = "ok" if r["memory_ratio"] <= BUDGET_MEMORY else "!!"
            print(f"{SETTINGS[r['setting']]:<23}{r['steps']:>6}{r['lora_ms']:>10.1f}{r['imsm_ms']:>10.1f}"
                  f"{r['time_ratio']:>7.2f}x{t_ok:>3}{r['lora_peak_mb']:>9.1f}{r['imsm_peak_mb']:>9.1f}"
                  f"{r['memory_ratio']:>7.3f}x{m_ok:>3}")  # fmt: skip
        for r in results["rows"]:
            if "generate" in r:
                g = r["generate"]
                print(f"generate() ({SETTINGS[r['setting']]}; {g['batch']} prompts x {g['prompt']} tokens, {g['new']} "
                      f"new): peak MB LoRA {r['lora_generate_peak_mb']:.1f} / IMSM {r['imsm_generate_peak_mb']:.1f} "
                      f"= {r['generate_memory_ratio']:.3f}x")  # fmt: skip
        if on_cpu:
            print("IMSM/LoRA by median process CPU time per step (all threads; less sensitive to other load on a "
                  "shared machine): " + ", ".join(f"{SETTINGS[r['setting']]} {r['cpu_ratio']:.2f}x"
                                                  for r in results["rows"]), flush=True)  # fmt: skip

        if args.profile:
            if keep is None:
                keep = {kind: Trainee(kind, args.profile_setting, args.device, Path(tmp), args.lr) for kind in KINDS}
                for t in keep.values():
                    t.step(batch)
            results["profile"] = run_profile(args.profile_setting, keep, batch, args.profile_steps, args.top)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
