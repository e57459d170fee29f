"""Long-sequence training features: gradient checkpointing, gradient accumulation, torch.compile, packing.

Findings pinned down here:

* Gradient checkpointing (reentrant or not, enabled on the base before or after wrapping, or by the Trainer) gives
  exactly the loss and gradients of a run without it. Only the adapted view is checkpointed: the frozen view runs
  under ``torch.no_grad()``, where transformers' ``GradientCheckpointingLayer`` runs the layer as is (nothing to
  recompute, no "none of the inputs require grad" warning).
* Gradient accumulation with the loss normalised by ``num_items_in_batch`` (the Trainer's way) gives the gradients of
  the whole batch: IMSM passes ``num_items_in_batch`` to the model's own loss and keeps it out of the backbone.
* ``torch.compile``: forward and backward of an IMSM model compile (no graph break in training) and match eager;
  later calls reuse the compiled graph (no recompilation). Backend ``aot_eager`` here (dynamo + AOTAutograd, ~10 s);
  ``inductor`` works too but compiles for ~80 s on 2 CPU cores (marked slow).
* Packing / padding-free (TRL ``padding_free=True``, or ``packing=True`` with its default BFD strategy): several
  sequences in one row, ``position_ids`` restarting at 0, no attention mask. transformers 5 (``masking_utils``)
  builds a block-diagonal causal mask from such ``position_ids`` for sdpa and eager attention, but ONLY when no KV
  cache is passed: a model in training mode still creates a ``DynamicCache`` when ``use_cache`` is on (the config
  default), and then sequences attend across their boundaries. IMSM turns the cache off in training mode, and in
  eval mode raises a clear error unless ``use_cache=False``. The query summary is per packed sequence.
"""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
from datasets import Dataset
from helpers import batch, char_llama_config, perturb_adapter, tiny_model
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

import peft_imsm.dual_pass as imsm_model_module
from peft_imsm import IMSMConfig


def lora(dropout: float = 0.0) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear")


def imsm(arch: str, dropout: float = 0.0, base=None):
    """IMSM LoRA with a non-trivial adapter; ``dropout`` for the LoRA layers, the gate and the model's own dropout."""
    model = get_peft_model(
        base if base is not None else tiny_model(arch),
        IMSMConfig(adapter_config=lora(dropout), gate_dropout=dropout),
    )
    perturb_adapter(model)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and dropout == 0.0:
            module.p = 0.0  # e.g. GPT-2's attention / residual dropout
    return model


def labelled_batch(batch_size: int = 3, seq_len: int = 12, seed: int = 0):
    ids, mask = batch(seed=seed, batch_size=batch_size, seq_len=seq_len)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : seq_len // 2] = -100
    return ids, mask, labels


