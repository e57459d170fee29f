"""The route gate (``gate_mode="route"``): a logistic router over the frozen view's query summary, trained by the
routing term; checked against the two views computed without IMSM, in training, generation and save/load."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import (
    ARCHS,
    adapter_config,
    batch,
    cached_step_logits,
    logits_of_hidden,
    perturb_adapter,
    plain_adapted_reference,
    tiny_model,
    train_steps,
)
from peft import PeftModel, get_peft_model

import peft_imsm
from peft_imsm import AnchorConfig, IMSMConfig
from peft_imsm.config import ROUTE_GATE_LR_SCALE
from peft_imsm.gate import IMSMGate


def routed_model(arch: str = "llama", route_threshold=None, **anchor_kwargs):
    """A route-gate model with a perturbed LoRA; the soft mix at inference unless ``route_threshold`` is given."""
    anchor = AnchorConfig(**{"num_samples": 8, "sample_length": 6, "batch_size": 4, "every": 1, **anchor_kwargs})
    config = IMSMConfig(
        adapter_config=adapter_config("lora", identity=False),
        gate_mode="route",
        anchor=anchor,
        route_threshold=route_threshold,
    )
    model = get_peft_model(tiny_model(arch), config)
    perturb_adapter(model)
    return model


def randomise_router(model, seed: int = 0) -> None:
    gate = model.base_model.gate
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # stored weights: the effective ones divided by lr_scale
        gate.W_R.weight.copy_(torch.randn(gate.W_R.weight.shape, generator=gen) * 2.0 / gate.lr_scale)
        gate.W_R.bias.copy_(torch.tensor([0.3]) / gate.lr_scale)


def reference_logits(arch: str, model, ids, mask, query_mask):
    """The route gate's output by hand: both views from models without IMSM, the frozen view's mean final state over
    ``query_mask`` per row, ``g = sigmoid(q @ W_R.T + b_R)``, the head on ``g * h_frozen + (1 - g) * h_adapted``."""
    base, adapted = tiny_model(arch), plain_adapted_reference(arch, "lora", model)
    W_R, b_R = model.base_model.gate.router()
    with torch.no_grad():
        h_frozen = base.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        h_adapted = adapted.get_base_model().get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = query_mask.float()[..., None]
        q_frozen = (h_frozen * weights).sum(1) / weights.sum(1)
        g = torch.sigmoid(q_frozen @ W_R.T + b_R)[:, None, :]  # [batch, 1, 1]: one value per sequence
        logits = logits_of_hidden(base, g * h_frozen + (1 - g) * h_adapted, ids, mask)
    return logits, g.flatten()


@pytest.mark.parametrize("arch", ARCHS)
def test_route_gate_is_a_logistic_router_over_the_frozen_query(arch):
    ids, mask = batch()
    model = routed_model(arch)
    model.eval()
    gate = model.base_model.gate
    assert gate.W_A is None and gate.W_B is None
    assert sum(p.numel() for n, p in model.named_parameters() if "imsm_gate" in n) == gate.hidden_size + 1
    with torch.no_grad():  # zero-initialised: the 50/50 mix
        with model.base_model.record_gate() as start:
            model(input_ids=ids, attention_mask=mask)
    assert torch.equal(start[0], torch.full_like(start[0], 0.5))
    randomise_router(model)
    expected, expected_gate = reference_logits(arch, model, ids, mask, mask.bool())
    with torch.no_grad(), model.base_model.record_gate(per_token=True) as seen:
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    per_token = seen[0]
    for row in range(ids.shape[0]):  # one value per sequence, the router's
        values = per_token[row][mask[row].bool()]
        torch.testing.assert_close(values, expected_gate[row].expand_as(values), atol=1e-6, rtol=0)
    assert expected_gate.std() > 0.05


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_route_gate_decodes_with_the_prompts_summary(arch):
    """The response logits of a labelled forward (query: the prompt) == prompt forward + cached steps == the hand
    reference with the prompt as the query; ``generate()`` follows the same logits."""
    model = routed_model(arch)
    randomise_router(model, seed=1)
    model.eval()
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 96, (2, 7), generator=gen)
    response = torch.randint(3, 96, (2, 5), generator=gen)
    full = torch.cat([prompt, response], dim=1)
    labels = full.masked_fill(torch.arange(12) < 7, -100)
    query = torch.arange(12).expand(2, 12) < 7
    expected, _ = reference_logits(arch, model, full, torch.ones_like(full), query)
    with torch.no_grad():
        train_logits = model(input_ids=full, labels=labels, use_cache=False).logits
        greedy = model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False)
    step_logits = cached_step_logits(model, prompt, response)
    torch.testing.assert_close(train_logits[:, 6:11], expected[:, 6:11], atol=1e-5, rtol=0)
    torch.testing.assert_close(step_logits, expected[:, 6:11], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        first, _ = reference_logits(arch, model, greedy[:, :8], torch.ones_like(greedy[:, :8]), query[:, :8])
    assert torch.equal(greedy[:, 7], first[:, 6].argmax(-1))


def test_route_gate_round_trips_and_is_saved_as_the_router(tmp_path):
    ids, mask = batch()
    model = routed_model()
    randomise_router(model)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    config = loaded.peft_config["default"]
    assert config.gate_mode == "route" and config.gate_lr_scale == ROUTE_GATE_LR_SCALE
    assert config.anchor.route_weight == 1.0
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected, atol=0, rtol=0)


def test_route_gate_learns_to_route():
    """The routing term with the route gate's defaults: the anchors go to the frozen view, the training batch to the
    adapter, within 30 steps at an adapter's learning rate."""
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :6] = -100
    model = routed_model()
    model.train()
    train_steps(model, 30, 1e-3, input_ids=ids, attention_mask=mask, labels=labels)
    model.eval()
    tuner = model.base_model
    anchors = tuner.anchor_set()
    with torch.no_grad(), tuner.record_gate() as on_target:
        model(input_ids=ids, attention_mask=mask, labels=labels)
    with torch.no_grad(), tuner.record_gate() as on_anchors:
        model(input_ids=anchors.input_ids, attention_mask=anchors.attention_mask)
    assert on_target[0].max() < 0.3 and on_anchors[0].min() > 0.8, (on_target, on_anchors)


