"""save_pretrained / from_pretrained round trips, checked in a fresh Python process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import ADAPTERS, adapter_config, batch, perturb_adapter, tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_imsm import AnchorConfig, IMSMConfig
from peft_imsm.gate import IMSMGate
from peft_imsm.save_load import EFFECTIVE_KEY

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


# ------------------------------------------------------------------------------------ gate_lr_scale and saved gates
GATE_WEIGHTS = {"route": ("W_R.weight", "W_R.bias"), "query": ("W_A.weight", "W_B.weight")}


def scaled_gate_model(gate_mode: str, gate_lr_scale: float = 100.0):
    """A model with ``gate_lr_scale`` and a gate far from its initialisation (as if trained): effective weights
    ``N(0, 4)``, kept divided by the scale where the gate keeps them so."""
    anchor = AnchorConfig(num_samples=4, sample_length=4) if gate_mode == "route" else None
    config = IMSMConfig(adapter_config=adapter_config("lora", identity=False), gate_mode=gate_mode,
                        gate_lr_scale=gate_lr_scale, anchor=anchor)  # fmt: skip
    model = get_peft_model(tiny_model("llama"), config)
    perturb_adapter(model)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.base_model.gate.named_parameters():
            scaled = name in ("W_B.weight", "W_R.weight", "W_R.bias")
            param.copy_(torch.randn(param.shape, generator=gen) * 2.0 / (gate_lr_scale if scaled else 1.0))
    return model.eval()


def gate_outputs(model) -> dict[str, torch.Tensor]:
    """``gate``: the gate module on fixed random inputs (the router value itself, also where the route gate runs one
    view per prompt at inference); ``recorded``: the ``[batch, seq]`` gate of the model's forward on :func:`batch`;
    ``logits``: its logits."""
    views = torch.randn(4, 2, 3, 32, generator=torch.Generator().manual_seed(4))
    ids, mask = batch()
    with torch.no_grad(), model.base_model.record_gate(per_token=True) as log:
        gate = model.base_model.gate(views[0], views[1], views[2], views[3])
        logits = model(input_ids=ids, attention_mask=mask).logits
    return {"gate": gate, "recorded": log[0], "logits": logits}


def set_saved_gate_lr_scale(adapter_dir: Path, scale: float) -> None:
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["gate_lr_scale"] = scale
    path.write_text(json.dumps(config))


def assert_same_outputs(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], exact: bool) -> None:
    for name in want:
        if exact:
            assert torch.equal(got[name], want[name]), name
        else:
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("gate_mode", ["route", "query"])
@pytest.mark.parametrize("load_scale", [100.0, 7.0, 1.0])
def test_a_saved_gate_is_the_same_gate_whatever_gate_lr_scale_it_is_loaded_with(tmp_path, gate_mode, load_scale):
    """Saved with gate_lr_scale=100, loaded with an edited adapter_config.json: the file holds the effective weights
    (and the marker), so the loaded gate and logits are the trained model's; at the same scale the stored weights
    come back bit for bit (exact resumes)."""
    model = scaled_gate_model(gate_mode)
    outputs = gate_outputs(model)
    assert (outputs["gate"] - 0.5).abs().max() > 0.3  # (a gate that a wrong scale would move towards 0.5)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert weights[EFFECTIVE_KEY].item() == 1
    effective = model.base_model.gate.router() or model.base_model.gate.projections()
    for name, value in zip(GATE_WEIGHTS[gate_mode], effective, strict=True):
        assert torch.equal(weights[f"base_model.imsm_gate.{name}"].float(), value), name

    set_saved_gate_lr_scale(tmp_path, load_scale)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    assert loaded.base_model.gate.lr_scale == load_scale
    loaded_effective = loaded.base_model.gate.router() or loaded.base_model.gate.projections()
    for name, got, want in zip(GATE_WEIGHTS[gate_mode], loaded_effective, effective, strict=True):
        torch.testing.assert_close(got, want, msg=name)
    if load_scale == 100.0:
        stored = dict(model.base_model.gate.named_parameters())
        for name, param in loaded.base_model.gate.named_parameters():
            assert param.dtype == torch.float32 and torch.equal(param, stored[name]), name
    assert_same_outputs(gate_outputs(loaded), outputs, exact=load_scale == 100.0)


def test_an_edited_gate_lr_scale_loads_the_same_gate_in_a_fresh_process(tmp_path):
    model = scaled_gate_model("route")
    tiny_model("llama").save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    set_saved_gate_lr_scale(tmp_path / "adapter", 7.0)
    torch.save(gate_outputs(model), tmp_path / "expected.pt")
    run_fresh(
        f"""
        import torch, peft_imsm
        from peft import PeftModel
        from test_save_load import assert_same_outputs, gate_outputs
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r})
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        assert model.base_model.gate.lr_scale == 7.0
        assert_same_outputs(gate_outputs(model), torch.load({str(tmp_path / "expected.pt")!r}), exact=False)
        """
    )


@pytest.mark.parametrize("gate_mode", ["route", "query"])
def test_an_adapter_saved_with_the_stored_gate_weights_loads_to_its_gate(tmp_path, gate_mode):
    """A file without the marker (written before the effective weights were saved) holds the gate's stored weights
    (divided by gate_lr_scale): loaded with the config it was saved with, it gives the same gate."""
    model = scaled_gate_model(gate_mode)
    outputs = gate_outputs(model)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    weights = {k: v for k, v in load_file(path).items() if k != EFFECTIVE_KEY}
    for name, param in model.base_model.gate.named_parameters():
        weights[f"base_model.imsm_gate.{name}"] = param.detach().clone()
    save_file(weights, path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    stored = dict(model.base_model.gate.named_parameters())
    for name, param in loaded.base_model.gate.named_parameters():
        assert torch.equal(param, stored[name]), name
    assert_same_outputs(gate_outputs(loaded), outputs, exact=True)


@pytest.mark.parametrize("scale", [1e39, 2e6])
def test_a_gate_lr_scale_beyond_the_bound_is_refused(scale):
    """Above float32's range the gate is NaN from the first forward; the bound is 1e6."""
    match = rf"gate_lr_scale must be at most 1e\+06, got {re.escape(repr(scale))}\..*float32.*NaN"
    with pytest.raises(ValueError, match=match):
        IMSMConfig(adapter_config=LoraConfig(), gate_lr_scale=scale)
    with pytest.raises(ValueError, match=rf"lr_scale must be at most 1e\+06, got {re.escape(repr(scale))}\."):
        IMSMGate(16, lr_scale=scale)
    with pytest.raises(ValueError, match="gate_lr_scale must be None or a finite number > 0"):
        IMSMConfig(adapter_config=LoraConfig(), gate_lr_scale=float("inf"))


def test_the_largest_gate_lr_scale_gives_a_finite_gate_that_saves_and_loads(tmp_path):
    model = scaled_gate_model("query", gate_lr_scale=1e6)
    outputs = gate_outputs(model)
    assert all(torch.isfinite(v).all() for v in outputs.values()) and (outputs["gate"] - 0.5).abs().max() > 0.3
    model.save_pretrained(tmp_path)
    assert_same_outputs(gate_outputs(PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()), outputs, True)
