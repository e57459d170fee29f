"""Fine-tune a small local model with IMSM through TRL's SFTTrainer, then generate an answer. Fully offline.

The base model is the project's own tiny "pretrained" skills LM (Llama-style, about 1.06M parameters), the one that
ships with ``imsm-bench`` (``imsm_bench.load_skills_lm()``, its one public loader; the data comes from the same
package's world, ``imsm_bench.make_examples``).
The target task (``<kobe> ends:`` -> ``ke``, the first and last letter of a word) is not one of its skills.

IMSM runs in the recommended setting for a base model without a chat template: the route gate
(``gate_mode="route"``) with data anchors, 16 prompts of each skill the model must keep answering (the README's
"Recommended settings"). The router learns to send those kinds of prompt to the frozen model and the target task to
the adapter. For an instruct model, ``anchor=peft_imsm.AnchorConfig.from_tokenizer(tokenizer)`` (self anchors that are
whole chat prompts) replaces the data anchors. Swap in your own model, dataset and anchor prompts: nothing below is
specific to IMSM except the ``peft_config`` and ``set_anchor_data``.

    python examples/sft_imsm.py [--steps 150] [--out imsm-example-adapter]
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from trl import SFTConfig, SFTTrainer

import peft_imsm
from imsm_bench import TARGET_TASK, load_skills_lm, make_examples

SKILLS = ("recall", "add", "reverse", "compare")  # what the skills LM was pretrained on


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", default="imsm-example-adapter")
    args = parser.parse_args()
    torch.manual_seed(0)

    model, tokenizer = load_skills_lm()
    rows = make_examples(TARGET_TASK, 512, seed=0, split="train")
    dataset = Dataset.from_list([{"prompt": r["input"], "completion": r["output"]} for r in rows])

    # Prompts of the skills the model must keep (no answers): the route gate's data anchors.
    anchor_prompts = [r["input"] for task in SKILLS for r in make_examples(task, 16, seed=0, split="train")]

    peft_config = peft_imsm.IMSMConfig(
        adapter_config=LoraConfig(r=16, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear"),
        gate_mode="route",
        anchor=peft_imsm.AnchorConfig(source="data"),
    )
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=args.out,
            max_steps=args.steps,
            per_device_train_batch_size=32,
            learning_rate=3e-3,
            logging_steps=25,
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            max_length=64,
        ),  # fmt: skip
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,  # completion-only loss on prompt/completion data, as with any peft config
        callbacks=[peft_imsm.IMSMLogCallback()],  # gate_mean, anchor_gate_mean, anchor_kl, task_loss in the logs
    )
    peft_imsm.set_anchor_data(trainer.model, anchor_prompts, tokenizer)
    trainer.model.print_trainable_parameters()
    trainer.train()
    trainer.model.save_pretrained(args.out)

    # Load it back the usual peft way and generate (both views, each with its own KV cache).
    model, tokenizer = load_skills_lm()
    model = PeftModel.from_pretrained(model, args.out)
    model.eval()
    prompts = [make_examples(TARGET_TASK, 1, seed=1, split="test")[0]["input"], "add 12+7="]
    gates = peft_imsm.gate_map(model, tokenizer, prompts)  # the route gate: 1 = the frozen model, 0 = the adapter
    for row, prompt in enumerate(prompts):
        inputs = tokenizer([prompt], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id)
        answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        print(f"{prompt!r} -> {answer!r} (gate {gates.prompt_mean(row):.2f})")


if __name__ == "__main__":
    main()
