"""Retrofit: an adapter you already trained, wrapped in IMSM with its weights unchanged and frozen; the fast gate path.

Invariants tested exactly (float32):
* the retrofitted model with the gate forced to 0 gives the original adapter's logits, forced to 1 the base model's;
* the wrapped adapter's weights are bit-identical to the original after retrofit, after ``train_gate`` and after
  Trainer training; only the gate is trainable (also after reloading with ``is_trainable=True``);
* the fast path's stored states give back the model's own logits (target tokens) and anchor KL.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import warnings

import pytest
import torch
from datasets import Dataset
from helpers import VOCAB, adapter_config, batch, char_llama_config, quantizable_config, tiny_config, tiny_model
from peft import (
    AdaptionPromptConfig,
    AutoPeftModelForCausalLM,
    LoraConfig,
    PeftModel,
    PromptTuningConfig,
    get_peft_model,
)
from peft.utils import get_peft_model_state_dict
from transformers import AutoModelForCausalLM, LlamaForCausalLM, Trainer, TrainingArguments

from imsm_bench.skills import TARGET_TASK, build_tokenizer, make_examples
from peft_imsm import AnchorConfig, IMSMConfig, IMSMLogCallback, retrofit, train_gate
from peft_imsm.gate_training import _gate_on, _model_logits, _precompute_anchors, _precompute_target
from peft_imsm.losses import anchor_kl
from peft_imsm.model import find_imsm_tuner

SMALL_ANCHORS = AnchorConfig(every=1, num_samples=8, sample_length=6, batch_size=4)


def trained_adapter(kind: str = "lora", arch: str = "llama", seed: int = 0) -> PeftModel:
    """A peft model whose adapter differs from its initialisation (as if trained)."""
    model = get_peft_model(tiny_model(arch, seed), adapter_config(kind, identity=False))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.3)
    model.eval()
    return model


def adapter_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    """The wrapped adapter's saved tensors (no gate), under peft's saved key names."""
    state = get_peft_model_state_dict(model)
    return {k: v.detach().clone() for k, v in state.items() if "imsm_gate" not in k}


def labelled_batch(seed: int = 0, prompt: int = 5) -> dict[str, torch.Tensor]:
    ids, mask = batch(seed=seed, batch_size=3, seq_len=12)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def target_rows(n: int = 12, seed: int = 0) -> list[dict[str, list[int]]]:
    """(input_ids, labels) examples of random tokens: a 4-token prompt, then 4 supervised tokens."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (4 + i % 3 + 4,), generator=gen).tolist()
        prompt = 4 + i % 3
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


# ------------------------------------------------------------------------------------------- building the model
@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
@pytest.mark.parametrize("source", ["folder", "peft_model"])
def test_retrofit_loads_the_adapter_unchanged_and_trains_only_the_gate(tmp_path, kind, source):
    original = trained_adapter(kind)
    ids, mask = batch()
    with torch.no_grad():
        expected_adapted = original(input_ids=ids, attention_mask=mask).logits
        with original.disable_adapter():
            expected_frozen = original(input_ids=ids, attention_mask=mask).logits
    weights = adapter_weights(original)
    if source == "folder":
        original.save_pretrained(tmp_path)
        model = retrofit(tiny_model("llama"), str(tmp_path), anchor=SMALL_ANCHORS)
    else:
        model = retrofit(original, anchor=SMALL_ANCHORS)
    model.eval()
    tuner = find_imsm_tuner(model)
    assert tuner.peft_config["default"].freeze_adapter is True
    after = adapter_weights(model)
    assert after.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(after[key], value), key
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("imsm_gate" in n for n in trainable), trainable
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        p.numel() for p in tuner.gate.parameters()
    )
    with torch.no_grad():
        tuner.gate.forced_value = 0.0
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).logits, expected_adapted, atol=1e-6, rtol=0
        )
        tuner.gate.forced_value = 1.0
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).logits, expected_frozen, atol=1e-6, rtol=0
        )


