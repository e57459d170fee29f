"""The skills LM of the default benchmark: a small Llama pretrained from scratch on the MIXTURE tasks; shipped, or built.

The benchmark runs on a FIXED pretrained model that ships with the package (``imsm_bench/skills_lm/``, 4 MB of
safetensors plus its tokenizer and ``build_info.json``), so every machine fine-tunes the same weights:
:func:`load_or_build_skills_model` returns that copy for the default settings. Pretraining on the user's machine
(``imsm-bench --rebuild``, other ``--pretrain-steps``, tests with tiny configs) is a plain torch loop on CPU from a
fixed seed: AdamW with warmup + cosine decay, batches of fresh ``train``-split examples drawn from the mixture
(:mod:`imsm_bench.skills`), cross-entropy on the ANSWER tokens only (the answer characters and the final eos; the
bos and prompt characters are masked with -100). A build is saved with ``save_pretrained`` (model and tokenizer) into
a cache folder keyed by a hash of the config, the training recipe, the seed and ``CODE_VERSION``.

A build always runs on ONE thread (the weights depend on the thread count: float sums in another order). It is
bit-for-bit repeatable on one machine, but float kernels differ between CPUs (vector width, MKL / oneDNN code paths),
and a few thousand pretraining steps turn those last-bit differences into another model: that is why the benchmark
ships its model instead of building it. ``skills_lm/build_info.json`` records the build (key, recipe, float kernels,
weights' SHA-256); its scores are the "base model" row of ``docs/benchmarks.md``.
"""

import copy
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from peft_imsm.backbone import model_device

from .batching import collate, encode_examples
from .skills import MIXTURE_TASKS, VOCAB_SIZE, build_tokenizer, make_examples, sample_example

CODE_VERSION: str = "1"  # bump when the world (skills.py) or the training loop changes in a way the hash can't see
CACHE_ENV_VAR: str = "PEFT_IMSM_CACHE"
DEFAULT_CACHE_ROOT: str = os.path.join(os.path.expanduser("~"), ".cache", "peft_imsm")
#: The pretrained skills LM that ships with the package (default config, recipe and seed).
SHIPPED_MODEL_DIR: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "skills_lm")

SKILLS_MODEL_CONFIG = LlamaConfig(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


@dataclass(frozen=True)
class TrainRecipe:
    """Hyper-parameters of the pretraining loop (part of the cache key)."""

    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    min_lr_ratio: float = 0.05
    task_weights: tuple[float, ...] = (1.0, 4.0, 2.0, 1.0)  # sampling weights, aligned with MIXTURE_TASKS


DEFAULT_RECIPE = TrainRecipe()


# ---------------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------------
def encode_batch(tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Left-pad ``<bos> prompt answer <eos>`` sequences, with labels on the answer and eos only.

    Args:
        tokenizer: the skills tokenizer (its ``__call__`` adds exactly one bos in front).
        pairs: B ``(prompt, answer)`` strings.

    Returns:
        ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long, ``position_ids`` (B, T) long (0 on padding, then
        0, 1, ... on the real tokens, as ``generate`` computes them), ``labels`` (B, T) long with -100 on padding,
        bos and prompt.
    """
    rows = [{"input": prompt, "output": answer} for prompt, answer in pairs]
    batch = collate(encode_examples(tokenizer, rows, max_length=2**31), tokenizer.pad_token_id)
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return batch


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def train_skills_model(
    config: LlamaConfig,
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
    recipe: TrainRecipe = DEFAULT_RECIPE,
    tasks: tuple[str, ...] = MIXTURE_TASKS,
    progress: bool = True,
) -> LlamaForCausalLM:
    """Train a fresh ``LlamaForCausalLM(config)`` on ``tasks`` (train split) from ``seed``; deterministic on CPU
    for a fixed thread count. Returns the model in eval mode."""
    if len(recipe.task_weights) != len(tasks):
        raise ValueError(f"recipe.task_weights has {len(recipe.task_weights)} entries for {len(tasks)} tasks")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(copy.deepcopy(config))  # save_pretrained later edits model.config in place
    model.train()
    rng = random.Random(f"pretrain:{seed}")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.98),
    )

    def lr_factor(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        t = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    bar = tqdm(range(recipe.steps), desc="pretraining skills LM", disable=not progress)
    ema_loss = None
    for _ in bar:
        chosen = rng.choices(tasks, weights=recipe.task_weights, k=recipe.batch_size)
        batch = encode_batch(tokenizer, [sample_example(t, rng, "train") for t in chosen])
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema_loss:.4f}")
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------------
def skills_model_key(config: LlamaConfig, seed: int, recipe: TrainRecipe) -> str:
    """Short hash of (config, recipe, seed, CODE_VERSION, the mixture world) naming the cache folder.

    The world enters through a fingerprint: a few generated train examples of every mixture task plus the whole
    fact base (recall examples), so editing a task generator or the fact base changes the key by itself.
    """
    volatile = ("transformers_version", "_name_or_path", "architectures", "dtype")  # set by save/load, not by us
    cfg = {k: v for k, v in config.to_dict().items() if k not in volatile}
    world = {task: make_examples(task, 40, seed=0, split="train") for task in MIXTURE_TASKS}
    blob = json.dumps(
        {"config": cfg, "recipe": asdict(recipe), "seed": seed, "code": CODE_VERSION, "world": world},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def skills_model_dir(
    cache_dir: str | None = None, seed: int = 0, config: LlamaConfig | None = None, recipe: TrainRecipe | None = None
) -> str:
    """The folder the skills LM for these settings lives in: ``<root>/skills-lm-<key>``, where root is
    ``cache_dir``, else ``$PEFT_IMSM_CACHE``, else ``~/.cache/peft_imsm``."""
    root = cache_dir or os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_ROOT
    key = skills_model_key(config or SKILLS_MODEL_CONFIG, seed, recipe or DEFAULT_RECIPE)
    return os.path.join(root, f"skills-lm-{key}")


def _load(folder: str) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def _cpu_identity() -> tuple[str | None, str | None]:
    """The CPU's vendor and model name as ``/proc/cpuinfo`` gives them (None, None where it cannot be read)."""
    vendor = model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "vendor_id" and vendor is None:
                    vendor = value.strip()
                elif key == "model name" and model is None:
                    model = value.strip()
                if vendor is not None and model is not None:
                    break
    except OSError:
        pass
    return vendor, model


def float_kernels() -> dict[str, str | None]:
    """What decides the float results of this machine's CPU kernels: torch's build and vector ISA, the CPU's vendor
    and model (MKL takes other code paths on other vendors' CPUs at the same ISA), and the MKL / oneDNN
    instruction-set caps (``MKL_ENABLE_INSTRUCTIONS``, ``ONEDNN_MAX_CPU_ISA``) if set."""
    vendor, model = _cpu_identity()
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_vendor": vendor,
        "cpu_model": model,
        "MKL_ENABLE_INSTRUCTIONS": os.environ.get("MKL_ENABLE_INSTRUCTIONS"),
        "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"),
    }


