"""save_pretrained / from_pretrained round trips, checked in a fresh Python process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import ADAPTERS, adapter_config, batch, perturb_adapter, tiny_model
from peft import get_peft_model
from safetensors.torch import load_file

from peft_imsm import IMSMConfig

TESTS = Path(__file__).resolve().parent


def run_fresh(code: str) -> None:
    script = f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n" + textwrap.dedent(code)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def make_and_save(tmp_path: Path, arch: str, kind: str, gate_mode: str = "query"):
    base = tiny_model(arch)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    base = type(base).from_pretrained(base_dir)
    model = get_peft_model(base, IMSMConfig(adapter_config=adapter_config(kind, identity=False), gate_mode=gate_mode))
    perturb_adapter(model)
    with torch.no_grad():
        for p in model.base_model.imsm_gate.parameters():
            p.normal_(0, 0.5)
    model.eval()
    ids, mask = batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    torch.save({"ids": ids, "mask": mask, "logits": logits}, tmp_path / "expected.pt")
    return model, base_dir, adapter_dir


@pytest.mark.parametrize("kind", ADAPTERS)
def test_saved_files_hold_only_adapter_and_gate(tmp_path, kind):
    model, _, adapter_dir = make_and_save(tmp_path, "llama", kind)
    assert sorted(p.name for p in adapter_dir.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "IMSM" and config["gate_rank"] == 8 and config["gate_mode"] == "query"
    assert (
        config["adapter_config"]["peft_type"]
        == {"lora": "LORA", "dora": "LORA", "ia3": "IA3", "adalora": "ADALORA"}[kind]
    )
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    assert {"base_model.imsm_gate.W_A.weight", "base_model.imsm_gate.W_B.weight"} <= set(weights)
    assert weights["base_model.imsm_gate.W_A.weight"].shape == (8, 4 * 32)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stored = sum(t.numel() for t in weights.values())
    base_numel = sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad)
    assert stored <= trainable + 64 and stored < base_numel / 2  # only adapter + gate (AdaLoRA stores no ranknum)


@pytest.mark.parametrize(
    "arch,kind,mode", [("llama", k, "query") for k in ADAPTERS] + [("gpt2", "lora", "token"), ("opt", "lora", "fixed")]
)
def test_fresh_process_reproduces_logits(tmp_path, arch, kind, mode):
    make_and_save(tmp_path, arch, kind, gate_mode=mode)
    run_fresh(
        f"""
        import torch, peft_imsm
        from peft import PeftConfig, PeftModel, AutoPeftModelForCausalLM
        from transformers import AutoModelForCausalLM
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        config = PeftConfig.from_pretrained({str(tmp_path / "adapter")!r})
        assert type(config).__name__ == "IMSMConfig", type(config)
        assert type(config.adapter_config).__name__ in ("LoraConfig", "IA3Config", "AdaLoraConfig"), config
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r})
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r})
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=expected["ids"], attention_mask=expected["mask"]).logits
        torch.testing.assert_close(logits, expected["logits"], atol=1e-6, rtol=0)
        assert not any(p.requires_grad for p in model.parameters())
        auto = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / "adapter")!r})
        auto.eval()
        with torch.no_grad():
            logits = auto(input_ids=expected["ids"], attention_mask=expected["mask"]).logits
        torch.testing.assert_close(logits, expected["logits"], atol=1e-6, rtol=0)
        """
    )


def test_is_trainable_resumes_training(tmp_path):
    make_and_save(tmp_path, "llama", "lora")
    run_fresh(
        f"""
        import torch, peft_imsm
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r})
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}, is_trainable=True)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert any("imsm_gate" in n for n in names) and any("lora_A" in n for n in names), names
        model.train()
        ids = torch.randint(3, 96, (2, 10))
        before = {{n: p.detach().clone() for n, p in model.named_parameters()}}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        changed = {{n for n, p in model.named_parameters() if not torch.equal(p, before[n])}}
        assert changed == set(names), (changed ^ set(names))
        """
    )


def test_loading_onto_another_hidden_size_is_a_clear_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    make_and_save(tmp_path, "llama", "lora")
    other = LlamaForCausalLM(
        LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    )
    from peft import PeftModel

    with pytest.raises(ValueError, match="another hidden size"):
        PeftModel.from_pretrained(other, tmp_path / "adapter")


def _load_warnings(base_dir: Path, adapter_dir: Path) -> list[str]:
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    return [str(w.message) for w in caught if "IMSM adapter" in str(w.message)]


@pytest.mark.parametrize("kind", [*ADAPTERS, "loha"])
def test_a_complete_adapter_loads_without_key_warnings(tmp_path, kind):
    _, base_dir, adapter_dir = make_and_save(tmp_path, "llama", kind)
    assert _load_warnings(base_dir, adapter_dir) == []


def test_missing_wrapped_adapter_weights_are_named_in_a_warning(tmp_path):
    from safetensors.torch import save_file

    _, base_dir, adapter_dir = make_and_save(tmp_path, "llama", "lora")
    path = adapter_dir / "adapter_model.safetensors"
    weights = load_file(path)
    save_file({k: v for k, v in weights.items() if "lora_" not in k}, path)
    messages = _load_warnings(base_dir, adapter_dir)
    assert len(messages) == 1 and "left" in messages[0] and "initial values" in messages[0]
    assert "lora_A.default.weight" in messages[0]


@pytest.mark.parametrize("edit", ["peft_type", "gate_mode"])
def test_a_config_that_no_longer_matches_the_weights_warns(tmp_path, edit):
    _, base_dir, adapter_dir = make_and_save(tmp_path, "llama", "lora")
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if edit == "peft_type":  # the stored LoRA weights go unused, the (IA)3 vectors stay at their initial values
        config["adapter_config"] = {"peft_type": "IA3", "target_modules": "all-linear", "feedforward_modules": []}
    else:  # a fixed gate has no weights: the stored gate goes unused
        config["gate_mode"] = "fixed"
    config_path.write_text(json.dumps(config))
    messages = _load_warnings(base_dir, adapter_dir)
    unused = [m for m in messages if "nothing in this model uses" in m]
    assert unused, messages
    assert ("lora_A" in unused[0]) if edit == "peft_type" else ("imsm_gate.default.W_A" in unused[0])
    if edit == "peft_type":
        assert any("initial values" in m and "ia3_l" in m for m in messages)


@pytest.mark.filterwarnings("ignore:You are trying to modify a model with PEFT for a second time")
def test_loading_an_adapter_twice_onto_one_base_model_is_exact(tmp_path):
    """``PeftModel.from_pretrained`` run twice on one base model (a notebook cell run again): the second model gives
    what the adapter gives on a fresh base model, in forward and generate()."""
    from peft import PeftModel

    trained = get_peft_model(tiny_model("llama"), IMSMConfig(adapter_config=adapter_config("lora", identity=False)))
    perturb_adapter(trained, scale=0.5)
    with torch.no_grad():
        for param in trained.base_model.gate.parameters():
            param.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    trained.save_pretrained(tmp_path)
    base = tiny_model("llama")
    PeftModel.from_pretrained(base, tmp_path)
    again = PeftModel.from_pretrained(base, tmp_path).eval()
    reference = PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    ids, mask = batch(seq_len=9)
    with torch.no_grad():
        torch.testing.assert_close(
            again(input_ids=ids, attention_mask=mask).logits,
            reference(input_ids=ids, attention_mask=mask).logits,
            atol=1e-6,
            rtol=0,
        )
        generated = [
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
            for model in (again, reference)
        ]  # fmt: skip
    assert torch.equal(*generated)


def test_freeze_adapter_trains_only_the_gate_also_after_loading_for_training(tmp_path):
    from peft import PeftModel

    model = get_peft_model(
        tiny_model("llama"), IMSMConfig(adapter_config=adapter_config("lora", identity=False), freeze_adapter=True)
    )
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("imsm_gate" in n for n in names)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["freeze_adapter"] is True
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == names
    loaded.base_model.set_requires_grad("default", True)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == names