def test_retrofit_of_a_qlora_adapter(tmp_path):
    """A LoRA adapter on a 4-bit base: retrofitted onto a freshly quantized base, it gives PeftModel's logits.

    (Both models are compared from fresh quantized loads: bitsandbytes' CPU path rewrites a 4-bit layer's
    quantization state at its first forward, so a base that already ran differs from a fresh one.)
    """
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    def quantized():
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=config, device_map="cpu")

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(quantizable_config("llama")).save_pretrained(tmp_path / "base")
    lora = get_peft_model(quantized(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    weights = adapter_weights(lora)
    ids, mask = batch()
    original = PeftModel.from_pretrained(quantized(), str(tmp_path / "lora")).eval()
    with torch.no_grad():
        expected = original(input_ids=ids, attention_mask=mask).logits
    model = retrofit(quantized(), str(tmp_path / "lora"), anchor=SMALL_ANCHORS).eval()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    tuner = find_imsm_tuner(model)
    tuner.gate.forced_value = 0.0
    tuner.stacked_views = False  # the adapted view's pass is then exactly PeftModel's forward
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-6, rtol=0)
    after = adapter_weights(model)
    for key, value in weights.items():
        assert torch.equal(after[key], value), key


# ------------------------------------------------------------------------------------------------ the fast path
@pytest.mark.parametrize("arch", ["llama", "gemma2", "cohere", "gpt2"])
def test_fast_path_states_give_the_models_own_logits_and_anchor_kl(arch):
    model = retrofit(trained_adapter("lora", arch), anchor=SMALL_ANCHORS).eval()
    tuner = find_imsm_tuner(model)
    with torch.no_grad():
        tuner.gate.W_B.weight.normal_(std=0.5)  # a gate far from 0.5 everywhere
    data = labelled_batch()
    rows = []
    for ids, mask, labels in zip(data["input_ids"], data["attention_mask"], data["labels"]):
        keep = mask.bool()
        rows.append((ids[keep].tolist(), labels[keep].tolist()))
    with torch.no_grad():
        stored = _precompute_target(model, tuner, rows, 3, torch.device("cpu"), 0)  # one chunk: same padding
        _, mixed = _gate_on(tuner.gate, stored, torch.arange(len(stored)))
        fast_logits = _model_logits(model, mixed)
        logits = model(**data).logits
    shifted = data["labels"][:, 1:]
    supervised = shifted != -100
    assert len(stored) == int(supervised.sum())
    torch.testing.assert_close(fast_logits, logits[:, :-1][supervised], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stored.labels, shifted[supervised])

    ids, mask = batch(seed=3)
    with torch.no_grad():
        anchors = _precompute_anchors(model, tuner, ids, mask, 3, 2**30)
        _, mixed = _gate_on(tuner.gate, anchors, torch.arange(len(anchors)))
        fast_kl = anchor_kl(anchors.frozen_logp, _model_logits(model, mixed), torch.ones(len(anchors)))
        imsm_logits = model(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            frozen_logits = model(input_ids=ids, attention_mask=mask).logits
        expected = anchor_kl(frozen_logits, imsm_logits, mask)
    torch.testing.assert_close(fast_kl, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("data_format", ["ids", "pairs", "prompt_completion"])
def test_train_gate_trains_the_gate_and_leaves_the_adapter_bit_identical(data_format):
    tok = build_tokenizer()
    torch.manual_seed(0)
    base = LlamaForCausalLM(char_llama_config(tok))
    lora = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    weights = adapter_weights(lora)
    model = retrofit(lora, anchor=SMALL_ANCHORS)
    gate_before = {n: p.detach().clone() for n, p in find_imsm_tuner(model).gate.named_parameters()}
    examples = make_examples(TARGET_TASK, 16, seed=0, split="train")
    if data_format == "prompt_completion":
        data = [{"prompt": r["input"], "completion": r["output"]} for r in examples]
    else:
        encoded = []
        for r in examples:
            prompt = tok(r["input"])["input_ids"]
            answer = tok(r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            encoded.append((prompt + answer, [-100] * len(prompt) + answer))
        data = encoded if data_format == "pairs" else [{"input_ids": i, "labels": lab} for i, lab in encoded]
    log = train_gate(model, data, tok, steps=5, batch_tokens=32)
    supervised = sum(len(tok(r["output"], add_special_tokens=False)["input_ids"]) + 1 for r in examples)
    assert log.target_examples == 16 and log.target_tokens == supervised
    assert log.anchor_tokens == SMALL_ANCHORS.num_samples * (1 + SMALL_ANCHORS.sample_length)
    assert len(log.loss) == len(log.task_loss) == len(log.anchor_kl) == 5
    assert 0.0 < log.gate_mean < 1.0 and 0.0 < log.anchor_gate_mean < 1.0
    assert log.seconds_total >= log.seconds_precompute + log.seconds_train
    for name, param in find_imsm_tuner(model).gate.named_parameters():
        assert not torch.equal(param.detach(), gate_before[name]), name
    after = adapter_weights(model)
    for key, value in weights.items():
        assert torch.equal(after[key], value), key


def adapter_written_rows(lora) -> list[tuple[list[int], list[int]]]:
    """32 ``(tokens, labels)`` rows of the adapter's own greedy text: 4 random prompt tokens (unsupervised), then the 6
    tokens the adapter writes after them."""
    gen = torch.Generator().manual_seed(5)
    prompts = torch.randint(3, VOCAB, (32, 4), generator=gen)
    with torch.no_grad():
        written = lora.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=6,
                                min_new_tokens=6, do_sample=False, pad_token_id=0)  # fmt: skip
    return [(row.tolist(), [-100] * 4 + row[4:].tolist()) for row in written]


@pytest.mark.parametrize(
    "gate_mode,extra,want",
    [("query", {}, 5e-3), ("token", {}, 5e-3), ("route", {}, 1e-4), ("route", {"gate_lr_scale": 1.0}, 1e-2)],
)
def test_train_gate_default_lr_follows_the_gate(gate_mode, extra, want):
    """``lr=None``: 5e-3 for the learned gates; for the route gate 1e-2 divided by its ``gate_lr_scale`` (its router
    is stored scaled to move that many times faster per step). The default is exactly that rate given explicitly."""
    lora = trained_adapter("lora")
    rows = adapter_written_rows(lora)[:8]
    anchor = AnchorConfig(every=1, num_samples=8, sample_length=6)
    trained = []
    for lr in (None, want):
        torch.manual_seed(0)  # (the gate's initialisation)
        model = retrofit(copy.deepcopy(lora), gate_mode=gate_mode, gate_dropout=0.0, anchor=anchor, **extra)
        with torch.no_grad():  # (the route gate starts at zero: give it something to move from)
            for param in find_imsm_tuner(model).gate.parameters():
                param.add_(torch.randn(param.shape) * 0.01)
        log = train_gate(model, rows, steps=5, lr=lr, batch_tokens=16)
        assert log.lr == pytest.approx(want, rel=1e-12)
        trained.append([p.detach().clone() for p in find_imsm_tuner(model).gate.parameters()])
    for default, explicit in zip(*trained, strict=True):
        assert torch.equal(default, explicit)
    with pytest.raises(ValueError, match=r"lr must be a finite number > 0 \(or None for the default\), got -1"):
        train_gate(model, rows, steps=1, lr=-1)


def test_train_gate_learns_a_separable_gate():
    """Target text that the adapter writes, anchors that the frozen model writes: the gate tells them apart."""
    lora = trained_adapter("lora")
    rows = adapter_written_rows(lora)
    model = retrofit(lora, anchor=AnchorConfig(every=1, num_samples=32, sample_length=8, weight=1.0))
    log = train_gate(model, rows, steps=200, lr=2e-2, batch_tokens=64)
    assert log.task_loss[-1] < log.task_loss[0]
    assert log.anchor_gate_mean > log.gate_mean + 0.3, (log.gate_mean, log.anchor_gate_mean)


def test_train_gate_routes_a_retrofitted_route_gate():
    """retrofit(gate_mode="route") + train_gate: the routing term is in train_gate's loss (at the router's zero
    initialisation g = 0.5, so route_weight=3 adds exactly 2 x 2 ln 2 to route_weight=1's first loss), and the
    router learns to send the adapter's prompts to the adapter and the anchors to the frozen view."""
    lora = trained_adapter("lora")
    rows = adapter_written_rows(lora)
    first_losses = {}
    for route_weight in (3.0, 1.0):
        model = retrofit(copy.deepcopy(lora), gate_mode="route",
                         anchor=AnchorConfig(every=1, num_samples=32, sample_length=8, route_weight=route_weight))  # fmt: skip
        log = train_gate(model, rows, steps=100, lr=1e-3, batch_tokens=64)
        first_losses[route_weight] = log.loss[0]
    assert first_losses[3.0] - first_losses[1.0] == pytest.approx(4 * math.log(2), abs=1e-5)
    assert log.gate_mean < 0.3 and log.anchor_gate_mean > 0.8, (log.gate_mean, log.anchor_gate_mean)


def test_train_gate_routes_a_route_gate_whose_anchor_kl_is_off():
    """``AnchorConfig(weight=0)`` turns the anchor KL off, not the anchors: the route gate's routing term reads them
    (as in Trainer training, see ``AnchorRegularizer.add_to_loss``), so train_gate keeps them and the retrofitted
    router sends the adapter's prompts to the adapter and the anchors to the frozen view. At the router's zero
    initialisation (g = 0.5) the first loss is the task loss plus ln 2 on the target tokens and ln 2 on the anchors."""
    lora = trained_adapter("lora")
    model = retrofit(lora, gate_mode="route", anchor=AnchorConfig(every=1, num_samples=32, sample_length=8, weight=0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = train_gate(model, adapter_written_rows(lora), steps=100, lr=1e-3, batch_tokens=64)
    assert not [w for w in caught if "without anchors" in str(w.message)]
    assert log.anchor_tokens == 32 * (1 + 8) and log.anchor_kl == []
    assert log.loss[0] - log.task_loss[0] == pytest.approx(2 * math.log(2), abs=1e-5)
    assert log.gate_mean < 0.3 and log.anchor_gate_mean > 0.8, (log.gate_mean, log.anchor_gate_mean)


# --------------------------------------------------------------- an ordinary IMSM model: Trainer, save, reload
def test_retrofitted_model_trains_with_the_trainer_saves_reloads_and_generates(tmp_path):
    torch.manual_seed(0)
    tiny_model("llama").save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    lora = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    weights = adapter_weights(lora)
    model = retrofit(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), str(tmp_path / "lora"),
                     anchor=SMALL_ANCHORS)  # fmt: skip
    gate_before = {n: p.detach().clone() for n, p in find_imsm_tuner(model).gate.named_parameters()}

    rows = target_rows(16)

    def collate(items):
        width = max(len(i["input_ids"]) for i in items)
        pad = lambda seq, v: [v] * (width - len(seq)) + seq  # noqa: E731  (left padding)
        return {
            "input_ids": torch.tensor([pad(i["input_ids"], 0) for i in items]),
            "attention_mask": torch.tensor([pad([1] * len(i["input_ids"]), 0) for i in items]),
            "labels": torch.tensor([pad(i["labels"], -100) for i in items]),
        }

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=2, report_to=[], save_strategy="no", remove_unused_columns=False, use_cpu=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=collate,
                      callbacks=[IMSMLogCallback()])  # fmt: skip
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(0.0 < h["gate_mean"] < 1.0 and 0.0 < h["anchor_gate_mean"] < 1.0 for h in logged)
    after = adapter_weights(model)
    for key, value in weights.items():
        assert torch.equal(after[key], value), key
    assert any(not torch.equal(p.detach(), gate_before[n]) for n, p in find_imsm_tuner(model).gate.named_parameters())

    model.save_pretrained(tmp_path / "imsm")
    saved = json.loads((tmp_path / "imsm" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IMSM" and saved["freeze_adapter"] is True
    model.eval()
    ids, mask = batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    reloaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "imsm")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-6, rtol=0)
    resumed = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), str(tmp_path / "imsm"), is_trainable=True
    )
    trainable = {n for n, p in resumed.named_parameters() if p.requires_grad}
    assert trainable and all("imsm_gate" in n for n in trainable), trainable
    out = reloaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (ids.shape[0], ids.shape[1] + 4)


# ------------------------------------------------------------------------------------------------- bad input
def test_prompt_learning_adapter_is_refused(tmp_path):
    model = get_peft_model(tiny_model("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="prompt-learning adapter.*PROMPT_TUNING.*weight adapters"):
        retrofit(tiny_model("llama"), str(tmp_path))
    with pytest.raises(ValueError, match="prompt-learning adapter"):
        retrofit(model)


def test_adapter_type_imsm_cannot_wrap_is_refused(tmp_path):
    model = get_peft_model(tiny_model("llama"), AdaptionPromptConfig(adapter_len=2, adapter_layers=1,
                                                                    task_type="CAUSAL_LM"))  # fmt: skip
    with pytest.raises(ValueError, match="cannot be retrofitted.*ADAPTION_PROMPT.*LoRA"):
        retrofit(model)


def test_an_imsm_adapter_is_refused_with_the_way_to_train_its_gate(tmp_path):
    model = get_peft_model(tiny_model("llama"), IMSMConfig(adapter_config=adapter_config("lora")))
    with pytest.raises(ValueError, match="already an IMSM model.*is_trainable=True.*train_gate"):
        retrofit(model)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="already an IMSM adapter.*is_trainable=True"):
        retrofit(tiny_model("llama"), str(tmp_path))


@pytest.mark.parametrize("kind", ["hidden_size", "modules"])
def test_adapter_trained_on_another_base_is_refused(tmp_path, kind):
    trained_adapter("lora").save_pretrained(tmp_path)
    if kind == "hidden_size":
        config = tiny_config("llama")
        config.hidden_size, config.intermediate_size = 48, 96
        other = AutoModelForCausalLM.from_config(config)
        match = (
            "does not fit this base model.*shape mismatch.*another base model.*pass the base model it was trained on"
        )
    else:
        other = tiny_model("gpt2")
        match = "not in this base model.*trained on another base model"
    with pytest.raises(ValueError, match=match):
        retrofit(other, str(tmp_path))


def test_paths_without_an_adapter(tmp_path):
    base = tiny_model("llama")
    with pytest.raises(ValueError, match="no adapter_config.json.*save_pretrained"):
        retrofit(base, str(tmp_path))
    tiny_model("llama").save_pretrained(tmp_path / "full")
    with pytest.raises(ValueError, match="looks like a full model.*base model"):
        retrofit(base, str(tmp_path / "full"))
    with pytest.raises(FileNotFoundError, match="No adapter folder"):
        retrofit(base, str(tmp_path / "missing"))
    trained_adapter("lora").save_pretrained(tmp_path / "lora")
    os.remove(tmp_path / "lora" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="no adapter weights.*Save the adapter again"):
        retrofit(base, str(tmp_path / "lora"))
    with pytest.raises(ValueError, match="either the base model and the adapter"):
        retrofit(trained_adapter("lora"), str(tmp_path / "lora"))
    with pytest.raises(TypeError, match="adapter folder .* or a PeftModel"):
        retrofit(base, 3)
    with pytest.raises(ValueError, match="already has peft adapters.*plain base model"):
        retrofit(trained_adapter("lora").get_base_model(), str(tmp_path / "lora"))


@pytest.mark.parametrize("data", [[], None])
def test_train_gate_refuses_no_target_data(data):
    model = retrofit(trained_adapter("lora"), anchor=SMALL_ANCHORS)
    with pytest.raises(ValueError, match="no target data.*copy the frozen model everywhere"):
        train_gate(model, data)


@pytest.mark.parametrize(
    "data,max_length,fix",
    [
        ([{"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}] * 2, 512, "the model takes only 128"),
        ([([5, 6, 7, 8], [5, -100, -100, -100])], 512, "the model takes only 128"),  # (nothing predicts position 0)
        (target_rows(3), 4, r"raise max_length \(now 4\)"),  # (the answers start after token 4)
    ],
)
def test_train_gate_refuses_rows_that_supervise_no_token(data, max_length, fix):
    model = retrofit(trained_adapter("lora"), anchor=SMALL_ANCHORS)  # (128 positions)
    message = (
        rf"got {len(data)} target rows, but none of them has a supervised token: all their labels are -100 \(in the "
        rf"first {min(max_length, 128)} tokens.*Put the answer's token ids in labels.*{fix}\.$"
    )
    with pytest.raises(ValueError, match=message):
        train_gate(model, data, max_length=max_length)


BAD_TRAIN_GATE_ARGUMENTS = [
    ("steps", value, "an integer >= 1") for value in (0, -1, True, 2.0, "10")
] + [
    ("lr", value, r"a finite number > 0 \(or None for the default\)") for value in (0, -1e-3, float("nan"), True)
] + [
    ("batch_tokens", value, "an integer >= 1") for value in (0, -5, True, 16.0)
] + [
    ("anchor_batch_tokens", value, r"None \(as batch_tokens\) or an integer >= 1") for value in (0, False, 8.0)
] + [
    ("anchor_weight", value, r"None \(IMSMConfig.anchor.weight\) or a finite number >= 0")
    for value in (-1.0, float("inf"), True)
] + [
    ("anchor_texts", value, "None or a list of strings") for value in ("one text", [1, 2])
] + [
    ("max_length", value, "an integer >= 2") for value in (0, 1, True, 64.0)
] + [
    ("forward_batch_size", value, "an integer >= 1") for value in (0, -2, True)
] + [
    ("max_cached_logits", value, "an integer >= 0") for value in (-1, True, 1.5)
] + [
    ("seed", value, "an integer >= 0") for value in (-1, False, 0.5)
]  # fmt: skip


@pytest.mark.parametrize("name,value,allowed", BAD_TRAIN_GATE_ARGUMENTS)
def test_train_gate_refuses_a_bad_argument_up_front(name, value, allowed):
    """Every argument is checked before anything runs: the message names it, its value and its range."""
    model = retrofit(trained_adapter("lora"), anchor=SMALL_ANCHORS)
    gate_before = [p.detach().clone() for p in find_imsm_tuner(model).gate.parameters()]
    shown = f"the string {value!r}" if isinstance(value, str) else repr(value)
    with pytest.raises(ValueError, match=rf"^train_gate\(\) {name} must be {allowed}.*, got {re.escape(shown)}\.$"):
        train_gate(model, target_rows(4), **{"steps": 2, name: value})
    assert find_imsm_tuner(model).anchor_term._anchors is None  # (refused before the anchors were sampled)
    assert all(torch.equal(a, b) for a, b in zip(gate_before, find_imsm_tuner(model).gate.parameters()))


def test_train_gate_refuses_anchor_texts_that_the_anchor_section_would_ignore():
    model = retrofit(trained_adapter("lora"), anchor=SMALL_ANCHORS)
    with pytest.raises(ValueError, match="got anchor_texts, but the model's IMSMConfig has anchor source 'self'"):
        train_gate(model, target_rows(4), anchor_texts=["a general text"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_train_gate_cuts_rows_to_the_models_position_limit(arch):
    """Rows longer than the model's 128 positions (Llama's max_position_embeddings, GPT-2's n_positions, whose learned
    positions would fail with an IndexError) are cut to 128 tokens, with a warning; shorter cuts warn nothing."""
    model = retrofit(trained_adapter("lora", arch), anchor=SMALL_ANCHORS)
    gen = torch.Generator().manual_seed(0)
    rows = [(ids, [-100] * 4 + ids[4:]) for ids in torch.randint(3, VOCAB, (3, 150), generator=gen).tolist()]
    rows.append((rows[0][0][:20], rows[0][1][:20]))  # (one row within the limit)
    with pytest.warns(UserWarning, match=r"3 of 4 target rows are longer than this model's position limit \(128 "):
        log = train_gate(model, rows, steps=2, batch_tokens=16)
    assert log.target_tokens == 3 * (128 - 4) + (20 - 4)  # (position t predicts token t + 1: from token 4 on)
    assert math.isfinite(log.loss[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log = train_gate(model, rows, steps=2, batch_tokens=16, max_length=100)
    assert log.target_tokens == 3 * (100 - 4) + (20 - 4)


def test_train_gate_warns_without_anchors_and_refuses_a_fixed_gate():
    model = retrofit(trained_adapter("lora"), anchor=None)
    with pytest.warns(UserWarning, match="without anchors.*lean on the adapter everywhere"):
        log = train_gate(model, target_rows(4), steps=2)
    assert log.anchor_tokens == 0 and log.anchor_kl == []
    fixed = retrofit(trained_adapter("lora"), gate_mode="fixed", anchor=SMALL_ANCHORS)
    with pytest.raises(ValueError, match="no gate parameters"):
        train_gate(fixed, target_rows(4))
    with pytest.raises(TypeError, match="Expected an IMSM PeftModel.*retrofit"):
        train_gate(trained_adapter("lora"), target_rows(4))
    with pytest.raises(ValueError, match="need `labels`"):
        train_gate(model, [{"input_ids": [5, 6, 7]}])


def test_retrofitted_model_trains_with_trls_sft_trainer(tmp_path):
    """``SFTTrainer(model=retrofitted)``: only the gate moves, the adapter stays bit-identical, the gate is logged."""
    from trl import SFTConfig, SFTTrainer

    tok = build_tokenizer()
    torch.manual_seed(0)
    lora = get_peft_model(
        LlamaForCausalLM(char_llama_config(tok)),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    model = retrofit(lora, anchor=SMALL_ANCHORS)
    adapter_before = adapter_weights(model)
    gate_before = {n: p.detach().clone() for n, p in model.named_parameters() if "imsm_gate" in n}
    rows = make_examples(TARGET_TASK, 32, seed=0, split="train")
    data = Dataset.from_list([{"prompt": r["input"], "completion": r["output"]} for r in rows])
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, max_length=64,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[IMSMLogCallback()]
    )
    trainer.train()
    after = adapter_weights(trainer.model)
    assert set(adapter_before) <= set(after)  # (+ the anchor draw count saved with an anchored adapter)
    assert all(torch.equal(after[k], adapter_before[k]) for k in adapter_before)
    moved = [n for n, p in trainer.model.named_parameters() if "imsm_gate" in n and not torch.equal(p, gate_before[n])]
    assert moved
    assert any("gate_mean" in h and "anchor_gate_mean" in h for h in trainer.state.log_history)
