"""A LoRA library behind route gates: several IMSM adapters in one model (``retrofit`` with a dict, or
``add_adapter``), active together, each sequence running the base model or exactly one adapter, in mixed batches,
saved and loaded the peft way.

The routers are set so that each test prompt's router logits are +-3 (``g`` = 0.95 / 0.05): a leak of another view
changes the tokens.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from test_generation import greedy, left_padded, positions

import peft_imsm
from peft_imsm import AnchorConfig, IMSMConfig

LENGTHS = [9, 4, 6, 7, 5]
NAMES = ["sql", "extract"]
ROUTES = ["sql", "__base__", "extract", "extract", "__base__"]  # the route of each prompt of left_padded(LENGTHS)


def save_loras(tmp_path, arch: str = "llama") -> dict[str, str]:
    """Two plain LoRAs with random weights (different ranks and targets), saved as peft folders."""
    folders = {}
    attention = ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]
    for seed, (name, targets, r) in enumerate([("sql", "all-linear", 4), ("extract", attention, 2)]):
        torch.manual_seed(10 + seed)
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
        model = get_peft_model(tiny_model(arch), config)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.4)
        model.save_pretrained(tmp_path / name)
        folders[name] = str(tmp_path / name)
    return folders


def set_routers(model, arch: str, routes=ROUTES, lengths=LENGTHS) -> None:
    """Each adapter's router: logit -3 (its adapter) on the prompts routed to it, +3 (the base) elsewhere."""
    ids, mask = left_padded(lengths)
    with torch.no_grad():
        h = tiny_model(arch).get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions(mask))
        q = (h.last_hidden_state * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        design = torch.cat([q, torch.ones(len(q), 1)], 1).double()
        for name, gate in model.base_model.imsm_gate.items():
            target = torch.tensor([[-3.0 if r == name else 3.0] for r in routes]).double()
            solution = torch.linalg.lstsq(design, target).solution.float()
            gate.W_R.weight.copy_(solution[:-1].T / gate.lr_scale)
            gate.W_R.bias.copy_(solution[-1] / gate.lr_scale)


def library(tmp_path, arch: str = "llama"):
    folders = save_loras(tmp_path, arch)
    model = peft_imsm.retrofit(tiny_model(arch), folders, gate_mode="route", anchor=AnchorConfig())
    set_routers(model, arch)
    return model.eval(), folders


def references(folders, arch: str = "llama") -> dict:
    refs = {"__base__": tiny_model(arch)}
    for name, folder in folders.items():
        refs[name] = PeftModel.from_pretrained(tiny_model(arch), folder).eval()
    return refs


def expect_routes(out, refs, ids, mask, n, routes=ROUTES):
    outputs = {name: greedy(ref, ids, mask, n=n) for name, ref in refs.items()}
    for row, route in enumerate(routes):
        assert torch.equal(out[row], outputs[route][row]), f"row {row} ({route})"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_each_sequence_runs_the_base_model_or_exactly_one_adapter(tmp_path, arch):
    model, folders = library(tmp_path, arch)
    assert model.base_model.route_names == ["__base__", *NAMES]
    ids, mask = left_padded(LENGTHS)
    assert model.base_model.route(ids, mask) == ROUTES
    with model.base_model.record_gate() as seen:
        out = greedy(model, ids, mask, n=8)
    assert torch.equal(seen[0], torch.tensor([r == "__base__" for r in ROUTES]).float())
    expect_routes(out, references(folders, arch), ids, mask, n=8)
    alone = greedy(model, ids[2:3], mask[2:3], n=8)
    assert torch.equal(alone[0, -8:], out[2, -8:])


def test_beams_and_sampling_follow_each_rows_adapter(tmp_path):
    model, folders = library(tmp_path)
    refs = references(folders)
    ids, mask = left_padded(LENGTHS)

    def sample(m):
        torch.manual_seed(3)
        return m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=0,
                          pad_token_id=0, eos_token_id=None)  # fmt: skip

    sampled = {name: sample(ref) for name, ref in refs.items()}
    got = sample(model)
    for row, route in enumerate(ROUTES):
        assert torch.equal(got[row], sampled[route][row])
    beams = greedy(model, ids, mask, n=5, num_beams=2)
    expected = {name: greedy(ref, ids, mask, n=5, num_beams=2) for name, ref in refs.items()}
    for row, route in enumerate(ROUTES):
        assert torch.equal(beams[row], expected[route][row])


