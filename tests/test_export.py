"""``imsm-export`` on tiny models (no vLLM needed): the folder it writes, the errors for what it cannot export, and
the plugin's torch-only pieces (``imsm_vllm.lora`` / ``imsm_vllm.gate``) against peft_imsm on the exported tensors.

The end-to-end check with ``vllm serve`` on the real SmolLM2 is ``test_vllm_serving.py`` (slow, needs vLLM)."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from helpers import adapter_config, perturb_adapter, tiny_config, tiny_model
from peft import IA3Config, LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from imsm_vllm.gate import Gate
from imsm_vllm.lora import FusedLoRA
from peft_imsm import AnchorConfig, IMSMConfig
from peft_imsm.export import ADAPTER_FILE, ARCHITECTURE, ExportError, export, main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # (tiny bases without a tokenizer; peft's notes)


def saved_adapter(tmp_path, arch="llama", adapter=None, gate_mode="query", gate_scalar=False, tokenizer=False,
                  route_threshold="auto"):  # fmt: skip
    base = tiny_model(arch)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    if tokenizer:
        from imsm_bench.skills import build_tokenizer

        build_tokenizer().save_pretrained(base_dir)
    base = type(base).from_pretrained(base_dir)
    adapter = adapter or adapter_config("lora", identity=False)
    anchor = AnchorConfig() if gate_mode == "route" else None  # (the route gate learns from anchors)
    imsm = IMSMConfig(adapter_config=adapter, gate_mode=gate_mode, gate_scalar=gate_scalar, anchor=anchor,
                      route_threshold=route_threshold)  # fmt: skip
    model = get_peft_model(base, imsm)
    perturb_adapter(model)
    model.eval()
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    return model, base_dir, adapter_dir


@pytest.mark.parametrize("gate_mode", ["query", "token", "fixed", "route"])
def test_export_writes_a_folder_vllm_can_serve(tmp_path, gate_mode):
    # (the plugin format; a route gate with route_threshold None mixes both views softly. The hard-routed route gate's
    # format is test_export_route.py's)
    model, base_dir, adapter_dir = saved_adapter(tmp_path, gate_mode=gate_mode, tokenizer=True, route_threshold=None)
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


# The server command of docs/serving.md (the flags tests/test_vllm_serving.py passes through imsm_vllm.client).
SERVE = (
    "VLLM_CPU_KVCACHE_SPACE=2 python -m vllm.entrypoints.openai.api_server --model {} --dtype float32 "
    "--max-model-len 512 --enforce-eager"
)


@pytest.mark.parametrize("gate_mode,extra", [("fixed", ""), ("token", ""), ("route", " --no-enable-prefix-caching")])
def test_cli_exports_and_prints_the_serve_command(tmp_path, capsys, gate_mode, extra):
    _, base_dir, adapter_dir = saved_adapter(tmp_path, gate_mode=gate_mode, route_threshold=None)
    out = tmp_path / "out"
    assert main([str(adapter_dir), str(out), "--base", str(base_dir)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == SERVE.format(out) + extra
    assert main([str(adapter_dir), str(out)]) == 2  # exists
    err = capsys.readouterr().err
    assert "not empty (it holds " in err and "--overwrite only replaces a folder that an earlier imsm-export" in err


def tree(root):
    """Every file (path: bytes) and folder (path: None) under ``root``, to compare a folder before and after."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def user_folder(tmp_path):
    out = tmp_path / "mine"
    (out / "results").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "results" / "run1.json").write_text("{}")
    return out


def other_hidden_size_base(tmp_path):
    config = tiny_config("llama")
    config.hidden_size = 64
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base64")
    return tmp_path / "base64"


