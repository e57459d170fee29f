"""``imsm-export`` on tiny models (no vLLM needed): the folder it writes, the errors for what it cannot export, and
the plugin's torch-only pieces (``imsm_vllm.lora`` / ``imsm_vllm.gate``) against peft_imsm on the exported tensors.

The end-to-end check with ``vllm serve`` on the real SmolLM2 is ``test_vllm_serving.py`` (slow, needs vLLM)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import adapter_config, perturb_adapter, tiny_model
from peft import IA3Config, LoraConfig, get_peft_model
from safetensors.torch import load_file

from imsm_vllm.gate import Gate
from imsm_vllm.lora import FusedLoRA
from peft_imsm import AnchorConfig, IMSMConfig
from peft_imsm.export import ADAPTER_FILE, ARCHITECTURE, ExportError, export, main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # (tiny bases without a tokenizer; peft's notes)


def saved_adapter(tmp_path, arch="llama", adapter=None, gate_mode="query", gate_scalar=False, tokenizer=False):
    base = tiny_model(arch)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    if tokenizer:
        from imsm_bench.skills import build_tokenizer

        build_tokenizer().save_pretrained(base_dir)
    base = type(base).from_pretrained(base_dir)
    adapter = adapter or adapter_config("lora", identity=False)
    anchor = AnchorConfig() if gate_mode == "route" else None  # (the route gate learns from anchors)
    imsm = IMSMConfig(adapter_config=adapter, gate_mode=gate_mode, gate_scalar=gate_scalar, anchor=anchor)
    model = get_peft_model(base, imsm)
    perturb_adapter(model)
    model.eval()
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    return model, base_dir, adapter_dir


@pytest.mark.parametrize("gate_mode", ["query", "token", "fixed", "route"])
def test_export_writes_a_folder_vllm_can_serve(tmp_path, gate_mode):
    model, base_dir, adapter_dir = saved_adapter(tmp_path, gate_mode=gate_mode, tokenizer=True)
    out = export(adapter_dir, tmp_path / "out")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", ADAPTER_FILE, "tokenizer_config.json"} <= names
    assert not list(tmp_path.glob(".out-*"))  # the temporary folder was renamed
    config = json.loads((out / "config.json").read_text())
    base_config = json.loads((base_dir / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE] and config["model_type"] == "llama"
    assert {k: v for k, v in config.items() if k not in ("architectures", "imsm")} == {
        k: v for k, v in base_config.items() if k != "architectures"
    }
    imsm = config["imsm"]
    assert (
        imsm["gate_mode"] == gate_mode and imsm["gate_rank"] == 8 and imsm["base_architecture"] == "LlamaForCausalLM"
    )
    assert imsm["lora_targets"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert imsm["lora_layers"] == 14  # 7 linear layers x 2 decoder layers
    assert (out / "model.safetensors").read_bytes() == (base_dir / "model.safetensors").read_bytes()
    tensors = load_file(out / ADAPTER_FILE)
    inner = model.base_model.model
    q_proj = inner.model.layers[1].self_attn.q_proj
    key = "imsm.lora.model.layers.1.self_attn.q_proj"
    assert torch.equal(tensors[f"{key}.lora_A"], q_proj.lora_A["default"].weight)
    assert torch.equal(tensors[f"{key}.lora_B"], q_proj.lora_B["default"].weight)
    assert tensors[f"{key}.scaling"].item() == q_proj.scaling["default"] == 2.0
    gate_keys = {k for k in tensors if k.startswith("imsm.gate.")}
    expected_keys = {"fixed": set(), "route": {"imsm.gate.W_R", "imsm.gate.b_R"}}
    assert gate_keys == expected_keys.get(gate_mode, {"imsm.gate.W_A", "imsm.gate.W_B"})
    if gate_mode == "route":
        W_R, b_R = model.base_model.gate.router()
        assert torch.equal(tensors["imsm.gate.W_R"], W_R) and torch.equal(tensors["imsm.gate.b_R"], b_R)


def test_cli_exports_and_reports_errors(tmp_path, capsys):
    _, base_dir, adapter_dir = saved_adapter(tmp_path, gate_mode="fixed")
    assert main([str(adapter_dir), str(tmp_path / "out"), "--base", str(base_dir)]) == 0
    assert "vllm serve" in capsys.readouterr().out
    assert main([str(adapter_dir), str(tmp_path / "out")]) == 2  # exists
    assert "not empty" in capsys.readouterr().err
    assert main([str(adapter_dir), str(tmp_path / "out"), "--overwrite"]) == 0


@pytest.mark.parametrize(
    "adapter,match",
    [
        (IA3Config(target_modules="all-linear", feedforward_modules=[]), "wraps a IA3 adapter"),
        (LoraConfig(r=4, target_modules="all-linear", use_dora=True), "use_dora=True"),
        (LoraConfig(r=4, target_modules="all-linear", lora_bias=True), "lora_bias=True"),
        (LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]), "embed_tokens"),
    ],
)
def test_export_refuses_what_the_plugin_cannot_run(tmp_path, adapter, match):
    _, _, adapter_dir = saved_adapter(tmp_path, adapter=adapter)
    with pytest.raises(ExportError, match=match):
        export(adapter_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_other_architectures_and_plain_adapters(tmp_path):
    _, _, adapter_dir = saved_adapter(tmp_path, arch="gpt2")
    with pytest.raises(ExportError, match="architecture is 'GPT2LMHeadModel'.*Llama family"):
        export(adapter_dir, tmp_path / "out")
    plain = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear"))
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ExportError, match="peft_type 'LORA', not 'IMSM'.*--enable-lora"):
        export(tmp_path / "plain", tmp_path / "out")
    with pytest.raises(ExportError, match="no adapter_config.json"):
        export(tmp_path, tmp_path / "out")


def test_rslora_and_rank_patterns_keep_peft_scalings(tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
                      rank_pattern={"v_proj": 2}, init_lora_weights=False)  # fmt: skip
    model, _, adapter_dir = saved_adapter(tmp_path, adapter=lora, gate_mode="token")
    tensors = load_file(export(adapter_dir, tmp_path / "out") / ADAPTER_FILE)
    assert tensors["imsm.lora.model.layers.0.self_attn.q_proj.scaling"].item() == pytest.approx(8 / 4**0.5)
    assert tensors["imsm.lora.model.layers.0.self_attn.v_proj.scaling"].item() == pytest.approx(8 / 2**0.5)
    assert tensors["imsm.lora.model.layers.0.self_attn.v_proj.lora_A"].shape == (2, 32)


@pytest.mark.parametrize("adapted", [("q_proj", "k_proj", "v_proj"), ("q_proj", "v_proj")])
def test_plugin_lora_and_gate_match_peft_imsm(tmp_path, adapted):
    """The plugin's LoRA on a fused q/k/v layer (all parts adapted, or k left as the base layer) and its gate give
    peft's LoRA outputs and IMSM's interwoven state."""
    model, _, adapter_dir = saved_adapter(tmp_path, gate_mode="query", gate_scalar=False)
    tensors = load_file(export(adapter_dir, tmp_path / "out") / ADAPTER_FILE)
    attn = model.base_model.model.model.layers[0].self_attn
    x = torch.randn(5, 32)
    names = ("q_proj", "k_proj", "v_proj")
    with torch.no_grad():
        want = torch.cat(
            [getattr(attn, n)(x) if n in adapted else getattr(attn, n).base_layer(x) for n in names], dim=-1
        )  # base + LoRA on the adapted parts
        base = torch.cat([getattr(attn, n).base_layer(x) for n in names], dim=-1)
    parts, col, columns = [], 0, {}
    for name in names:
        key = f"imsm.lora.model.layers.0.self_attn.{name}"
        size = tensors[f"{key}.lora_B"].shape[0]
        columns[name] = slice(col, col + size)
        if name in adapted:
            parts.append(
                (col, col + size, tensors[f"{key}.lora_A"], tensors[f"{key}.lora_B"], tensors[f"{key}.scaling"].item())
            )
        col += size
    fused = FusedLoRA()
    fused.set_parts(parts, col, torch.device("cpu"), torch.float32)
    stacked_in, stacked_out = torch.cat([x, x]), torch.cat([base, base])
    fused.add_to(stacked_in, stacked_out, 5)
    assert torch.equal(stacked_out[:5], base)  # frozen rows untouched
    torch.testing.assert_close(stacked_out[5:], want, atol=1e-6, rtol=1e-6)
    if "k_proj" not in adapted:
        k = columns["k_proj"]
        assert torch.equal(stacked_out[5:, k], base[:, k])  # k's outputs: exactly the base layer's

    gate = model.base_model.gate
    plugin_gate = Gate("query", 32, 8, False)
    plugin_gate.load(tensors, torch.device("cpu"))
    h_f, h_a, q_f, q_a = (torch.randn(7, 32) for _ in range(4))
    with torch.no_grad():
        want = gate.interweave(h_f, h_a, gate(h_f[None], h_a[None], q_f[None], q_a[None])[0])
    torch.testing.assert_close(plugin_gate(h_f, h_a, q_f, q_a), want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="gate_mode='token'.*needs"):
        Gate("token", 32, 8, False).load(tensors, torch.device("cpu"))


def test_the_plugin_refuses_base_biases_its_layers_lack():
    """vLLM's Llama loader drops a checkpoint bias that the built layer lacks, silently; the plugin refuses instead.
    Qwen2's q/k/v biases go into the fused ``qkv_proj.bias`` (the plugin builds Qwen2 layers with it)."""
    from imsm_vllm.lora import check_base_biases

    biases = [name for name in tiny_model("qwen2").state_dict() if name.endswith(".bias")]
    layers = sorted({int(name.split(".")[2]) for name in biases})
    assert {name.split(".")[-2] for name in biases} == {"q_proj", "k_proj", "v_proj"} and layers
    fused_weights = {
        f"model.layers.{i}.{layer}.weight" for i in layers for layer in ("self_attn.qkv_proj", "mlp.down_proj")
    }
    check_base_biases(biases, fused_weights | {f"model.layers.{i}.self_attn.qkv_proj.bias" for i in layers})
    with pytest.raises(ValueError, match=rf"has {len(biases)} bias tensor\(s\) .*\(model\.layers\.0\.self_attn\.q_proj"
                                         r"\.bias, .*serve the adapter with peft_imsm's generate\(\)"):  # fmt: skip
        check_base_biases(biases, fused_weights)  # (Llama layers: no bias)
    with pytest.raises(ValueError, match=r"has 1 bias tensor\(s\) .*\(model\.layers\.0\.mlp\.down_proj\.bias\)"):
        check_base_biases(["model.layers.0.mlp.down_proj.bias"], fused_weights)