def test_library_saves_and_loads_the_peft_way_in_a_fresh_process(tmp_path):
    model, folders = library(tmp_path)
    ids, mask = left_padded(LENGTHS)
    out = greedy(model, ids, mask, n=6)
    model.save_pretrained(tmp_path / "library")
    assert sorted(p.name for p in (tmp_path / "library").iterdir() if p.is_dir()) == sorted(NAMES)
    torch.save({"ids": ids, "mask": mask, "out": out}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
        import peft_imsm
        from helpers import tiny_model
        from test_generation import greedy
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        model = peft_imsm.load_library(tiny_model("llama"), {str(tmp_path / "library")!r})
        assert sorted(model.base_model.route_names[1:]) == {sorted(NAMES)!r}, model.base_model.route_names
        assert torch.equal(greedy(model, expected["ids"], expected["mask"], n=6), expected["out"])
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_set_adapter_switches_between_one_adapter_and_the_library(tmp_path):
    model, folders = library(tmp_path)
    refs = references(folders)
    ids, mask = left_padded(LENGTHS)
    model.base_model.set_adapter("sql")  # one adapter: its own route gate alone (sql or the base)
    routes = ["sql" if r == "sql" else "__base__" for r in ROUTES]
    expect_routes(greedy(model, ids, mask, n=6), refs, ids, mask, n=6, routes=routes)
    model.base_model.set_adapter(NAMES)
    expect_routes(greedy(model, ids, mask, n=6), refs, ids, mask, n=6)
    with model.disable_adapter():
        assert torch.equal(greedy(model, ids, mask, n=6), greedy(refs["__base__"], ids, mask, n=6))


def test_what_a_library_refuses(tmp_path):
    model, folders = library(tmp_path)
    ids, mask = left_padded(LENGTHS)
    model.train()
    with pytest.raises(ValueError, match="does not train as one. Train each adapter alone"):
        model(input_ids=ids, attention_mask=mask, labels=ids)
    model.eval()
    with pytest.raises(ValueError, match="gate_mode='route'"):
        peft_imsm.retrofit(tiny_model("llama"), folders, gate_mode="query")
    query = IMSMConfig(adapter_config=LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="a LoRA library, where each sequence runs the base model or ONE adapter"):
        model.add_adapter("other", query)
    assert "other" not in model.peft_config
    soft = IMSMConfig(adapter_config=LoraConfig(r=2, target_modules=["q_proj"]), gate_mode="route",
                      anchor=AnchorConfig(), route_threshold=None)  # fmt: skip
    with pytest.raises(ValueError, match="route_threshold=None"):
        model.add_adapter("other", soft)
    with pytest.raises(ValueError, match="Unknown or repeated IMSM adapters"):
        model.base_model.set_adapter(["sql", "nope"])


def task_rows(low: int, high: int, n: int = 24, seed: int = 0):
    """``(input_ids, labels)`` rows whose prompts draw tokens from ``[low, high)``: one task's surface."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt = torch.randint(low, high, (6,), generator=gen).tolist()
        answer = torch.randint(3, 96, (3,), generator=gen).tolist()
        rows.append((prompt + answer, [-100] * 6 + answer))
    return rows


def test_train_gate_trains_every_router_of_the_library(tmp_path):
    folders = save_loras(tmp_path)
    anchor = AnchorConfig(num_samples=16, sample_length=6, seed=1)
    model = peft_imsm.retrofit(tiny_model("llama"), folders, gate_mode="route", anchor=anchor)
    data = {"sql": task_rows(10, 30), "extract": task_rows(60, 90, seed=1)}
    logs = peft_imsm.train_gate(model, data, steps=200, seed=0)
    assert set(logs) == set(NAMES) and all(log.steps == 200 for log in logs.values())
    assert model.base_model.active_adapter == NAMES  # the library is active again
    # each router's anchors are the self anchors plus the other task's prompts (6 tokens each)
    alone = peft_imsm.retrofit(tiny_model("llama"), folders["sql"], gate_mode="route", anchor=anchor)
    single = peft_imsm.train_gate(alone, data["sql"], steps=1, seed=0)
    assert logs["sql"].anchor_tokens > single.anchor_tokens
    held_out = {"sql": task_rows(10, 30, n=8, seed=5), "extract": task_rows(60, 90, n=8, seed=6)}
    for name, rows in held_out.items():  # (a tiny random model: weak features, so most rather than all)
        routes = model.base_model.route(torch.tensor([r[0][:6] for r in rows]))
        assert routes.count(name) >= 7, (name, routes)
    anchors = model.base_model.anchor_set()
    routes = model.base_model.route(anchors.input_ids, anchors.attention_mask)
    assert routes.count("__base__") >= 0.75 * len(routes), routes
    with pytest.raises(ValueError, match="no rows for: \\['extract'\\]"):
        peft_imsm.train_gate(model, {"sql": data["sql"]}, steps=1)
    with pytest.raises(ValueError, match="pass train_data as a dict"):
        peft_imsm.train_gate(model, data["sql"], steps=1)


def test_adapters_added_with_add_adapter_train_one_at_a_time_then_route_together():
    """``get_peft_model`` + ``add_adapter``: each IMSM adapter trains alone (``set_adapter(name)``: only its LoRA
    and gate get gradients), then ``set_adapter([...])`` routes over all of them."""

    def config(targets):
        return IMSMConfig(adapter_config=LoraConfig(r=2, target_modules=targets, init_lora_weights=False),
                          gate_mode="route", anchor=AnchorConfig(num_samples=4, sample_length=4, every=1))  # fmt: skip

    model = get_peft_model(tiny_model("llama"), config(["q_proj", "v_proj"]))
    model.add_adapter("second", config(["o_proj"]))
    assert model.base_model.active_adapter == "default"
    ids, mask = left_padded(LENGTHS)
    labels = torch.where(mask.bool(), ids, -100)
    for name in ("default", "second"):
        model.base_model.set_adapter(name)
        model.train()
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert with_grad and all(f".{name}." in n or n.endswith(f".{name}") for n in with_grad), with_grad
    model.eval()
    model.base_model.set_adapter(["default", "second"])
    set_routers(model, "llama", routes=["default", "__base__", "second", "second", "__base__"])
    refs = {"__base__": tiny_model("llama")}
    for name in ("default", "second"):
        alone = copy.deepcopy(model)
        alone.base_model.set_adapter(name)
        alone.peft_config[name].route_threshold = None
        alone.base_model.imsm_gate[name].forced_value = 0.0  # that adapter's view alone
        refs[name] = alone
    expect_routes(greedy(model, ids, mask, n=6), refs, ids, mask, n=6,
                  routes=["default", "__base__", "second", "second", "__base__"])  # fmt: skip


def test_gate_map_names_the_route_each_prompt_took(tmp_path):
    from imsm_bench.skills import build_tokenizer

    model, _ = library(tmp_path)
    tok = build_tokenizer()
    prompts = ["add 2+3=", "reverse kobe=", "is 17>9?", "capital of Rulaia?"]
    rows = [tok(p)["input_ids"] for p in prompts]
    ids, mask = left_padded([len(r) for r in rows])
    for i, r in enumerate(rows):
        ids[i, ids.shape[1] - len(r) :] = torch.tensor(r)
    with torch.no_grad():  # the routers: logits +-3 on these prompts (as set_routers does for random ones)
        h = tiny_model("llama").get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions(mask))
        q = (h.last_hidden_state * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        design = torch.cat([q, torch.ones(len(q), 1)], 1).double()
        for name, gate in model.base_model.imsm_gate.items():
            target = torch.tensor([[-3.0 if r == name else 3.0] for r in ["sql", "__base__", "extract", "__base__"]])
            solution = torch.linalg.lstsq(design, target.double()).solution.float()
            gate.W_R.weight.copy_(solution[:-1].T / gate.lr_scale)
            gate.W_R.bias.copy_(solution[-1] / gate.lr_scale)
    gmap = peft_imsm.gate_map(model, tok, prompts, max_new_tokens=3)
    assert gmap.routes == ["sql", "__base__", "extract", "__base__"]
    for row, route in enumerate(gmap.routes):
        assert set(gmap.gate[row].tolist()) == {1.0 if route == "__base__" else 0.0}
    assert [t.get_text() for t in gmap.plot().axes[0].get_yticklabels()][0].endswith("-> sql")