def drop_gate_tensors(adapter_dir):
    path = adapter_dir / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if "imsm_gate." not in k}, path)


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# (case, gate mode of the saved adapter, set-up: (tmp_path, adapter_dir, base_dir) -> OUT_DIR, --overwrite, the
# message's cause). Each must exit with code 2 before loading a model and leave every file as it was.
REFUSALS = [
    ("out is the adapter", "query", lambda t, a, b: a, False, "is the adapter folder"),
    ("out is the adapter, --overwrite", "query", lambda t, a, b: a, True, "is the adapter folder"),
    ("out is the base", "query", lambda t, a, b: b, True, "is the base model folder"),
    ("out contains the adapter", "query", lambda t, a, b: t, True, "contains the adapter folder"),
    ("out inside the adapter", "query", lambda t, a, b: a / "served", True, "is inside the adapter folder"),
    ("out links to the base", "query", lambda t, a, b: (t / "link").symlink_to(b) or t / "link", True,
     "is the base model folder"),
    ("out holds the user's files", "query", lambda t, a, b: user_folder(t), False,
     r"is not empty \(it holds notes.txt, results/\); nothing was written.*--overwrite only replaces a folder that an "
     "earlier imsm-export wrote"),
    ("out holds the user's files, --overwrite", "query", lambda t, a, b: user_folder(t), True,
     r"is not a folder that imsm-export wrote \(it has no config.json; it holds notes.txt, results/\), and "
     "--overwrite only replaces a folder that an earlier imsm-export wrote; nothing was deleted"),
    ("out is another model, --overwrite", "query", lambda t, a, b: tiny_model("llama").save_pretrained(t / "m") or t / "m",
     True, r"is not a folder that imsm-export wrote \(its config.json has no imsm section with format_version; it "
     r"holds config.json, generation_config.json, model.safetensors\)"),
    ("out is a file", "query", lambda t, a, b: (t / "out.txt").write_text("mine") and t / "out.txt", True,
     "is a file, not a folder"),
    ("out's parent is a file", "query", lambda t, a, b: (t / "f.txt").write_text("mine") and t / "f.txt" / "out",
     False, "cannot be created: .*f.txt is a file"),
    ("truncated safetensors", "query",
     lambda t, a, b: (a / "adapter_model.safetensors").write_bytes((a / "adapter_model.safetensors").read_bytes()[:900])
     and t / "out", False, r"adapter_model.safetensors cannot be read \(SafetensorError: .*\): the file is truncated"),
    ("garbage safetensors", "query",
     lambda t, a, b: (a / "adapter_model.safetensors").write_bytes(b"not a tensor file " * 20) and t / "out", False,
     r"adapter_model.safetensors cannot be read \(SafetensorError"),
    ("missing safetensors", "query", lambda t, a, b: (a / "adapter_model.safetensors").unlink() or t / "out", False,
     r"holds adapter_config.json but no adapter weights \(adapter_model.safetensors or adapter_model.bin\)"),
    ("invalid adapter JSON", "query", lambda t, a, b: (a / "adapter_config.json").write_text("{oops") and t / "out",
     False, r"The adapter config .*adapter_config.json cannot be read as JSON \(JSONDecodeError"),
    ("invalid base JSON", "query", lambda t, a, b: (b / "config.json").write_text("[1, 2") and t / "out", False,
     r"The base model's config .*config.json cannot be read as JSON \(JSONDecodeError"),
    ("unknown gate_mode", "query", lambda t, a, b: edit_json(a / "adapter_config.json", gate_mode="sigmoid") or t / "out",
     False, r"has gate_mode 'sigmoid', which is not an IMSM gate mode \(query, token, fixed, route\)"),
    ("base of another hidden size", "query",
     lambda t, a, b: edit_json(a / "adapter_config.json", base_model_name_or_path=str(other_hidden_size_base(t)))
     or t / "out", False,
     r"trained on a base model of hidden size 32 \(its imsm_gate.W_A.weight has shape \[8, 128\]\), but the base "
     "model's config.json has hidden_size=64. Pass the base model the adapter was trained on with --base PATH"),
    ("base of another hidden size, fixed gate", "fixed",
     lambda t, a, b: edit_json(a / "adapter_config.json", base_model_name_or_path=str(other_hidden_size_base(t)))
     or t / "out", False, r"hidden size 32 \(its base_model.model.model.layers.0.mlp.down_proj.lora_B.weight has "
     r"shape \[32, 4\]\), but the base model's config.json has hidden_size=64"),
    ("query gate tensors missing", "query", lambda t, a, b: drop_gate_tensors(a) or t / "out", False,
     r"lack the gate_mode='query' gate: imsm_gate.W_A.weight, imsm_gate.W_B.weight \(the file holds no imsm_gate"),
    ("route gate tensors missing", "route", lambda t, a, b: drop_gate_tensors(a) or t / "out", False,
     r"lack the gate_mode='route' gate: imsm_gate.W_R.weight, imsm_gate.W_R.bias"),
]  # fmt: skip


