"""Training with the HF Trainer and TRL's SFTTrainer, unchanged user code."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from helpers import char_llama_config, tiny_model
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

from imsm_bench.skills import TARGET_TASK, build_tokenizer, make_examples
from peft_imsm import AdaLoraBudgetCallback, IMSMConfig


def char_llama():
    torch.manual_seed(0)
    tok = build_tokenizer()
    config = char_llama_config(tok)
    return LlamaForCausalLM(config), tok


def prompt_completion(n: int = 64) -> Dataset:
    rows = make_examples(TARGET_TASK, n, seed=0, split="train")
    return Dataset.from_list([{"prompt": r["input"], "completion": r["output"]} for r in rows])


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_only_trainable_changed(model, before) -> None:
    for name, param in model.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        assert changed == param.requires_grad, f"{name}: changed={changed}, trainable={param.requires_grad}"


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_hf_trainer_trains_adapter_and_gate_only(tmp_path):
    model, tok = char_llama()
    model = get_peft_model(model, IMSMConfig(adapter_config=LoraConfig(r=8, target_modules="all-linear")))
    rows = make_examples(TARGET_TASK, 64, seed=0, split="train")
    features = []
    for r in rows:
        prompt = tok(r["input"]).input_ids
        full = prompt + tok(r["output"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        features.append({"input_ids": full, "labels": [-100] * len(prompt) + full[len(prompt) :]})

    def collate(items):
        width = max(len(i["input_ids"]) for i in items)
        pad = lambda seq, v: [v] * (width - len(seq)) + seq  # noqa: E731  (left padding)
        return {
            "input_ids": torch.tensor([pad(i["input_ids"], tok.pad_token_id) for i in items]),
            "attention_mask": torch.tensor([pad([1] * len(i["input_ids"]), 0) for i in items]),
            "labels": torch.tensor([pad(i["labels"], -100) for i in items]),
        }

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=16, learning_rate=3e-3,
        logging_steps=5, report_to=[], save_strategy="no", remove_unused_columns=False, use_cpu=True,
        gradient_accumulation_steps=2,
    )  # fmt: skip
    before = snapshot(model)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(features), data_collator=collate)
    trainer.train()
    history = losses(trainer)
    assert history[-1] < history[0] - 0.1, history  # a random-init tiny model learns slowly with LoRA
    assert_only_trainable_changed(model, before)


def test_trl_sft_trainer_with_imsm_peft_config(tmp_path):
    from trl import SFTConfig, SFTTrainer

    model, tok = char_llama()
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=16, learning_rate=3e-3,
        logging_steps=5, report_to=[], save_strategy="no", use_cpu=True, max_length=64,
    )  # fmt: skip
    config = IMSMConfig(adapter_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=prompt_completion(), processing_class=tok, peft_config=config
    )
    before = snapshot(trainer.model)
    assert type(trainer.model.base_model).__name__ == "IMSMModel"
    trainer.train()
    history = losses(trainer)
    assert history[-1] < history[0] - 0.1, history  # a random-init tiny model learns slowly with LoRA
    assert_only_trainable_changed(trainer.model, before)
    trainer.model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_adalora_budget_callback_runs_the_rank_schedule(tmp_path):
    from trl import SFTConfig, SFTTrainer

    model, tok = char_llama()
    steps = 24
    adalora = AdaLoraConfig(
        init_r=6, target_r=2, tinit=4, tfinal=6, deltaT=2, total_step=steps, target_modules="all-linear"
    )
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=16, learning_rate=3e-3,
        report_to=[], save_strategy="no", use_cpu=True, max_length=64,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=prompt_completion(), processing_class=tok,
        peft_config=IMSMConfig(adapter_config=adalora), callbacks=[AdaLoraBudgetCallback()],
    )  # fmt: skip
    trainer.train()
    # The schedule masked ranks down to the budget: most singular values of lora_E are now exactly zero.
    energies = [p for n, p in trainer.model.named_parameters() if "lora_E" in n]
    kept = sum(int((e != 0).sum()) for e in energies)
    assert kept <= 2 * len(energies) + 1, kept
    assert trainer.model.peft_config["default"].adapter_config.rank_pattern is not None


def test_callback_without_adalora_is_a_clear_error(tmp_path):
    model = get_peft_model(tiny_model("llama"), IMSMConfig(adapter_config=LoraConfig(target_modules="all-linear")))
    from transformers import TrainerControl, TrainerState

    with pytest.raises(ValueError, match="no AdaLoRA adapter"):
        AdaLoraBudgetCallback().on_optimizer_step(None, TrainerState(), TrainerControl(), model=model)


def test_trl_new_token_settings_reach_the_wrapped_adapter():
    config = IMSMConfig(adapter_config=LoraConfig(target_modules="all-linear"))
    config.trainable_token_indices = {"embed_tokens": [5, 6]}
    config.modules_to_save = ["model.norm"]  # (not lm_head: IMSM refuses a trained output head)
    config.modules_to_save.append("score")
    assert config.adapter_config.trainable_token_indices == {"embed_tokens": [5, 6]}
    assert config.adapter_config.modules_to_save == ["model.norm", "score"]
    model = get_peft_model(tiny_model("llama"), config)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("trainable_tokens_delta" in n for n in names) and any("modules_to_save" in n for n in names)
