"""Exact numeric invariants of the dual pass, over architectures x wrapped adapters (float32)."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    ADAPTERS,
    ARCHS,
    adapter_config,
    batch,
    cached_step_logits,
    logits_of_hidden,
    perturb_adapter,
    plain_adapted_reference,
    tiny_model,
)
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from peft_imsm import IMSMConfig


def imsm(arch: str, kind: str, identity: bool = True, **config_kwargs):
    model = get_peft_model(
        tiny_model(arch), IMSMConfig(adapter_config=adapter_config(kind, identity=identity), **config_kwargs)
    )
    if not identity:
        perturb_adapter(model)
    model.eval()
    return model


@pytest.mark.parametrize("kind", ADAPTERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_identity_adapter_gives_base_logits(arch, kind):
    ids, mask = batch()
    expected = tiny_model(arch)(input_ids=ids, attention_mask=mask).logits
    got = imsm(arch, kind)(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ADAPTERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_forced_gate_gives_each_view(arch, kind):
    ids, mask = batch()
    model = imsm(arch, kind, identity=False)
    base_logits = tiny_model(arch)(input_ids=ids, attention_mask=mask).logits
    adapted_logits = plain_adapted_reference(arch, kind, model)(input_ids=ids, attention_mask=mask).logits
    assert (base_logits - adapted_logits).abs().max() > 1e-3, "the adapter must change the model for this test"
    gate = model.base_model.gate
    with torch.no_grad():
        gate.forced_value = 1.0
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, base_logits, atol=1e-6, rtol=0)
        gate.forced_value = 0.0
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, adapted_logits, atol=1e-6, rtol=0)
        gate.forced_value = None
        learned = model(input_ids=ids, attention_mask=mask).logits
    assert (learned - base_logits).abs().max() > 1e-4 and (learned - adapted_logits).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ADAPTERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_disable_adapter_gives_base_model(arch, kind):
    ids, mask = batch()
    model = imsm(arch, kind, identity=False)
    expected = tiny_model(arch)(input_ids=ids, attention_mask=mask).logits
    with model.disable_adapter():
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert (model(input_ids=ids, attention_mask=mask).logits - expected).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_fixed_mode_is_the_averaged_hidden_state(arch):
    ids, mask = batch()
    model = imsm(arch, "lora", identity=False, gate_mode="fixed")
    assert sum(p.numel() for n, p in model.named_parameters() if "imsm_gate" in n) == 0
    reference = plain_adapted_reference(arch, "lora", model)
    base = tiny_model(arch)
    with torch.no_grad():
        h_base = base.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        h_tuned = reference.get_base_model().get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = logits_of_hidden(base, 0.5 * h_base + 0.5 * h_tuned, ids, mask)
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode,factor", [("query", 4), ("token", 2)])
@pytest.mark.parametrize("arch", ARCHS)
def test_scalar_gate_is_one_convex_mix_per_token(arch, mode, factor, tmp_path):
    """``gate_scalar=True``: ``h[t] = g[t] * h_frozen[t] + (1 - g[t]) * h_adapted[t]`` with ONE ``g[t]`` per token,
    ``g = sigmoid(x @ W_A @ W_B)``, ``W_B: r x 1``; checked against the two views computed without IMSM."""
    ids, mask = batch()
    model = imsm(arch, "lora", identity=False, gate_mode=mode, gate_scalar=True, gate_dropout=0.0)
    gate = model.base_model.imsm_gate["default"]
    assert tuple(gate.W_B.weight.shape) == (1, gate.rank)
    d, r = gate.hidden_size, gate.rank
    assert sum(p.numel() for n, p in model.named_parameters() if "imsm_gate" in n) == factor * d * r + r
    with torch.no_grad():
        gate.W_B.weight.normal_(0, 3.0)  # a gate far from 0.5, different per token
    reference = plain_adapted_reference(arch, "lora", model)
    base = tiny_model(arch)
    with torch.no_grad():
        h_frozen = base.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        h_adapted = reference.get_base_model().get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        seen = []
        hook = gate.register_forward_hook(lambda module, args, output: seen.append(output))
        got = model(input_ids=ids, attention_mask=mask).logits
        hook.remove()
        (values,) = seen  # [batch, seq, d]
        assert torch.equal(values, values[..., :1].expand_as(values))  # one value per token
        assert values.std() > 0.05
        if mode == "token":  # the token gate sees only this token's two states: recompute it by hand
            x = torch.cat([h_frozen, h_adapted], dim=-1).float()
            expected_gate = torch.sigmoid(x @ gate.W_A.weight.T @ gate.W_B.weight.T)
            torch.testing.assert_close(values[..., :1], expected_gate, atol=1e-5, rtol=0)
        expected = logits_of_hidden(base, values * h_frozen + (1 - values) * h_adapted, ids, mask)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path / "scalar")
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "scalar").eval()
    assert loaded.peft_config["default"].gate_scalar is True
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_backbone_output_is_what_the_head_reads(arch):
    """IMSM interweaves the backbone's output: check that it is exactly the output head's input."""
    model = tiny_model(arch)
    seen = {}
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    ids, mask = batch()
    with torch.no_grad():
        backbone_out = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    torch.testing.assert_close(seen["x"], backbone_out, atol=0, rtol=0)


@pytest.mark.parametrize("mode,factor", [("query", 5), ("token", 3)])
@pytest.mark.parametrize("kind", ADAPTERS)
def test_trainable_parameters_are_adapter_plus_gate(kind, mode, factor):
    d, r = 32, 8
    plain = get_peft_model(tiny_model("llama"), adapter_config(kind))
    model = get_peft_model(tiny_model("llama"), IMSMConfig(adapter_config=adapter_config(kind), gate_mode=mode))
    plain_trainable, _ = plain.get_nb_trainable_parameters()
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable - plain_trainable == factor * d * r  # 4dr + rd (query) or 2dr + rd (token)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("imsm_gate" in n for n in names)
    base_names = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert base_names and all("imsm_gate" not in n for n in base_names)


def test_backward_reaches_adapter_and_gate_only_and_frozen_view_keeps_no_graph():
    model = imsm("llama", "lora", identity=False)
    model.train()
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :6] = -100
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    # The frozen view runs under no_grad: the saved activations are those of one adapted pass (compare plain LoRA).
    plain = plain_adapted_reference("llama", "lora", model)
    plain.train()
    plain_saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: plain_saved.append(t.numel()) or t, lambda t: t):
        plain(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert sum(saved) < 1.3 * sum(plain_saved)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_training_forward_equals_prompt_then_teacher_forced_steps(arch):
    """Response logits of one labelled forward == prompt-only forward + cached teacher-forced steps."""
    model = imsm(arch, "lora", identity=False)
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 96, (2, 7), generator=gen)
    response = torch.randint(3, 96, (2, 5), generator=gen)
    full = torch.cat([prompt, response], dim=1)
    labels = full.clone()
    labels[:, :7] = -100
    with torch.no_grad():
        train_logits = model(input_ids=full, labels=labels, use_cache=False).logits
    step_logits = cached_step_logits(model, prompt, response)
    torch.testing.assert_close(step_logits, train_logits[:, 6:11], atol=1e-5, rtol=1e-5)


def test_labels_loss_is_the_models_own_loss():
    model = imsm("llama", "lora", identity=False)
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        expected = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        torch.testing.assert_close(out.loss, expected)
        n = int((labels[:, 1:] != -100).sum())
        summed = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(2 * n)).loss
        torch.testing.assert_close(summed, expected / 2)


def test_query_is_prompt_and_falls_back_to_first_token():
    from peft_imsm.query import build_query_index

    labels = torch.tensor([[-100, -100, -100, 5, 6], [-100, 7, 8, 9, 1], [4, 5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    index = build_query_index(3, 5, torch.device("cpu"), attention_mask=mask, labels=labels)
    assert index.mask.tolist() == [
        [True, True, True, False, False],
        [False, True, False, False, False],  # supervised from its first real token: fallback to that token
        [True, False, False, False, False],  # every token supervised: the first token
    ]
    packed = build_query_index(
        1, 7, torch.device("cpu"), labels=torch.tensor([[-100, -100, 3, 4, -100, 5, 6]]),
        position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2]]),
    )  # fmt: skip
    assert packed.mask.tolist() == [[True, True, False, False, True, False, False]]
    assert packed.segment.tolist() == [[0, 0, 0, 0, 1, 1, 1]]


def _other_adapter(kind: str, identity: bool):
    from peft import LoHaConfig, LoKrConfig, VeraConfig

    if kind == "loha":
        return LoHaConfig(r=4, alpha=8, target_modules="all-linear", init_weights=identity)
    if kind == "lokr":
        return LoKrConfig(r=4, alpha=8, target_modules="all-linear", init_weights=identity)
    return VeraConfig(r=8, target_modules=["q_proj", "v_proj"], init_weights=identity)


@pytest.mark.parametrize("kind", ["loha", "lokr", "vera"])
def test_other_weight_adapters_wrap_exactly_and_round_trip(kind, tmp_path):
    from peft import PeftModel

    ids, mask = batch()
    base_logits = tiny_model("llama")(input_ids=ids, attention_mask=mask).logits
    fresh = get_peft_model(tiny_model("llama"), IMSMConfig(adapter_config=_other_adapter(kind, identity=True)))
    fresh.eval()
    torch.testing.assert_close(fresh(input_ids=ids, attention_mask=mask).logits, base_logits, atol=1e-6, rtol=0)
    model = get_peft_model(tiny_model("llama"), IMSMConfig(adapter_config=_other_adapter(kind, identity=False)))
    perturb_adapter(model)
    model.eval()
    ref = get_peft_model(tiny_model("llama"), _other_adapter(kind, identity=False))
    state = {k: v for k, v in get_peft_model_state_dict(model).items() if "imsm_gate" not in k}
    set_peft_model_state_dict(ref, state)
    ref.eval()
    with torch.no_grad():
        model.base_model.gate.forced_value = 0.0
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits,
            atol=1e-6, rtol=0,
        )  # fmt: skip
        model.base_model.gate.forced_value = None
        expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert type(loaded.peft_config["default"].adapter_config).__name__.lower().startswith(kind[:3])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ADAPTERS)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_a_direct_call_of_the_inner_model_is_the_adapted_view(arch, kind):
    """peft's convention: ``get_base_model()`` is the base model with the adapter injected; calling it (or its
    backbone) directly runs the adapted view alone, no gate, no frozen pass."""
    model = imsm(arch, kind, identity=False)
    reference = plain_adapted_reference(arch, kind, model)
    ids, mask = batch()
    with torch.no_grad():
        direct = model.get_base_model()(input_ids=ids, attention_mask=mask).logits
        expected = reference(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(direct, expected, atol=1e-6, rtol=0)
        hidden = model.get_base_model().get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        ref_hidden = reference.get_base_model().get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(hidden, ref_hidden, atol=1e-6, rtol=0)
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, direct, atol=1e-4)


def test_eval_and_train_reach_the_wrapped_tuner_and_mixed_adapter_batches_work():
    """``model.eval()`` reaches the wrapped tuner, so LoRA's ``adapter_names=`` mixed batches work: a row on
    ``"__base__"`` is the base model (both views are), a row on the adapter is IMSM."""
    model = imsm("llama", "lora", identity=False)
    base = tiny_model("llama")
    model.train()
    assert model.base_model.adapter_tuner.training
    model.eval()
    assert not model.base_model.adapter_tuner.training
    ids, mask = batch(batch_size=2)
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=["default", "__base__"]).logits
        alone = model(input_ids=ids[:1], attention_mask=mask[:1]).logits
        base_logits = base(input_ids=ids[1:], attention_mask=mask[1:]).logits
    torch.testing.assert_close(mixed[:1], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1:], base_logits, atol=1e-5, rtol=0)