@pytest.mark.parametrize("case,gate_mode,setup,overwrite,cause", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_cli_refuses_bad_input_before_loading_and_touches_nothing(tmp_path, monkeypatch, capsys, case, gate_mode,
                                                                 setup, overwrite, cause):  # fmt: skip
    _, base_dir, adapter_dir = saved_adapter(tmp_path, gate_mode=gate_mode)
    out = setup(tmp_path, adapter_dir, base_dir)
    before = tree(tmp_path)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    capsys.readouterr()
    assert main([str(adapter_dir), str(out), *(["--overwrite"] if overwrite else [])]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    assert re.match(r"imsm-export: error: .*" + cause, captured.err), captured.err
    assert tree(tmp_path) == before  # the user's files, the adapter and the base untouched; no temporary folder


@pytest.mark.parametrize("out", [".", ".."])
def test_cli_refuses_the_working_folder_and_its_parents(tmp_path, monkeypatch, capsys, out):
    _, _, adapter_dir = saved_adapter(tmp_path, gate_mode="fixed")
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("my notes")
    monkeypatch.chdir(work)
    before = tree(tmp_path)
    assert main([str(adapter_dir), out, "--overwrite"]) == 2
    which = "the working folder" if out == "." else f"a parent of the working folder {work}"
    assert f"OUT_DIR '{out}' ({work if out == '.' else work.parent}) is {which}" in capsys.readouterr().err
    assert tree(tmp_path) == before


def test_cli_refuses_a_read_only_parent(tmp_path, capsys):
    _, _, adapter_dir = saved_adapter(tmp_path, gate_mode="fixed")
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("this user can write into a read-only folder (root): chmod has no effect")
        before = tree(tmp_path)
        assert main([str(adapter_dir), str(parent / "out")]) == 2
        err = capsys.readouterr().err
        assert f"OUT_DIR '{parent / 'out'}' cannot be written: {parent} is not writable (permission denied)" in err
        assert tree(tmp_path) == before
    finally:
        parent.chmod(0o755)


def test_overwrite_replaces_an_earlier_export_and_only_that(tmp_path, capsys):
    _, base_dir, first = saved_adapter(tmp_path / "one", gate_mode="query")
    _, _, second = saved_adapter(tmp_path / "two", gate_mode="route", route_threshold=None)
    out = tmp_path / "out"
    out.mkdir()  # (an empty folder is written into without --overwrite)
    assert main([str(first), str(out), "--base", str(base_dir)]) == 0
    (out / "tokenizer.json").write_text("{}")  # a file an export writes (from a tokenizer the base had then)
    capsys.readouterr()
    assert main([str(second), str(out), "--base", str(base_dir), "--overwrite"]) == 0
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"imsm-export: --overwrite: replacing {out} (an earlier imsm-export folder)"
    )
    assert json.loads((out / "config.json").read_text())["imsm"]["gate_mode"] == "route"
    gate_keys = {k for k in load_file(out / ADAPTER_FILE) if k.startswith("imsm.gate.")}
    assert gate_keys == {"imsm.gate.W_R", "imsm.gate.b_R"}
    assert not (out / "tokenizer.json").exists()  # replaced whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "out", "two"]  # no temporary or set-aside folder

    (out / "notes.txt").write_text("my notes")  # the user's file in an earlier export: never deleted
    before = tree(out)
    assert main([str(first), str(out), "--base", str(base_dir), "--overwrite"]) == 2
    assert "also holds files that imsm-export does not write: notes.txt." in capsys.readouterr().err
    assert tree(out) == before


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


def test_a_failed_write_leaves_the_earlier_export_and_no_temporary_folder(tmp_path, monkeypatch, capsys):
    _, base_dir, adapter_dir = saved_adapter(tmp_path, gate_mode="fixed")
    out = tmp_path / "out"
    assert main([str(adapter_dir), str(out)]) == 0
    before = tree(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("peft_imsm.export.save_file", disk_full)
    capsys.readouterr()
    assert main([str(adapter_dir), str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(
        f"imsm-export: error: Writing {out} failed (OSError: [Errno 28] No space left on device); nothing was written."
    ), err
    assert tree(tmp_path) == before  # the earlier export as it was, no .out-* folder
