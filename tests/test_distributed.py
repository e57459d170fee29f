"""Multi-process training: 2 CPU processes (torchrun, gloo) run the HF Trainer on an IMSM LoRA model under DDP, and
a plain training loop under FSDP2 (``tests/scripts/fsdp2_train.py``, see its test). The torchrun tests are marked
slow (``python -m pytest -m slow``; CI runs them); the check of the accelerate configs is in the default run.

The DDP training script is ``tests/scripts/ddp_train.py``. What is checked:

* DDP keeps the ranks in sync: the adapter AND gate weights are identical on both ranks after training (the gate is
  a registered submodule of the peft model, so DDP broadcasts it at wrap time and all-reduces its gradients), and
  they changed from their initial values.
* Rank 0's ``save_pretrained`` output loads with ``PeftModel.from_pretrained`` in this process and reproduces that
  rank's logits.
* ``find_unused_parameters``: the Trainer wraps a peft model with ``find_unused_parameters=True`` by default (its
  "not when gradient checkpointing" rule only applies to a bare ``PreTrainedModel``). IMSM needs neither value: every
  trainable parameter (wrapped adapter + gate) is in the graph of every step — the frozen view runs the base under
  ``no_grad`` with the adapter off and owns no trainable parameter. ``ddp_find_unused_parameters=False`` works and is
  REQUIRED with reentrant gradient checkpointing: with ``True``, DDP fails with "marked as ready twice", for a plain
  LoRA peft model as well (a DDP / reentrant-checkpoint limitation, not IMSM's).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import peft_imsm  # noqa: F401  (registers IMSM with peft)
from imsm_vllm.client import free_port  # (standard library only: imports neither vLLM nor torch)
from peft_imsm.anchors import AnchorSet

SCRIPT = Path(__file__).resolve().parent / "scripts" / "ddp_train.py"
TIMEOUT_S = 90


def launch(out: Path, *script_args: str, script: Path = SCRIPT) -> list[dict]:
    """Run ``script`` on 2 CPU processes with torchrun; return each rank's dump."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONWARNINGS": "ignore",
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), str(out), *script_args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


def assert_ranks_in_sync_and_trained(dumps: list[dict]) -> None:
    rank0, rank1 = dumps
    names = list(rank0["trained"])
    assert any("imsm_gate" in n for n in names) and any("lora_A" in n for n in names)
    assert names == list(rank1["trained"])
    for name in names:
        assert torch.equal(rank0["trained"][name], rank1["trained"][name]), f"ranks differ: {name}"
        assert torch.equal(rank0["init"][name], rank1["init"][name]), f"ranks started apart: {name}"
        assert not torch.equal(rank0["trained"][name], rank0["init"][name]), f"did not train: {name}"
    assert rank0["losses"] and all(torch.isfinite(torch.tensor(rank0["losses"])))


@pytest.mark.slow  # torchrun, 2 processes
def test_ddp_trainer_keeps_ranks_in_sync_and_rank0_adapter_reloads(tmp_path):
    """Default Trainer DDP settings; rank 0's adapter reloads in this process with the same logits."""
    dumps = launch(tmp_path)
    assert_ranks_in_sync_and_trained(dumps)
    assert dumps[0]["ddp_find_unused_parameters"] is True  # the Trainer's default for a peft model
    torch.testing.assert_close(dumps[0]["probe_logits"], dumps[1]["probe_logits"], atol=0, rtol=0)

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from ddp_train import build_tokenizer, probe_batch
    finally:
        sys.path.remove(str(SCRIPT.parent))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert type(model.base_model).__name__ == "IMSMModel"
    model.eval()
    with torch.no_grad():
        logits = model(**probe_batch(build_tokenizer())).logits
    torch.testing.assert_close(logits, dumps[0]["probe_logits"], atol=1e-6, rtol=0)
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n or "imsm_gate" in n}
    assert set(loaded) == set(dumps[0]["trained"])
    for name, param in loaded.items():
        torch.testing.assert_close(param.detach(), dumps[0]["trained"][name], atol=0, rtol=0)


