"""Train an IMSM adapter with TRL's SFTTrainer on several processes: DDP, FSDP2 or DeepSpeed, as the accelerate config
passed to ``accelerate launch`` says. The script is the same for every recipe of this folder.

    accelerate launch --config_file examples/accelerate/fsdp.yaml examples/accelerate/train.py
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/accelerate/train.py --max_steps 100

Defaults: SmolLM2-135M-Instruct, a Llama (``fsdp.yaml`` wraps its ``LlamaDecoderLayer``; for another model set
``fsdp_transformer_layer_cls_to_wrap`` to its decoder layer class), trl-lib/Capybara, and IMSM in the recommended
setting: the route gate with self anchors that are whole chat prompts (``AnchorConfig.from_tokenizer``).
``--dataset`` also takes a local folder or data file (conversations, or prompt/completion rows).
"""

from __future__ import annotations

import argparse
import os

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import peft_imsm  # registers IMSM with peft

DATA_FILES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="hub id or local folder")
    parser.add_argument("--dataset", default="trl-lib/Capybara", help="hub name, local folder or data file")
    parser.add_argument("--output_dir", default="imsm-out")
    parser.add_argument("--max_steps", type=int, default=-1, help="optimizer steps (-1: one epoch)")
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--use_cpu", action="store_true", help="train on CPU processes (gloo), as the tests do")
    args = parser.parse_args()

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    extension = os.path.splitext(args.dataset)[1]
    if os.path.isfile(args.dataset) and extension in DATA_FILES:
        dataset = load_dataset(DATA_FILES[extension], data_files=args.dataset, split="train")
    else:
        dataset = load_dataset(args.dataset, split="train")

    peft_config = peft_imsm.IMSMConfig(
        adapter_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
        gate_mode="route",
        anchor=peft_imsm.AnchorConfig.from_tokenizer(tokenizer),  # each process samples its own anchors
    )
    training_args = SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=2,
        learning_rate=2e-4,
        max_length=args.max_length,
        bf16=True,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        ddp_find_unused_parameters=False,  # DDP only: every trainable parameter of IMSM takes part in every step
        packing=True,  # padding-free packing works with IMSM (one query summary per packed sequence)
        save_strategy="no",
        report_to="none",
        use_cpu=args.use_cpu,
    )
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[peft_imsm.IMSMLogCallback()],
    )
    trainer.train()
    if trainer.is_fsdp_enabled:  # a normal peft adapter file (the wrapped adapter AND the gate), not shards
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model()


if __name__ == "__main__":
    main()
