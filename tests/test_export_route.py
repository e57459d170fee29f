"""``imsm-export`` of a hard-routed route gate (the route format, ``peft_imsm.export_route``) on tiny models, no vLLM:
the base model's files, a plain peft LoRA that is the IMSM model's adapted view, the router; the routing that
``imsm-serve`` does on those files is the hard-routed IMSM model's; and the names both sides share
(``imsm_vllm.export_format``): what the export writes is what the plugin's and ``imsm-serve``'s loaders read.

The end-to-end check with ``imsm-serve`` and vLLM on SmolLM2 is ``test_vllm_serving.py`` (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import tiny_config, tiny_model
from peft import PeftModel
from peft.tuners.lora import LoraModel
from safetensors.torch import load_file, save_file
from test_export import saved_adapter, tree
from test_generation import greedy, left_padded
from test_hard_routing import FROZEN, LENGTHS, hard_routed
from transformers import AutoModelForCausalLM

from imsm_vllm import export_format as fmt
from imsm_vllm.gate import Gate
from imsm_vllm.lora import LayerLoRA, attach_lora
from imsm_vllm.router import RouteError, load_route, router_value
from peft_imsm.export import export, main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # (tiny bases without a tokenizer; peft's notes)


def routed_adapter(tmp_path, route_threshold=0.5, **kwargs):
    """A saved route-gate adapter (perturbed LoRA) whose router is random too (not the zero-initialised g = 0.5)."""
    model, base_dir, adapter_dir = saved_adapter(
        tmp_path, gate_mode="route", route_threshold=route_threshold, **kwargs
    )
    gate = model.base_model.gate
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        gate.W_R.weight.copy_(torch.randn(gate.W_R.weight.shape, generator=gen) / gate.lr_scale)
        gate.W_R.bias.copy_(torch.randn(1, generator=gen) / gate.lr_scale)
    model.save_pretrained(adapter_dir)
    return model, base_dir, adapter_dir


def mean_final_state(model, ids: torch.Tensor) -> torch.Tensor:
    """``[d]`` float32: the mean of ``model``'s final (normed) hidden states over the one prompt ``ids``
    (``[1, n]``) -- what vLLM's MEAN pooling returns, the router's input."""
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].float().mean(0)


@pytest.mark.parametrize("route_threshold", [0.5, 0.7])
def test_route_export_writes_the_base_a_plain_lora_and_the_router(tmp_path, route_threshold):
    model, base_dir, adapter_dir = routed_adapter(tmp_path, route_threshold=route_threshold, tokenizer=True)
    out = export(adapter_dir, tmp_path / "out")
    base_files = {p.name for p in base_dir.iterdir()}
    assert {p.name for p in out.iterdir()} == base_files | {fmt.ROUTE_CONFIG_FILE, fmt.LORA_DIR, "router"}
    for name in base_files:  # the base model's folder as it is: config.json (its architecture), weights, tokenizer
        assert (out / name).read_bytes() == (base_dir / name).read_bytes(), name
    assert sorted(p.name for p in (out / fmt.LORA_DIR).iterdir()) == sorted(fmt.LORA_FILES)
    assert json.loads((out / fmt.ROUTE_CONFIG_FILE).read_text()) == {
        "format_version": fmt.ROUTE_FORMAT_VERSION, "gate_mode": "route", "threshold": route_threshold,
        "lora_name": fmt.LORA_NAME, "lora_dir": fmt.LORA_DIR, "router_file": fmt.ROUTER_FILE, "lora_rank": 4,
        "max_lora_rank": 8, "hidden_size": 32, "base_architecture": "LlamaForCausalLM", "base_model": str(base_dir),
        "adapter": str(adapter_dir),
    }  # fmt: skip
    W_R, b_R = model.base_model.gate.router()
    router = load_file(out / fmt.ROUTER_FILE)
    assert router.keys() == {fmt.ROUTER_WEIGHT, fmt.ROUTER_BIAS}
    assert torch.equal(router[fmt.ROUTER_WEIGHT], W_R) and torch.equal(router[fmt.ROUTER_BIAS], b_R)
    assert router[fmt.ROUTER_WEIGHT].dtype == torch.float32 and W_R.abs().sum() > 0

    lora_config = json.loads((out / fmt.LORA_DIR / "adapter_config.json").read_text())
    wrapped = json.loads((adapter_dir / "adapter_config.json").read_text())["adapter_config"]
    assert lora_config["peft_type"] == "LORA" and lora_config["base_model_name_or_path"] == str(base_dir)
    assert sorted(lora_config["target_modules"]) == sorted(wrapped["target_modules"])  # (a set in the config)
    for key in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "init_lora_weights", "use_dora"):
        assert lora_config[key] == wrapped[key], key
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / fmt.LORA_DIR).eval()
    assert type(plain.base_model) is LoraModel  # a plain peft LoRA model, no IMSM in it
    served_base = AutoModelForCausalLM.from_pretrained(out).eval()
    ids, mask = left_padded(LENGTHS)
    gate = model.base_model.gate
    model.base_model.stacked_views = False  # (each view as its own pass over the batch, as the plain models run)
    with torch.no_grad():
        try:
            gate.forced_value = 0.0  # the adapted view alone
            adapted = model(input_ids=ids, attention_mask=mask).logits
            gate.forced_value = 1.0  # the frozen view alone
            frozen = model(input_ids=ids, attention_mask=mask).logits
        finally:
            gate.forced_value = None
        assert torch.equal(plain(input_ids=ids, attention_mask=mask).logits, adapted)
        assert torch.equal(served_base(input_ids=ids, attention_mask=mask).logits, frozen)
    assert not torch.equal(adapted, frozen)


def test_route_export_is_the_hard_routed_model(tmp_path):
    """For each prompt, the route computed from the exported files as imsm-serve computes it (the base's mean final
    state, ``router_value``, ``route_of``) is the route that peft_imsm's hard-routed ``generate()`` takes, and the
    exported base / LoRA folder generate exactly its tokens."""
    model = hard_routed("llama")  # router logits +2 / -2 on the prompts of left_padded(LENGTHS), as FROZEN says
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_model("llama").save_pretrained(base_dir)
    model.save_pretrained(adapter_dir)
    out = export(adapter_dir, tmp_path / "out", base=str(base_dir))
    route = load_route(out)
    served_base = AutoModelForCausalLM.from_pretrained(out).eval()
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), route.lora_dir).eval()
    ids, mask = left_padded(LENGTHS)
    for row, (n, frozen) in enumerate(zip(LENGTHS, FROZEN.tolist())):
        prompt = ids[row : row + 1, -n:]
        g = router_value(mean_final_state(served_base, prompt), route.W_R, route.b_R)
        assert fmt.route_of(g, route.threshold) == ("frozen" if frozen else "adapted"), (row, g)
        with model.base_model.record_gate() as seen:
            want = greedy(model, prompt, torch.ones_like(prompt), n=10)
        assert torch.equal(seen[0], torch.tensor([float(frozen)]))  # the route peft_imsm took
        served = served_base if frozen else plain
        assert torch.equal(greedy(served, prompt, torch.ones_like(prompt), n=10), want), row


def test_cli_prints_the_imsm_serve_command(tmp_path, capsys):
    _, base_dir, adapter_dir = routed_adapter(tmp_path)
    out = tmp_path / "out"
    assert main([str(adapter_dir), str(out), "--base", str(base_dir)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"VLLM_CPU_KVCACHE_SPACE=2 imsm-serve {out} --port 8000 --dtype float32 --max-model-len 512 --enforce-eager"
    )


def test_overwrite_replaces_either_format_and_keeps_the_users_files(tmp_path, capsys):
    _, base_dir, hard = routed_adapter(tmp_path / "hard")
    _, _, soft = saved_adapter(tmp_path / "soft", gate_mode="route", route_threshold=None)
    out = tmp_path / "out"
    assert main([str(hard), str(out), "--base", str(base_dir)]) == 0
    assert main([str(soft), str(out), "--base", str(base_dir), "--overwrite"]) == 0  # route format -> plugin format
    assert not (out / fmt.ROUTE_CONFIG_FILE).exists() and (out / fmt.ADAPTER_FILE).is_file()
    assert main([str(hard), str(out), "--base", str(base_dir), "--overwrite"]) == 0  # and back
    assert (out / fmt.ROUTE_CONFIG_FILE).is_file() and not (out / fmt.ADAPTER_FILE).exists()
    (out / fmt.LORA_DIR / "notes.txt").write_text("my notes")  # the user's file inside the LoRA folder
    before = tree(out)
    capsys.readouterr()
    assert main([str(soft), str(out), "--base", str(base_dir), "--overwrite"]) == 2
    assert f"also holds files that imsm-export does not write: {fmt.LORA_DIR}/." in capsys.readouterr().err
    assert tree(out) == before


def test_the_plugin_format_is_what_the_plugin_loads(tmp_path):
    """Every tensor the export writes for the plugin is one the plugin's loaders (``attach_lora``, ``Gate.load``)
    take, by the names of ``imsm_vllm.export_format``, and the config names its architecture and version."""
    _, _, adapter_dir = saved_adapter(tmp_path, gate_mode="query")
    out = export(adapter_dir, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [fmt.ARCHITECTURE]
    assert config[fmt.CONFIG_SECTION]["format_version"] == fmt.FORMAT_VERSION
    assert config[fmt.CONFIG_SECTION]["adapter_file"] == fmt.ADAPTER_FILE
    tensors = load_file(out / fmt.ADAPTER_FILE)
    assert all(key.startswith(fmt.TENSOR_PREFIX) for key in tensors)
    c = tiny_config("llama")
    head_dim = c.hidden_size // c.num_attention_heads
    sizes = {"self_attn.qkv_proj": (c.hidden_size, c.num_key_value_heads * head_dim, c.num_key_value_heads * head_dim),
             "self_attn.o_proj": (c.hidden_size,), "mlp.gate_up_proj": (c.intermediate_size, c.intermediate_size),
             "mlp.down_proj": (c.hidden_size,)}  # fmt: skip
    loras = [LayerLoRA() for _ in range(c.num_hidden_layers)]
    used = attach_lora(loras, loras, tensors, sizes, torch.device("cpu"), torch.float32)
    used |= Gate("query", c.hidden_size, 8, False).load(tensors, torch.device("cpu"))
    assert used == set(tensors)
    assert {key for key in tensors if fmt.split_lora_key(key) is None} == set(fmt.GATE_TENSORS["query"])


ROUTE_DAMAGE = [
    ("no route file", lambda out: (out / fmt.ROUTE_CONFIG_FILE).unlink(), r"holds no imsm_route.json"),
    ("plugin export", None, r"is an imsm-export folder for the imsm_vllm plugin .*python -m vllm.entrypoints"),
    ("newer format", lambda out: _edit_route(out, format_version=2), r"format_version 2; this imsm-serve reads version 1"),
    ("threshold", lambda out: _edit_route(out, threshold=1.5), r"threshold 1.5; it must be a number strictly between"),
    ("missing key", lambda out: _edit_route(out, lora_name=None), r"lacks lora_name"),
    ("lora rank", lambda out: _edit_route(out, max_lora_rank=12), r"max_lora_rank 12, which vLLM's --max-lora-rank"),
    ("lora file", lambda out: (out / fmt.LORA_DIR / "adapter_model.safetensors").unlink(),
     r"lora lacks adapter_model.safetensors"),
    ("router shape", lambda out: save_file({fmt.ROUTER_WEIGHT: torch.zeros(1, 16), fmt.ROUTER_BIAS: torch.zeros(1)},
                                           out / fmt.ROUTER_FILE), r"W_R is torch.float32 of shape \(1, 16\); hidden "
     r"size 32 needs float32 of shape \(1, 32\)"),
    ("router NaN", lambda out: save_file({fmt.ROUTER_WEIGHT: torch.full((1, 32), float("nan")),
                                          fmt.ROUTER_BIAS: torch.zeros(1)}, out / fmt.ROUTER_FILE), r"W_R holds NaN"),
    ("router garbage", lambda out: (out / fmt.ROUTER_FILE).write_bytes(b"not a tensor file" * 9),
     r"router file .* cannot be read \(SafetensorError"),
]  # fmt: skip


def _edit_route(out, **changes):
    path = out / fmt.ROUTE_CONFIG_FILE
    config = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


@pytest.mark.parametrize("case,damage,message", ROUTE_DAMAGE, ids=[c[0] for c in ROUTE_DAMAGE])
def test_imsm_serve_refuses_a_folder_it_cannot_serve(tmp_path, capsys, case, damage, message):
    """Before starting any server: one error line with the cause and what to do, exit code 2."""
    from imsm_vllm.router import main as serve_main

    threshold = None if damage is None else 0.5
    _, base_dir, adapter_dir = routed_adapter(tmp_path, route_threshold=threshold)
    out = export(adapter_dir, tmp_path / "out", base=str(base_dir))
    if damage is not None:
        damage(out)
    with pytest.raises(RouteError, match=message):
        load_route(out)
    capsys.readouterr()
    assert serve_main([str(out), "--dtype", "float32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imsm-serve: error: ") and err.count("\n") == 1


@pytest.mark.parametrize("args,where", [(["--enable-lora"], "The vLLM options"), (["--model=x"], "The vLLM options"),
                                        (["--generate-args", "--runner pooling"], "--generate-args"),
                                        (["--pooling-args", "--lora-modules a=b"], "--pooling-args")])  # fmt: skip
def test_imsm_serve_refuses_the_options_it_sets(tmp_path, capsys, args, where):
    from imsm_vllm.router import main as serve_main

    assert serve_main([str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    name = args[-1].split()[0].split("=")[0]
    assert err.startswith(f"imsm-serve: error: {where} holds {name}, which imsm-serve sets itself")


def test_route_decision_and_router_value():
    """``route_of`` is peft_imsm's rule (frozen where g > threshold, compared in float32) and ``router_value`` is
    ``IMSMGate``'s route gate value."""
    from peft_imsm.gate import IMSMGate

    gate = IMSMGate(32, mode="route", lr_scale=100.0)
    with torch.no_grad():
        gate.W_R.weight.copy_(torch.randn(1, 32, generator=torch.Generator().manual_seed(0)) / 100)
        gate.W_R.bias.fill_(0.002)
    q = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    want = gate(q[None], q[None], q[None])[0, :, 0]
    got = torch.tensor([router_value(row, *gate.router()) for row in q])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert [fmt.route_of(g, 0.5) for g in (0.5, 0.5000001, 0.2, 0.9)] == ["adapted", "frozen", "adapted", "frozen"]
    g = float(torch.tensor(0.1, dtype=torch.float32))  # 0.10000000149..., the float32 nearest 0.1, above 0.1
    assert g > 0.1 and not bool(torch.tensor(g) > 0.1)  # (torch compares in float32)
    assert fmt.route_of(g, 0.1) == "adapted" and fmt.route_of(float(torch.tensor(0.1001)), 0.1) == "frozen"