@pytest.mark.slow  # torchrun, 2 processes
def test_ddp_without_unused_parameter_search_and_reentrant_checkpointing(tmp_path):
    """``ddp_find_unused_parameters=False`` (no parameter of IMSM is ever unused) with reentrant checkpointing."""
    dumps = launch(tmp_path, "--find-unused", "false", "--gradient-checkpointing", "reentrant")
    assert dumps[0]["ddp_find_unused_parameters"] is False
    assert_ranks_in_sync_and_trained(dumps)


def test_example_accelerate_configs_load():
    """The recipes in examples/accelerate/ parse with accelerate's own config loader (FSDP / DeepSpeed themselves
    need GPUs and are not run here)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    folder = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
    expected = {
        "ddp": DistributedType.MULTI_GPU,
        "fsdp": DistributedType.FSDP,
        "deepspeed_zero2": DistributedType.DEEPSPEED,
        "deepspeed_zero3": DistributedType.DEEPSPEED,
    }
    for name, kind in expected.items():
        config = load_config_from_file(str(folder / f"{name}.yaml"))
        assert config.distributed_type == kind and config.num_processes >= 2 and config.mixed_precision == "bf16"
    fsdp = load_config_from_file(str(folder / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "IMSMGate" not in fsdp.get("fsdp_transformer_layer_cls_to_wrap", "")
    for stage in (2, 3):
        assert (
            load_config_from_file(str(folder / f"deepspeed_zero{stage}.yaml")).deepspeed_config["zero_stage"] == stage
        )


@pytest.mark.slow  # torchrun, 2 processes
@pytest.mark.parametrize("anchors", [False, True], ids=["plain", "shared-prefix anchors"])
def test_fsdp2_training_equals_single_process_training(tmp_path, anchors):
    """FSDP2 (fully_shard per decoder layer + root, gloo): the gate and LoRA shard like any parameter, the frozen
    view runs through the sharded layers, and 3 steps on 2 ranks give the weights of 3 single-process steps on the
    two ranks' batches together (same token count per rank, so the averaged gradient is the full batch's).
    With anchors (each rank samples its own, through the sharded model, at its first forward; they share a start, so
    the anchor term runs its prefix once per batch through the sharded layers): the reference is the mean of the two
    ranks' losses, each with that rank's anchors and anchor batch."""
    sys.path.insert(0, str(SCRIPT.parent))
    import fsdp2_train

    dumps = launch(tmp_path, *(["anchors"] if anchors else []), script=SCRIPT.parent / "fsdp2_train.py")
    rank0, rank1 = dumps
    assert any("imsm_gate" in n for n in rank0["sharded"]) and any("lora_A" in n for n in rank0["sharded"])
    for name in rank0["trained"]:
        assert torch.equal(rank0["trained"][name], rank1["trained"][name]), f"ranks differ: {name}"

    model = fsdp2_train.build_model(anchors)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    if anchors:
        assert not torch.equal(rank0["anchors"], rank1["anchors"])  # each rank its own anchors
        sets = [AnchorSet(d["anchors"], torch.ones_like(d["anchors"]), seed=r) for r, d in enumerate(dumps)]
        assert all(s.prefix_worth_sharing(fsdp2_train.ANCHORS.batch_size) == 8 for s in sets)
    for step in range(fsdp2_train.STEPS):
        if anchors:
            loss = 0.0
            for anchor_set, dump in zip(sets, dumps):
                model.base_model.set_anchors(anchor_set)
                model.base_model.anchor_term.draws = step
                ids = dump["batches"][step]
                loss = loss + model(input_ids=ids, labels=ids).loss / 2
            loss.backward()
        else:
            ids = torch.cat([rank0["batches"][step], rank1["batches"][step]])
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    reference = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(reference) == sorted(rank0["trained"])
    for name, value in reference.items():
        torch.testing.assert_close(rank0["trained"][name], value, atol=1e-5, rtol=1e-4, msg=name)