def loss_and_grads(model, seed: int = 123, **inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    torch.manual_seed(seed)  # same dropout masks in both runs
    loss = model(**inputs).loss
    loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_same_grads(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        diff = (got[name] - expected[name]).abs().max().item()
        assert diff <= atol, f"{name}: max abs difference {diff:.3g} > {atol:g}"
    assert all(g.abs().sum() > 0 for g in expected.values())


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------ gradient checkpointing
@pytest.mark.parametrize("when", ["before_wrapping", "after_wrapping"])
@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(arch, use_reentrant, when):
    """With dropout on (LoRA, gate, GPT-2's own): checkpointing preserves the RNG state, so results are exact."""
    ids, mask, labels = labelled_batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    reference = imsm(arch, dropout=0.1).train()
    expected_loss, expected = loss_and_grads(reference, **inputs)

    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": use_reentrant}}
    base = tiny_model(arch)
    if when == "before_wrapping":
        base.gradient_checkpointing_enable(**kwargs)
    model = imsm(arch, dropout=0.1, base=base)
    if when == "after_wrapping":
        model.gradient_checkpointing_enable(**kwargs)  # reaches the transformers model through peft's __getattr__
    model.train()
    layers = [m for m in model.modules() if type(m).__name__ in ("LlamaDecoderLayer", "GPT2Block")]
    assert layers and all(layer.gradient_checkpointing for layer in layers)

    # transformers checkpoints the layer's `forward` (hooks on the layer itself stay outside): count its MLP's calls.
    calls = {"n": 0}
    hook = layers[0].mlp.register_forward_pre_hook(lambda m, a: calls.__setitem__("n", calls["n"] + 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.zero_grad()
        torch.manual_seed(123)
        loss = model(**inputs).loss
        forward_calls = calls["n"]
        loss.backward()
    hook.remove()
    assert forward_calls == 2  # frozen view + adapted view
    assert calls["n"] == 3  # + the recompute of the adapted view only (the frozen view kept no graph)
    noisy = [str(w.message) for w in caught if "checkpoint" in str(w.message) or "requires_grad" in str(w.message)]
    assert not noisy, noisy
    torch.testing.assert_close(loss.detach(), expected_loss, atol=1e-6, rtol=0)
    assert_same_grads({n: p.grad for n, p in model.named_parameters() if p.requires_grad}, expected)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_trainer_gradient_checkpointing_matches_no_checkpointing(tmp_path, use_reentrant):
    """``TrainingArguments(gradient_checkpointing=True)`` on an IMSM model: the same weights after 3 steps."""
    ids, mask, labels = labelled_batch(batch_size=8, seq_len=12)
    rows = [{"input_ids": i, "attention_mask": m, "labels": lab} for i, m, lab in zip(ids, mask, labels)]

    def run(checkpointing: bool):
        model = imsm("llama", dropout=0.1)
        extra = dict(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}) if checkpointing else {}
        args = TrainingArguments(
            output_dir=str(tmp_path / str(checkpointing)), max_steps=3, per_device_train_batch_size=4,
            learning_rate=1e-2, report_to=[], save_strategy="no", remove_unused_columns=False, use_cpu=True,
            disable_tqdm=True, gradient_checkpointing=checkpointing, **extra,
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows))
        trainer.train()
        layers = [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
        assert all(layer.gradient_checkpointing == checkpointing for layer in layers)
        return trainable(model)

    plain, checkpointed = run(False), run(True)
    assert_same_grads(checkpointed, plain)  # (here: the trained weights)


# ------------------------------------------------------------------------------------------ gradient accumulation
def test_gradient_accumulation_with_num_items_in_batch_equals_the_full_batch():
    """2 micro-batches of 2, each loss = sum / num_items_in_batch of the whole batch, == 1 batch of 4."""
    model = imsm("llama").train()
    ids, mask, labels = labelled_batch(batch_size=4, seq_len=12)
    labels[0, 6:9] = -100  # micro-batches with different numbers of supervised tokens
    num_items = int((labels[:, 1:] != -100).sum())

    _, full = loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    model.zero_grad()
    for rows in (slice(0, 2), slice(2, 4)):
        loss = model(
            input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows],
            num_items_in_batch=torch.tensor(num_items),
        ).loss  # fmt: skip
        loss.backward()
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert_same_grads(accumulated, full)

    # Averaging each micro-batch's mean instead (the old Trainer bug) does NOT give the full batch's gradients.
    model.zero_grad()
    for rows in (slice(0, 2), slice(2, 4)):
        (model(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss / 2).backward()
    naive = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert max((naive[n] - full[n]).abs().max() for n in full) > 1e-4


def test_trainer_gradient_accumulation_equals_the_full_batch(tmp_path):
    """Trainer: per-device batch 2 x 2 accumulation steps == batch 4, one SGD step (the Trainer passes
    ``num_items_in_batch`` to the IMSM model, which hands it to the model's own loss)."""
    ids, mask, labels = labelled_batch(batch_size=4, seq_len=12)
    labels[0, 6:9] = -100
    rows = [{"input_ids": i, "attention_mask": m, "labels": lab} for i, m, lab in zip(ids, mask, labels)]

    def run(per_device: int, accumulation: int):
        model = imsm("llama")
        args = TrainingArguments(
            output_dir=str(tmp_path / f"{per_device}x{accumulation}"), max_steps=1, optim="sgd", learning_rate=1.0,
            per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation, weight_decay=0.0,
            report_to=[], save_strategy="no", remove_unused_columns=False, use_cpu=True, disable_tqdm=True,
            max_grad_norm=0.0,
        )  # fmt: skip
        before = trainable(model)
        Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows)).train()
        return {n: before[n] - p for n, p in trainable(model).items()}  # = learning_rate * gradient

    assert_same_grads(run(2, 2), run(4, 1))


# ---------------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_matches_eager_without_recompiling(backend):
    """``torch.compile(peft_model)``: training forward + backward and an eval forward match eager; later training
    calls reuse the compiled graph (IMSM keeps no per-call Python counter that dynamo would guard on)."""
    import torch._dynamo

    torch._dynamo.reset()
    model = imsm("llama").train()
    ids, mask, labels = labelled_batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    expected_loss, expected = loss_and_grads(model, **inputs)
    model.eval()
    with torch.no_grad():
        expected_eval = model(input_ids=ids, attention_mask=mask).logits
    model.train()

    atol = 1e-6 if backend == "aot_eager" else 1e-4  # inductor fuses kernels: float sums in another order
    compiled = torch.compile(model, backend=backend)
    try:
        for step in range(2):
            with torch._dynamo.config.patch(error_on_recompile=step > 0):
                loss, grads = loss_and_grads(compiled, **inputs)
            torch.testing.assert_close(loss, expected_loss, atol=atol, rtol=0)
            assert_same_grads(grads, expected, atol=atol)
        model.eval()
        with torch.no_grad():
            logits = compiled(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(logits, expected_eval, atol=10 * atol, rtol=0)
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------ packing / padding-free
def prompt_completion_rows(lengths=((3, 4), (5, 2), (2, 6), (4, 3)), seed: int = 0) -> list[dict]:
    """Token rows with their labels (-100 on the prompt), as TRL's SFT dataset preparation produces them."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for prompt, completion in lengths:
        ids = torch.randint(3, 96, (prompt + completion,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_packed_padding_free_batch_equals_the_padded_batch(arch):
    """TRL's padding-free collator (one row, position_ids restarting at 0, no attention mask, plus its flash-attention
    kwargs) vs its padded collator on the same sequences: same loss, same gradients, same logits per sequence."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = prompt_completion_rows()
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(rows)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    model = imsm(arch).train()

    loss_p, grads_p = loss_and_grads(model, **packed)
    logits_p = model(**packed).logits.detach()
    loss_u, grads_u = loss_and_grads(model, **padded)
    logits_u = model(**padded).logits.detach()
    torch.testing.assert_close(loss_p, loss_u, atol=1e-6, rtol=0)
    assert_same_grads(grads_p, grads_u, atol=1e-5)  # float sums in another order: measured <= 2e-6
    start = 0
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        torch.testing.assert_close(logits_p[0, start : start + n], logits_u[i, :n], atol=1e-5, rtol=0)
        start += n

    # The query summary is per packed sequence: one summary for the whole row would change every later sequence.
    original = imsm_model_module.build_query_index

    def one_sequence_per_row(*args, **kwargs):
        return original(*args, **{**kwargs, "position_ids": None})

    imsm_model_module.build_query_index = one_sequence_per_row
    try:
        with torch.no_grad():
            wrong = model(**packed).logits
    finally:
        imsm_model_module.build_query_index = original
    first = len(rows[0]["input_ids"])
    torch.testing.assert_close(wrong[0, :first], logits_p[0, :first], atol=1e-5, rtol=0)
    assert (wrong[0, first:] - logits_p[0, first:]).abs().max() > 1e-3

    # Eval mode: a KV cache would make transformers drop the block-diagonal mask; IMSM says so instead.
    model.eval()
    with torch.no_grad(), pytest.raises(ValueError, match="use_cache=False"):
        model(**packed)
    with torch.no_grad():
        no_cache = model(**packed, use_cache=False).logits
    torch.testing.assert_close(no_cache, logits_p, atol=1e-5, rtol=0)


def caps_dataset(n: int = 64) -> Dataset:
    """Prompt ``<word> in caps:`` -> completion ``WORD`` (for the char-level tokenizer)."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7))) for _ in range(n)]
    return Dataset.from_list([{"prompt": f"<{w}> in caps:", "completion": w.upper()} for w in words])


@pytest.mark.parametrize("mode", ["packing", "padding_free"])
def test_sft_trainer_packing_with_imsm(tmp_path, mode, monkeypatch):
    """SFTTrainer with ``packing=True`` (BFD, padding-free) or ``padding_free=True`` and an IMSM peft_config on
    prompt-completion data: the batches reach IMSM packed (several sequences per row) and the loss falls."""
    from transformers import LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from imsm_bench.skills import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    config = char_llama_config(tok)
    indexes = []
    original = imsm_model_module.build_query_index

    def spy(*args, **kwargs):
        index = original(*args, **kwargs)
        indexes.append((index.segment.shape[0], index.num_segments, index.one_per_row))
        return index

    monkeypatch.setattr(imsm_model_module, "build_query_index", spy)
    extra = dict(packing=True, max_length=64) if mode == "packing" else dict(padding_free=True, max_length=None)
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=5,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, **extra,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=LlamaForCausalLM(config), args=args, train_dataset=caps_dataset(), processing_class=tok,
        peft_config=IMSMConfig(adapter_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")),
    )  # fmt: skip
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.05, losses
    assert indexes and all(rows == 1 and segments > 1 and not one for rows, segments, one in indexes), indexes[:3]
    assert max(segments for _, segments, _ in indexes) >= 8