def test_route_defaults_are_resolved_on_a_copy_and_misuse_is_refused():
    from peft import LoraConfig

    shared = AnchorConfig()
    assert shared.route_weight is None
    routed = IMSMConfig(adapter_config=LoraConfig(), gate_mode="route", anchor=shared)
    paper = IMSMConfig(adapter_config=LoraConfig(), anchor=shared)
    assert routed.anchor.route_weight == 1.0 and routed.gate_lr_scale == ROUTE_GATE_LR_SCALE
    assert paper.anchor.route_weight == 0.0 and paper.gate_lr_scale == 1.0
    assert routed.anchor.batch_size == 2 and paper.anchor.batch_size == 4
    assert shared.route_weight is None and shared.batch_size is None  # the user's object is not changed
    explicit = IMSMConfig(adapter_config=LoraConfig(), gate_mode="route", gate_lr_scale=10.0,
                          anchor=dataclasses.replace(shared, route_weight=0.5, batch_size=3))  # fmt: skip
    assert explicit.anchor.route_weight == 0.5 and explicit.gate_lr_scale == 10.0 and explicit.anchor.batch_size == 3
    reloaded = IMSMConfig(adapter_config=LoraConfig(), gate_mode="route", anchor=dataclasses.asdict(routed.anchor))
    assert reloaded.anchor == routed.anchor  # (a saved config holds the resolved values)
    with pytest.raises(ValueError, match="anchor batch_size must be an integer >= 1, got 0"):
        AnchorConfig(batch_size=0)
    with pytest.raises(ValueError, match="gate_mode='route' learns which prompts are general from the anchors"):
        IMSMConfig(adapter_config=LoraConfig(), gate_mode="route")
    with pytest.raises(ValueError, match="route_weight=0 turns it off"):
        IMSMConfig(adapter_config=LoraConfig(), gate_mode="route", anchor=AnchorConfig(route_weight=0.0))
    with pytest.raises(ValueError, match="The route-mode gate needs the frozen view's query summary"):
        IMSMGate(8, mode="route")(torch.zeros(1, 2, 8), torch.zeros(1, 2, 8))


def test_self_anchors_end_with_the_end_tokens():
    model = routed_model(start_tokens=[5, 9, 13], end_tokens=[2, 7])
    anchors = model.base_model.anchor_set()
    assert anchors.input_ids.shape == (8, 3 + 6 + 2)
    assert (anchors.input_ids[:, :3] == torch.tensor([5, 9, 13])).all()
    assert (anchors.input_ids[:, -2:] == torch.tensor([2, 7])).all()
    with pytest.raises(ValueError, match=r"AnchorConfig.end_tokens holds token id\(s\) \[100000\]"):
        routed_model(end_tokens=[100000]).base_model.anchor_set()
    with pytest.raises(ValueError, match=r"anchor end_tokens must be None \(append nothing\) or a non-empty list"):
        AnchorConfig(end_tokens=[])


def test_chat_end_tokens_are_the_end_of_the_user_turn_and_the_generation_prompt():
    from imsm_bench.skills import build_tokenizer

    tokenizer = build_tokenizer()
    with pytest.raises(ValueError, match="has no chat template, so anchors cannot end a user turn"):
        peft_imsm.chat_end_tokens(tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}<bos>user: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}bot: {% endif %}"
    )
    expected = tokenizer("\nbot: ", add_special_tokens=False)["input_ids"]
    assert peft_imsm.chat_end_tokens(tokenizer) == expected
    config = AnchorConfig.from_tokenizer(tokenizer)
    assert config.start_tokens == peft_imsm.chat_start_tokens(tokenizer) and config.end_tokens == expected
    assert AnchorConfig.from_tokenizer(tokenizer, source="data").end_tokens is None
