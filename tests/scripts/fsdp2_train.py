"""Train an IMSM LoRA model under FSDP2 (``fully_shard``) on 2 CPU processes (gloo); dump the full trained weights.

Launched by ``tests/test_distributed.py``::

    torchrun --nproc_per_node 2 tests/scripts/fsdp2_train.py OUT_DIR [anchors]

Each decoder layer and the root peft model are sharded (what accelerate's FSDP2 plugin does with a transformer
auto-wrap policy); the gate stays in the root unit. Each rank trains 3 AdamW steps on its own batch (seeded by rank)
and writes ``rank{r}.pt``: ``{"batches": [...], "trained": {name: full tensor}, "sharded": [names of DTensor params]}``
with every trainable parameter gathered to a full tensor. With ``anchors``: self anchors that share a start (the
anchor term's shared-prefix path), sampled by each rank at its first training forward, as in Trainer training; the
dump then also holds the rank's ``"anchors"`` (ids).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

import peft_imsm

STEPS = 3
ANCHORS = peft_imsm.AnchorConfig(
    every=1, weight=0.5, num_samples=8, sample_length=4, batch_size=4, start_tokens=[5, 9, 13, 2, 7, 11, 3, 8]
)


def build_model(anchors: bool = False) -> torch.nn.Module:
    """Tiny random Llama + IMSM LoRA, identical on every rank; no dropout anywhere so runs are deterministic."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0,
    )  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    imsm = peft_imsm.IMSMConfig(adapter_config=lora, gate_dropout=0.0, anchor=ANCHORS if anchors else None)
    return get_peft_model(LlamaForCausalLM(config), imsm)


def rank_batch(rank: int, step: int) -> torch.Tensor:
    return torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(100 * rank + step))


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    anchors = sys.argv[2:] == ["anchors"]
    model = build_model(anchors)
    model.train()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batches = []
    for step in range(STEPS):
        ids = rank_batch(rank, step)
        batches.append(ids)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained, sharded = {}, []
    for name, param in model.named_parameters():
        if param.requires_grad:
            if isinstance(param, DTensor):
                sharded.append(name)
                param = param.full_tensor()
            trained[name] = param.detach().clone()
    dump = {"batches": batches, "trained": trained, "sharded": sharded}
    if anchors:
        dump["anchors"] = model.base_model.anchor_set().input_ids
    torch.save(dump, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