def test_export_format_imports_no_framework():
    """Both environments import it: no torch, vLLM, peft or transformers behind it."""
    code = (
        "import sys, imsm_vllm.export_format, imsm_vllm.client\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'vllm', 'peft', 'transformers', 'peft_imsm'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_imsm_serve_refuses_a_malformed_environment_option(tmp_path, capsys):
    from imsm_vllm.router import main as serve_main

    assert serve_main([str(tmp_path), "--pooling-env", "OMP_NUM_THREADS"]) == 2
    assert capsys.readouterr().err == (
        "imsm-serve: error: --pooling-env 'OMP_NUM_THREADS' is not NAME=VALUE. Pass e.g. --pooling-env "
        "OMP_NUM_THREADS=1.\n"
    )


def test_imsm_serve_starts_vllm_with_the_exports_lora_and_mean_pooling(tmp_path):
    """The two vLLM servers' commands: the LoRA of the export under its name, the rank it needs, two LoRA slots (see
    imsm_vllm.router.MAX_LORAS); the pooling runner with MEAN pooling and no normalisation; the user's options last."""
    from imsm_vllm.router import generation_command, pooling_command

    _, base_dir, adapter_dir = routed_adapter(tmp_path)
    out = export(adapter_dir, tmp_path / "out", base=str(base_dir))
    route = load_route(out)
    head = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(out), "--host", "127.0.0.1"]
    assert generation_command(route, 1234, "base", ["--dtype", "float32"], ["--max-num-seqs", "4"]) == [
        *head, "--port", "1234", "--served-model-name", "base", "--enable-lora", "--lora-modules",
        f"imsm-adapted={out / 'lora'}", "--max-lora-rank", "8", "--max-loras", "2", "--dtype", "float32",
        "--max-num-seqs", "4",
    ]  # fmt: skip
    assert pooling_command(route, 1235, "base", ["--dtype", "float32"], []) == [
        *head, "--port", "1235", "--served-model-name", "base", "--runner", "pooling", "--convert", "embed",
        "--pooler-config", '{"pooling_type": "MEAN", "use_activation": false}', "--dtype", "float32",
    ]  # fmt: skip
