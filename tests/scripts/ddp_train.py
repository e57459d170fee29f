"""Train an IMSM LoRA model with the HF Trainer under DDP on the CPU (gloo); each rank dumps its trained weights.

Launched by ``tests/test_distributed.py``::

    torchrun --nproc_per_node 2 tests/scripts/ddp_train.py OUT_DIR [--find-unused {default,true,false}]
        [--gradient-checkpointing {none,reentrant,non-reentrant}]

Writes, under ``OUT_DIR``:

* ``rank{r}.pt``: ``{"init": ..., "trained": ..., "probe_logits": ..., "ddp_find_unused_parameters": ...}`` where
  ``init`` / ``trained`` map every trainable parameter name (wrapped adapter + IMSM gate) to its value before / after
  training, and ``probe_logits`` are the trained model's logits (eval mode) on a fixed probe batch;
* rank 0 only: ``base/`` (the untouched base model, ``save_pretrained``) and ``adapter/`` (the IMSM adapter,
  ``save_pretrained``), for the test to reload in its own process.
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import peft_imsm
from imsm_bench.skills import build_tokenizer

PROBE_PROMPTS = ["<abc> in caps:", "<hello> in caps:"]


def build_base(tokenizer) -> LlamaForCausalLM:
    """A tiny random Llama; identical on every rank (seeded)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def caps_features(tokenizer, n: int = 32) -> list[dict]:
    """Prompt ``<word> in caps:`` -> completion ``WORD<eos>``; labels -100 on the prompt."""
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7)))
        prompt = tokenizer(f"<{word}> in caps:").input_ids
        full = prompt + tokenizer(word.upper(), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append({"input_ids": full, "labels": [-100] * len(prompt) + full[len(prompt) :]})
    return rows


def collate(items: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    width = max(len(i["input_ids"]) for i in items)

    def pad(seq: list[int], value: int) -> list[int]:
        return [value] * (width - len(seq)) + seq  # left padding

    return {
        "input_ids": torch.tensor([pad(i["input_ids"], pad_id) for i in items]),
        "attention_mask": torch.tensor([pad([1] * len(i["input_ids"]), 0) for i in items]),
        "labels": torch.tensor([pad(i["labels"], -100) for i in items]),
    }


def probe_batch(tokenizer) -> dict[str, torch.Tensor]:
    return dict(tokenizer(PROBE_PROMPTS, return_tensors="pt", padding=True))


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--find-unused", choices=["default", "true", "false"], default="default")
    parser.add_argument("--gradient-checkpointing", choices=["none", "reentrant", "non-reentrant"], default="none")
    parser.add_argument("--steps", type=int, default=4)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))

    tokenizer = build_tokenizer()
    base = build_base(tokenizer)
    if rank == 0:
        base.save_pretrained(cli.out / "base")
    config = peft_imsm.IMSMConfig(adapter_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model = get_peft_model(base, config)
    init = trainable(model)

    gc = cli.gradient_checkpointing
    checkpointing = (
        {}
        if gc == "none"
        else {
            "gradient_checkpointing": True,
            "gradient_checkpointing_kwargs": {"use_reentrant": gc == "reentrant"},
        }
    )
    args = TrainingArguments(
        output_dir=str(cli.out / "trainer"), max_steps=cli.steps, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", remove_unused_columns=False, use_cpu=True, ddp_backend="gloo",
        logging_steps=1, disable_tqdm=True, seed=0, dataloader_num_workers=0,
        ddp_find_unused_parameters={"default": None, "true": True, "false": False}[cli.find_unused], **checkpointing,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=Dataset.from_list(caps_features(tokenizer)), data_collator=collate
    )
    trainer.train()
    ddp = trainer.model_wrapped
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel), type(ddp)
    assert torch.distributed.get_world_size() == 2

    model.eval()
    with torch.no_grad():
        logits = model(**probe_batch(tokenizer)).logits
    torch.save(
        {
            "init": init,
            "trained": trainable(model),
            "probe_logits": logits,
            "ddp_find_unused_parameters": ddp.find_unused_parameters,
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        },
        cli.out / f"rank{rank}.pt",
    )
    if rank == 0:
        model.save_pretrained(cli.out / "adapter")
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
