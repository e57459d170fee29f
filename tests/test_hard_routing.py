"""Hard routing (``IMSMConfig.route_threshold``): each sequence runs one view, chosen at prefill, exactly the base
model or the adapter alone, in mixed batches, in every decoding mode, on one KV cache.

The router is set so that its logit is +2 or -2 on each test prompt (``g`` = 0.88 or 0.12): the soft mix there is
far from either view, so any leak of the other view changes the tokens or the logits.
"""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import adapter_config, perturb_adapter, plain_adapted_reference, tiny_model
from peft import PeftModel, get_peft_model
from test_generation import greedy, left_padded, positions
from transformers import TextStreamer

import peft_imsm
from peft_imsm import AnchorConfig, IMSMConfig

ROUTE_ARCHS = ["llama", "qwen3", "gpt2", "opt"]
LENGTHS = [9, 4, 6, 7]
FROZEN = torch.tensor([True, False, False, True])  # the route of each prompt of `left_padded(LENGTHS)`


def hard_routed(arch: str, kind: str = "lora", route_threshold=0.5, routes=FROZEN, lengths=LENGTHS):
    """A route-gate model (perturbed adapter) whose router logit is +2 (frozen) / -2 (adapter) on each prompt of
    ``left_padded(lengths)`` as ``routes`` says."""
    anchor = AnchorConfig(num_samples=4, sample_length=4)
    config = IMSMConfig(
        adapter_config=adapter_config(kind, identity=False),
        gate_mode="route",
        anchor=anchor,
        route_threshold=route_threshold,
    )
    model = get_peft_model(tiny_model(arch), config)
    perturb_adapter(model, scale=0.5)
    model.eval()
    fit_router(model, arch, *left_padded(lengths), routes)
    return model


def fit_router(model, arch, ids, mask, routes) -> None:
    """Set the router so that its logit on row ``i`` is +2 where ``routes[i]`` and -2 elsewhere (least squares on the
    frozen view's mean final state over each prompt as ``generate()`` computes it, exact for fewer prompts than
    hidden dimensions)."""
    with torch.no_grad():
        decoder = tiny_model(arch).get_decoder()
        h = decoder(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state
        w = mask.float()[..., None]
        q = (h * w).sum(1) / w.sum(1)
        target = torch.where(routes, 2.0, -2.0)[:, None].double()
        design = torch.cat([q, torch.ones(len(q), 1)], 1).double()
        solution = torch.linalg.lstsq(design, target).solution.float()
        gate = model.base_model.gate
        gate.W_R.weight.copy_(solution[:-1].T / gate.lr_scale)
        gate.W_R.bias.copy_(solution[-1] / gate.lr_scale)
        logits = q @ gate.router()[0].T + gate.router()[1]
    assert torch.allclose(logits.flatten(), target.flatten().float(), atol=1e-3)


def references(arch: str, kind: str, model):
    return tiny_model(arch), plain_adapted_reference(arch, kind, model)


def expect_rows(out, base_out, adapter_out, routes=FROZEN):
    for row, frozen in enumerate(routes.tolist()):
        want = base_out[row] if frozen else adapter_out[row]
        assert torch.equal(out[row], want), f"row {row} ({'frozen' if frozen else 'adapter'}-routed)"


@pytest.mark.parametrize("arch", ROUTE_ARCHS)
def test_greedy_is_the_base_model_or_the_adapter_alone_in_a_mixed_batch(arch):
    model = hard_routed(arch)
    base, adapter = references(arch, "lora", model)
    ids, mask = left_padded(LENGTHS)
    with model.base_model.record_gate() as seen:
        out = greedy(model, ids, mask, n=10)
    expect_rows(out, greedy(base, ids, mask, n=10), greedy(adapter, ids, mask, n=10))
    assert all(torch.equal(step, FROZEN.float()) for step in seen)  # the route each row took, at every step
    # The soft mix (no threshold) answers otherwise: the test sees a leak of the other view.
    model.peft_config["default"].route_threshold = None
    soft = greedy(model, ids, mask, n=10)
    assert not torch.equal(soft, out)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_step_logits_are_each_views_own_on_one_cache(arch):
    model = hard_routed(arch)
    base, adapter = references(arch, "lora", model)
    ids, mask = left_padded(LENGTHS)
    kwargs = dict(output_logits=True, return_dict_in_generate=True)
    out = greedy(model, ids, mask, n=6, **kwargs)
    base_out, adapter_out = greedy(base, ids, mask, n=6, **kwargs), greedy(adapter, ids, mask, n=6, **kwargs)
    for step, base_logits, adapter_logits in zip(out.logits, base_out.logits, adapter_out.logits, strict=True):
        torch.testing.assert_close(step[FROZEN], base_logits[FROZEN], atol=1e-6, rtol=0)
        torch.testing.assert_close(step[~FROZEN], adapter_logits[~FROZEN], atol=1e-5, rtol=0)
    cache = out.past_key_values  # one cache of `batch` rows, each holding its own view's key/values
    assert (
        cache.imsm_routed and cache.imsm_frozen is None and torch.equal(cache.imsm_routes, torch.where(FROZEN, -1, 0))
    )
    assert cache.layers[0].keys.shape[0] == ids.shape[0]


def test_sampling_beams_and_return_sequences_follow_each_rows_view():
    model = hard_routed("llama")
    base, adapter = references("llama", "lora", model)
    ids, mask = left_padded(LENGTHS)

    def sample(m):
        torch.manual_seed(7)
        return m.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=0, temperature=1.5,
            eos_token_id=None, pad_token_id=0,
        )  # fmt: skip

    expect_rows(sample(model), sample(base), sample(adapter))
    beams = dict(num_beams=3, num_return_sequences=2)
    out = greedy(model, ids, mask, n=6, **beams)
    twice = FROZEN.repeat_interleave(2)
    expect_rows(out, greedy(base, ids, mask, n=6, **beams), greedy(adapter, ids, mask, n=6, **beams), twice)