def shipped_model_info() -> dict | None:
    """``build_info.json`` of the shipped skills LM (its cache key, how and where it was built), or None."""
    path = os.path.join(SHIPPED_MODEL_DIR, "build_info.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def build_skills_model(
    folder: str, seed: int = 0, progress: bool = True, *, config: LlamaConfig | None = None,
    recipe: TrainRecipe | None = None,
) -> None:  # fmt: skip
    """Pretrain the skills LM (on one thread) and save it, with its tokenizer and ``build_info.json``, to ``folder``.

    The folder is written in a temporary sibling and renamed into place only when complete, so an interrupted build
    leaves no half model (at most a ``.tmp-*`` folder, never read). An existing ``folder`` is replaced.
    """
    config = config or SKILLS_MODEL_CONFIG
    recipe = recipe or DEFAULT_RECIPE
    root = os.path.dirname(os.path.abspath(folder))
    os.makedirs(root, exist_ok=True)
    tokenizer = build_tokenizer()
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the module docstring: the same weights for every thread count
    try:
        model = train_skills_model(config, tokenizer, seed=seed, recipe=recipe, progress=progress)
    finally:
        torch.set_num_threads(threads)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(folder)}-", dir=root)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "build_info.json"), "w") as f:
            info = {"key": skills_model_key(config, seed, recipe), "seed": seed, "recipe": asdict(recipe),
                    "threads": 1, "float_kernels": float_kernels(),
                    "build_seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
            json.dump(info, f, indent=1)
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same build first: keep theirs
            if not os.path.isfile(os.path.join(folder, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_or_build_skills_model(
    cache_dir: str | None = None,
    seed: int = 0,
    progress: bool = True,
    *,
    config: LlamaConfig | None = None,
    recipe: TrainRecipe | None = None,
    rebuild: bool = False,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """The pretrained skills LM: the shipped copy for the default settings, else built once and cached.

    Args:
        cache_dir: cache ROOT of built models (``<root>/skills-lm-<key>``); default ``$PEFT_IMSM_CACHE`` or
            ``~/.cache/peft_imsm``.
        seed: training seed (part of the key).
        progress: show a tqdm bar while building.
        config, recipe: overrides of ``SKILLS_MODEL_CONFIG`` / ``DEFAULT_RECIPE`` (part of the key).
        rebuild: pretrain on this machine even where the shipped model fits (into the cache, replacing an earlier
            build of the same key): to check that this machine rebuilds the shipped weights, or after changing the
            skills world.

    Returns:
        ``(model, tokenizer)``; the model is float32, on CPU, in eval mode.

    The shipped copy is used only while its key (``build_info.json``) equals the key of the requested settings, so a
    changed world (``skills.py``) or recipe is built instead of silently loading a model of another world.
    """
    config = config or SKILLS_MODEL_CONFIG
    recipe = recipe or DEFAULT_RECIPE
    shipped = shipped_model_info()
    if not rebuild and shipped is not None and shipped.get("key") == skills_model_key(config, seed, recipe):
        return _load(SHIPPED_MODEL_DIR)
    folder = skills_model_dir(cache_dir, seed, config, recipe)
    if rebuild or not os.path.isfile(os.path.join(folder, "config.json")):
        build_skills_model(folder, seed, progress, config=config, recipe=recipe)
    return _load(folder)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    batch_size: int = 64,
    max_new_tokens: int = 8,
    desc: str | None = None,
    add_special_tokens: bool = True,
    gates: list[float] | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts``, cut at the first eos, special tokens removed (in the order of ``prompts``).

    Prompts are batched by token length (longest first) so that a batch pads to at most its own longest prompt.
    ``desc``: show a progress bar with this label (for long evaluations). ``add_special_tokens=False`` for prompts
    that already hold them (chat-template prompts). ``gates``: for an IMSM model, extended with each prompt's mean
    gate value over its prompt tokens, read from the generation's own prefill (no extra forward); in prompt order.

    Uses only the generic ``model.generate(input_ids=(B, T), attention_mask=(B, T), max_new_tokens, do_sample=False,
    eos_token_id, pad_token_id)`` API on left-padded prompts, so a peft-wrapped model works too.
    """
    device = model_device(model)
    was_training = model.training
    model.eval()
    tuner = getattr(model, "base_model", None)
    record = gates is not None and hasattr(tuner, "record_gate")
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    answers: list[str] = [""] * len(prompts)
    prompt_gates: list[float] = [0.0] * len(prompts)
    starts = range(0, len(prompts), batch_size)
    for i in tqdm(starts, desc=desc, disable=desc is None, leave=False):
        idx = order[i : i + batch_size]
        enc = tokenizer(
            [prompts[j] for j in idx], padding=True, return_tensors="pt", add_special_tokens=add_special_tokens
        )
        input_ids = enc["input_ids"].to(device)  # (B, T), left-padded
        attention_mask = enc["attention_mask"].to(device)  # (B, T)
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                      do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        if record:
            with tuner.record_gate() as log:
                out = model.generate(**kwargs)  # (B, T + new)
            for j, value in zip(idx, log[0].tolist(), strict=True):  # log[0]: the prefill, one mean per prompt
                prompt_gates[j] = value
        else:
            out = model.generate(**kwargs)
        for j, row in zip(idx, out[:, input_ids.shape[1] :].tolist(), strict=True):
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            answers[j] = tokenizer.decode(row, skip_special_tokens=True)
    if record:
        gates.extend(prompt_gates)
    if was_training:
        model.train()
    return answers


def evaluate_tasks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: dict[str, list[dict]],
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    gates: dict[str, list[float]] | None = None,
) -> dict[str, float]:
    """Exact-match accuracy (percent) per task of greedy generation against the gold answers.

    Args:
        tasks: ``{task name: [{"input": prompt, "output": answer}, ...]}`` (e.g. from ``make_examples``).
        max_new_tokens: default: longest gold answer (in tokens) over all tasks + 1, for the eos.
        gates: for an IMSM model, filled with ``{task name: [mean gate of each prompt]}`` read from the generation's
            prefill (see :func:`generate_answers`).

    Returns:
        ``{task name: 100 * (#continuations equal to the answer) / #examples}`` (0.0 for an empty list).
    """
    if max_new_tokens is None:
        lengths = [
            len(tokenizer(ex["output"], add_special_tokens=False)["input_ids"]) for exs in tasks.values() for ex in exs
        ]
        max_new_tokens = max(lengths, default=0) + 1
    scores: dict[str, float] = {}
    for name, examples in tasks.items():
        if not examples:
            scores[name] = 0.0
            continue
        task_gates = None if gates is None else gates.setdefault(name, [])
        preds = generate_answers(
            model, tokenizer, [ex["input"] for ex in examples], batch_size, max_new_tokens, gates=task_gates
        )
        hits = sum(pred == ex["output"] for pred, ex in zip(preds, examples))
        scores[name] = 100.0 * hits / len(examples)
    return scores