class Capture(TextStreamer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.texts: list[str] = []

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.texts.append(text)


def test_stop_strings_streamer_and_assisted_decoding():
    from imsm_bench.skills import build_tokenizer

    tok = build_tokenizer()
    for frozen in (True, False):
        routes = torch.tensor([frozen])
        model = hard_routed("llama", routes=routes, lengths=[9])
        reference = tiny_model("llama") if frozen else plain_adapted_reference("llama", "lora", model)
        one, one_mask = left_padded([9])
        text = tok.decode(greedy(reference, one, one_mask, n=8)[0, 9:])
        stop = text[2:4]
        stopped = greedy(model, one, one_mask, n=8, stop_strings=[stop], tokenizer=tok)
        assert torch.equal(stopped, greedy(reference, one, one_mask, n=8, stop_strings=[stop], tokenizer=tok))
        streamer = Capture(tok, skip_prompt=True)
        greedy(model, one, one_mask, n=5, streamer=streamer)
        assert "".join(streamer.texts) == tok.decode(greedy(reference, one, one_mask, n=5)[0, 9:])
        assisted = greedy(model, one, one_mask, n=8, assistant_model=tiny_model("llama", seed=3))
        assert torch.equal(assisted, greedy(reference, one, one_mask, n=8))


def test_one_view_per_step_no_lora_on_frozen_batches_and_one_rerun_at_prefill():
    """Counting the passes: a frozen-routed batch never runs a LoRA layer (the base model's cost); an adapter-routed
    one runs the frozen prefill (the router's input) and the adapter's, then one pass per token."""
    backbone_calls, lora_calls = [], []
    for frozen in (True, False):
        routes = torch.tensor([frozen, frozen])
        model = hard_routed("llama", routes=routes, lengths=[5, 8])
        backbone = model.base_model.dual_pass.backbone
        lora_A = next(m for n, m in model.named_modules() if n.endswith("q_proj.lora_A.default"))
        calls, lora = [0], [0]
        h1 = backbone.register_forward_pre_hook(lambda *a, c=calls: c.__setitem__(0, c[0] + 1))
        h2 = lora_A.register_forward_hook(lambda *a, c=lora: c.__setitem__(0, c[0] + 1))
        greedy(model, *left_padded([5, 8]), n=6)
        h1.remove(), h2.remove()
        backbone_calls.append(calls[0])
        lora_calls.append(lora[0])
    assert backbone_calls == [6, 7] and lora_calls == [0, 6]  # prefill (+ adapter rerun) and 5 decode steps


@pytest.mark.parametrize("kind", ["ia3", "dora"])
def test_other_adapters_route_exactly_through_both_views(kind):
    model = hard_routed("llama", kind=kind)
    base, adapter = references("llama", kind, model)
    ids, mask = left_padded(LENGTHS)
    out = greedy(model, ids, mask, n=8)
    expect_rows(out, greedy(base, ids, mask, n=8), greedy(adapter, ids, mask, n=8))


def test_forward_without_autograd_routes_and_training_keeps_the_soft_gate():
    model = hard_routed("llama")
    base, adapter = references("llama", "lora", model)
    ids, mask = left_padded(LENGTHS)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        want_frozen = base(input_ids=ids, attention_mask=mask).logits
        want_adapter = adapter(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert torch.equal(got[FROZEN][valid[FROZEN]], want_frozen[FROZEN][valid[FROZEN]])
    torch.testing.assert_close(got[~FROZEN][valid[~FROZEN]], want_adapter[~FROZEN][valid[~FROZEN]], atol=1e-5, rtol=0)
    with model.base_model.record_gate() as seen:
        soft = model(input_ids=ids, attention_mask=mask).logits  # with autograd: the soft gate, as in training
    assert torch.allclose(seen[0], torch.where(FROZEN, 0.8808, 0.1192), atol=1e-3)
    assert not torch.allclose(soft, got, atol=1e-3)


def test_threads_sharing_a_hard_routed_model_each_get_their_own_routes():
    model = hard_routed("llama")
    ids, mask = left_padded(LENGTHS)
    alone = [greedy(model, ids[i : i + 1], mask[i : i + 1], n=8) for i in range(len(LENGTHS))]
    results: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        for _ in range(3):
            results[i] = greedy(model, ids[i : i + 1], mask[i : i + 1], n=8)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(LENGTHS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(results[i], alone[i]) for i in range(len(LENGTHS)))


def test_route_threshold_is_saved_loaded_and_checked(tmp_path):
    model = hard_routed("llama", route_threshold=0.7)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert loaded.peft_config["default"].route_threshold == 0.7
    ids, mask = left_padded(LENGTHS)
    assert torch.equal(greedy(loaded, ids, mask), greedy(model, ids, mask))
    lora = adapter_config("lora")
    assert IMSMConfig(adapter_config=lora, gate_mode="route", anchor=AnchorConfig()).route_threshold == 0.5
    assert (
        IMSMConfig(adapter_config=lora, gate_mode="route", anchor=AnchorConfig(), route_threshold=None).route_threshold
        is None
    )
    assert IMSMConfig(adapter_config=lora).route_threshold is None
    with pytest.raises(ValueError, match="gate_mode='query' has none"):
        IMSMConfig(adapter_config=lora, route_threshold=0.5)
    for bad in (0.0, 1.0, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            IMSMConfig(adapter_config=lora, gate_mode="route", anchor=AnchorConfig(), route_threshold=bad)
    assert peft_imsm.IMSMConfig is IMSMConfig
