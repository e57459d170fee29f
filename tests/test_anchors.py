"""The self-anchored gate: anchor sampling, the KL term, what it trains, save/load, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import adapter_config, batch, perturb_adapter, quantizable_config, tiny_model, train_steps
from peft import PeftModel, get_peft_model

import peft_imsm
from peft_imsm import AnchorConfig, IMSMConfig, IMSMLogCallback, prepare_anchors, set_anchor_data
from peft_imsm.dual_pass import soft_gate


def anchored(seed: int = 0, arch: str = "llama", gate_mode: str = "query", **anchor_kwargs):
    anchor = AnchorConfig(
        **{"num_samples": 8, "sample_length": 6, "batch_size": 4, "every": 1, "seed": seed, **anchor_kwargs}
    )
    config = IMSMConfig(
        adapter_config=adapter_config("lora", identity=False), anchor=anchor, gate_dropout=0.0, gate_mode=gate_mode
    )
    model = get_peft_model(tiny_model(arch), config)
    perturb_adapter(model)
    model.train()
    return model


def labelled_batch():
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :6] = -100
    return ids, mask, labels


def plain_anchor_term(model, rows: list[int], weight: float) -> torch.Tensor:
    """``weight * KL(p_frozen || p_imsm)`` on anchor rows ``rows``, by plain calls of the model (the definition)."""
    from peft_imsm.losses import anchor_kl

    anchors = model.base_model.anchor_set()
    ids, mask = anchors.input_ids[rows], anchors.attention_mask[rows]
    with torch.no_grad(), model.disable_adapter():
        frozen = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return weight * anchor_kl(frozen, logits, mask)


def assert_same_term_and_gradients(model, got: torch.Tensor, expected: torch.Tensor, train_adapter: bool) -> None:
    """Equal values and gradients; in gate-only mode the adapter gets nothing from the anchor term."""
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    got_grads = torch.autograd.grad(got, [p for _, p in named], allow_unused=True)
    expected_grads = torch.autograd.grad(expected, [p for _, p in named], allow_unused=True)
    for (name, _), a, b in zip(named, got_grads, expected_grads):
        if "imsm_gate" in name or train_adapter:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=name)
        else:
            assert a is None or not a.any(), name


def test_self_anchor_sampling_is_deterministic_and_leaves_the_global_rng_alone():
    a, b, c = anchored(seed=0), anchored(seed=0), anchored(seed=1)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    for m in (a, b, c):
        prepare_anchors(m)
    assert torch.equal(torch.rand(3), expected_next)
    anchors = [m.base_model.anchor_set().input_ids for m in (a, b, c)]
    assert anchors[0].shape == (8, 7) and (anchors[0][:, 0] == 1).all()  # BOS + 6 sampled tokens
    assert torch.equal(anchors[0], anchors[1]) and not torch.equal(anchors[0], anchors[2])


def test_anchor_term_is_added_and_vanishes_when_the_gate_is_one():
    model = anchored()
    ids, mask, labels = labelled_batch()
    task_only = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    stats = model.base_model.pop_training_stats()
    assert stats["anchor_kl"] > 0
    anchor, model.peft_config["default"].anchor = model.peft_config["default"].anchor, None
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
    model.peft_config["default"].anchor = anchor
    torch.testing.assert_close(task_only.loss.detach(), reference + stats["anchor_kl"], rtol=1e-5, atol=1e-6)
    model.base_model.gate.forced_value = 1.0
    term = model.base_model.anchor_term.term(labels, None, task_only.loss)
    assert float(term) == 0.0


@pytest.mark.parametrize("train_adapter", [False, True])
def test_anchor_gradients_reach_the_adapter_only_with_train_adapter(train_adapter):
    assert AnchorConfig().train_adapter is True  # the default: gate+adapter
    model = anchored(train_adapter=train_adapter)
    ids, mask, labels = labelled_batch()
    term = model.base_model.anchor_term.term(labels, None, torch.tensor(0.0))
    term.backward()
    for name, param in model.named_parameters():
        if "imsm_gate" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        elif param.requires_grad:
            reached = param.grad is not None and param.grad.abs().sum() > 0
            assert reached == train_adapter, name


def test_every_k_runs_the_anchor_term_on_every_kth_forward_weighted_k_times():
    """AnchorConfig.every=3, weight 1: forwards 0 and 3 carry 3 x KL (== every=1 at weight 3 on the same anchor
    batch), forwards 1, 2 and 4 carry the task loss alone and draw no anchor batch."""
    every3, weight3 = anchored(every=3), anchored(weight=3.0)
    plain = anchored()
    plain.peft_config["default"].anchor = None
    ids, mask, labels = labelled_batch()
    losses, draws = [], []
    for _ in range(5):
        losses.append(every3(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.detach())
        draws.append(every3.base_model.anchor_term.draws)
    assert draws == [1, 1, 1, 2, 2] and every3.base_model.anchor_term.forwards == 5
    task = plain(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.detach()
    for i in (1, 2, 4):
        torch.testing.assert_close(losses[i], task, rtol=1e-6, atol=1e-7)
    for i in (0, 3):
        expected = weight3(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.detach()
        torch.testing.assert_close(losses[i], expected, rtol=1e-5, atol=1e-6)
        assert losses[i] > task + 1e-4
    assert weight3.base_model.anchor_term.draws == 2
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        AnchorConfig(every=0)


def test_gradient_accumulation_weights_the_term_by_token_share():
    model = anchored()
    ids, mask, labels = labelled_batch()
    n = int((labels[:, 1:] != -100).sum())
    torch.manual_seed(0)
    full = model.base_model.anchor_term.term(labels, None, torch.tensor(0.0))
    model.base_model.anchor_term.draws -= 1  # replay the same anchor batch
    half = model.base_model.anchor_term.term(labels, torch.tensor(2 * n), torch.tensor(0.0))
    torch.testing.assert_close(half, full / 2, rtol=1e-4, atol=1e-7)


def test_data_anchors_and_trainer_logging(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from imsm_bench.skills import build_tokenizer

    tok = build_tokenizer()
    model = anchored(source="data")
    ids, mask, labels = labelled_batch()
    with pytest.raises(ValueError, match="set_anchor_data"):
        model(input_ids=ids, attention_mask=mask, labels=labels)
    with pytest.raises(ValueError, match="tokenizer"):
        set_anchor_data(model, ["abc"], None)
    with pytest.raises(ValueError, match="empty"):
        set_anchor_data(model, [], tok)
    assert set_anchor_data(model, Dataset.from_dict({"text": ["capital of X?", "add 1+2=", "is 3>4?"]}), tok) == 3
    rows = [{"input_ids": r, "labels": r} for r in torch.randint(3, 96, (16, 10)).tolist()]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, logging_steps=2, report_to=[],
        save_strategy="no", use_cpu=True, remove_unused_columns=False,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), callbacks=[IMSMLogCallback()])
    trainer.train()
    logged = [h for h in trainer.state.log_history if "anchor_kl" in h]
    assert logged and all(h["anchor_kl"] >= 0 and "task_loss" in h for h in logged)


def test_saved_anchored_adapter_loads_and_generates(tmp_path):
    model = anchored(weight=0.5)
    ids, mask, labels = labelled_batch()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    model.eval()
    with torch.no_grad():
        expected = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0
        )
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert loaded.peft_config["default"].anchor == model.peft_config["default"].anchor
    got = loaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)


def test_bad_anchor_config():
    with pytest.raises(ValueError, match="anchor weight must be a number >= 0"):
        AnchorConfig(every=1, weight=-1.0)
    with pytest.raises(ValueError, match="anchor source"):
        AnchorConfig(every=1, source="web")
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        AnchorConfig(every=1, num_samples=0)
    model = anchored()
    model.base_model.model.config.bos_token_id = None
    model.base_model.model.generation_config.bos_token_id = None
    with pytest.raises(ValueError, match="no bos_token_id.*start_tokens"):
        prepare_anchors(model)


def test_each_process_rank_samples_its_own_anchors(monkeypatch):
    import peft_imsm.anchors as anchors

    rank0, rank1 = anchored(seed=0), anchored(seed=0)
    prepare_anchors(rank0)
    monkeypatch.setattr(anchors, "process_rank", lambda: 1)
    prepare_anchors(rank1)
    assert not torch.equal(rank0.base_model.anchor_set().input_ids, rank1.base_model.anchor_set().input_ids)


@pytest.mark.parametrize("reentrant", [False, True])
def test_anchors_with_gradient_checkpointing(reentrant):
    base = tiny_model("llama")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    anchor = AnchorConfig(every=1, num_samples=8, sample_length=6, batch_size=4)
    model = get_peft_model(base, IMSMConfig(adapter_config=adapter_config("lora"), anchor=anchor, gate_dropout=0.0))
    model.enable_input_require_grads()
    model.train()
    ids, mask, labels = labelled_batch()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "imsm_gate" in n)
    assert model.base_model.pop_training_stats()["anchor_kl"] >= 0


def test_anchors_on_a_4bit_quantized_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(quantizable_config("llama", num_key_value_heads=4)).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = prepare_model_for_kbit_training(
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    )
    anchor = AnchorConfig(every=1, num_samples=4, sample_length=4, batch_size=2)
    model = get_peft_model(base, IMSMConfig(adapter_config=adapter_config("lora"), anchor=anchor))
    model.train()
    ids, mask, labels = labelled_batch()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and model.base_model.pop_training_stats()["anchor_kl"] >= 0


def _trainer(model, out_dir, steps: int, save_steps: int | None = None):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    rows = [{"input_ids": r, "labels": r} for r in torch.randint(3, 96, (24, 10), generator=_gen(7)).tolist()]
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, use_cpu=True, seed=0,
        remove_unused_columns=False, logging_steps=1, gradient_accumulation_steps=2,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), callbacks=[IMSMLogCallback()])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("every", [1, 4])
def test_resuming_an_anchored_trainer_run_from_a_checkpoint_is_exact(tmp_path, every):
    """The anchor batches follow a draw count saved with each checkpoint: the resumed run draws exactly the anchor
    batches the uninterrupted run drew (it used to restart their order and replay the first steps' batches). With
    every=4 the checkpoint (6 forwards in, 2 draws: forwards 0 and 4) also saves the forward count: counted from the
    draws alone (2 x 4 = 8) the resumed run would anchor forwards 6 and 10 instead of 8 (4 draws instead of 3)."""
    whole = anchored(num_samples=6, batch_size=4, every=every)
    _trainer(whole, tmp_path / "whole", steps=6, save_steps=3).train()
    draws = 12 // every  # 6 steps x 2 accumulated micro-batches, anchored on every `every`-th
    assert whole.base_model.anchor_term.draws == draws and whole.base_model.anchor_term.forwards == 12
    resumed = anchored(num_samples=6, batch_size=4, every=every)
    _trainer(resumed, tmp_path / "whole", steps=6, save_steps=3).train(
        resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3")
    )
    assert resumed.base_model.anchor_term.draws == draws and resumed.base_model.anchor_term.forwards == 12
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), name


def test_trainer_logs_the_mean_gate_on_supervised_tokens_and_on_anchors(tmp_path):
    model = anchored()
    trainer = _trainer(model, tmp_path, steps=2)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "gate_mean" in h]
    assert len(logged) == 2
    for h in logged:
        assert 0.0 < h["gate_mean"] < 1.0 and 0.0 < h["anchor_gate_mean"] < 1.0 and h["anchor_kl"] >= 0
    # the figure is the mean over supervised positions: check it against record_gate on the same batch
    ids, mask, labels = labelled_batch()
    model.base_model.pop_training_stats()
    with model.base_model.record_gate(per_token=True) as log:
        model(input_ids=ids, attention_mask=mask, labels=labels)
    stats = model.base_model.pop_training_stats()
    supervised = torch.zeros_like(log[0])
    supervised[:, :-1] = (labels[:, 1:] != -100).float()
    expected = float((log[0] * supervised).sum() / supervised.sum())
    assert abs(stats["gate_mean"] - expected) < 1e-5


def test_a_bare_string_is_not_anchor_data():
    from imsm_bench.skills import build_tokenizer

    model = anchored(source="data")
    with pytest.raises(TypeError, match="single string.*one anchor per character"):
        set_anchor_data(model, "some text", build_tokenizer())


def test_anchors_longer_than_a_learned_position_limit_are_refused_naming_the_setting():
    from imsm_bench.skills import build_tokenizer

    model = anchored(arch="gpt2", sample_length=200)  # tiny GPT-2: 128 positions
    with pytest.raises(ValueError, match=r"at most 128 positions.*sample_length \(now 200\)"):
        prepare_anchors(model)
    model = anchored(arch="gpt2", source="data", max_length=400)
    tok = build_tokenizer()
    with pytest.raises(ValueError, match=r"at most 128 positions.*max_length \(now 400\)"):
        set_anchor_data(model, ["a b c d e f g h " * 40], tok)


@pytest.mark.parametrize("train_adapter", [False, True], ids=["gate", "gate+adapter"])
@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_anchor_term_equals_its_definition(arch, train_adapter):
    """The anchor term (frozen hidden states cached once, frozen and IMSM logits from one pass through the model's
    own head) equals ``weight * KL(p_frozen || p_imsm)`` computed by plain calls, in value and in its gradients.
    (In eval mode: GPT-2's dropout would make every plain call a different draw.)"""
    model = anchored(arch=arch, train_adapter=train_adapter, weight=0.7)
    model.eval()
    prepare_anchors(model)
    expected = plain_anchor_term(model, model.base_model.anchor_set().rows(0, 4), 0.7)
    got = model.base_model.anchor_term.term(None, None, torch.tensor(0.0))
    assert_same_term_and_gradients(model, got, expected, train_adapter)


def test_chat_start_tokens_needs_a_chat_template():
    from imsm_bench.skills import build_tokenizer
    from peft_imsm.anchors import chat_start_tokens

    tokenizer = build_tokenizer()
    with pytest.raises(ValueError, match="no chat template.*start_tokens unset"):
        chat_start_tokens(tokenizer)
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    prefix = chat_start_tokens(tokenizer)
    assert tokenizer.decode(prefix) == tokenizer.decode(tokenizer("<user>", add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize(
    "gate_mode, train_adapter",
    [("query", False), ("query", True), ("token", True), ("fixed", True)],
    ids=["gate", "gate+adapter", "token gate+adapter", "fixed+adapter"],
)
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "cohere", "gpt2", "gpt_neox", "opt"])
def test_a_shared_anchor_prefix_runs_once_and_changes_nothing(arch, gate_mode, train_adapter):
    """Self anchors from ``start_tokens`` (a chat template's user turn) share their first tokens: the adapted view runs
    them once per anchor batch and the other rows continue from its KV cache, and the head runs on the prefix once
    (all of it with the fixed gate and a token gate without dropout; the frozen half with the query gate). The anchor
    term is still ``weight * KL(p_frozen || p_imsm)`` by plain calls, in value and gradients, and the backbone saw
    fewer tokens."""
    start = [5, 9, 13, 2, 7, 11, 3, 8]
    model = anchored(
        arch=arch, gate_mode=gate_mode, train_adapter=train_adapter, weight=0.7, start_tokens=start, sample_length=4
    )
    model.eval()
    tuner = model.base_model
    prepare_anchors(model)
    anchors = tuner.anchor_set()
    assert anchors.shared_prefix == len(start) and anchors.prefix_worth_sharing(4) == len(start)
    expected = plain_anchor_term(model, anchors.rows(0, 4), 0.7)
    tuner.anchor_term.frozen_states()
    seen, seen_head = [], []
    hooks = [
        tuner.dual_pass.backbone.register_forward_pre_hook(
            lambda m, a, k: seen.append(k["input_ids"].shape), with_kwargs=True
        ),
        model.get_output_embeddings().register_forward_pre_hook(lambda m, a: seen_head.append(a[0].shape[:-1])),
    ]
    try:
        got = tuner.anchor_term.term(None, None, torch.tensor(0.0))
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == [(1, 8), (4, 4)]  # (after IMSM's pre-hook) the prefix once, then the rest of every row
    frozen_tokens = 8 + 4 * 4  # the prefix once, then the rest of every row
    imsm_tokens = frozen_tokens if gate_mode != "query" else 4 * 12  # the query gate mixes each row's prefix apart
    assert seen_head == [(1, frozen_tokens + imsm_tokens)]  # one packed row through the head
    assert_same_term_and_gradients(model, got, expected, train_adapter)


def test_no_prefix_sharing_for_bos_anchors_padded_data_anchors_or_gradient_checkpointing():
    from peft_imsm.anchors import AnchorSet

    ids = torch.tensor([[1, 4, 5, 6], [1, 4, 7, 8], [1, 4, 5, 9]])
    assert AnchorSet(ids, torch.ones_like(ids), 0).shared_prefix == 2
    assert AnchorSet(ids[:, :1].repeat(1, 4), torch.ones_like(ids), 0).shared_prefix == 3  # never the whole row
    mask = torch.ones_like(ids)
    mask[0, 0] = 0  # left padding: row 0's first token is padding
    assert AnchorSet(ids, mask, 0).shared_prefix == 0
    bos = anchored()  # BOS + 6 sampled tokens: a 1-token prefix is not worth a second backbone call
    prepare_anchors(bos)
    assert bos.base_model.anchor_set().shared_prefix == 1 and bos.base_model.anchor_set().prefix_worth_sharing(4) == 0
    model = anchored(start_tokens=[5, 9, 13, 2, 7, 11, 3, 8], sample_length=4)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    seen = []
    hook = model.base_model.dual_pass.backbone.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["input_ids"].shape), with_kwargs=True
    )
    try:
        model.base_model.anchor_term.term(None, None, torch.tensor(0.0)).backward()
    finally:
        hook.remove()
    assert seen[-1] == (4, 12)  # one pass over the whole rows: a cache cannot be refilled by checkpointing


def test_from_tokenizer_starts_self_anchors_from_the_user_turn_or_bos():
    from imsm_bench.skills import build_tokenizer

    tokenizer = build_tokenizer()
    plain = AnchorConfig.from_tokenizer(tokenizer)
    assert plain.start_tokens is None and plain == AnchorConfig()  # no chat template: BOS starts, all defaults
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}user: {{ m['content'] }}\n{% endfor %}"
    chat = AnchorConfig.from_tokenizer(tokenizer, weight=2.0)
    assert (
        chat.start_tokens
        == peft_imsm.chat_start_tokens(tokenizer)
        == tokenizer("<bos>user: ", add_special_tokens=False)["input_ids"]
    )
    assert chat.weight == 2.0 and chat.every == 4 and chat.train_adapter is True
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # nothing before the message
    assert AnchorConfig.from_tokenizer(tokenizer).start_tokens is None
    assert AnchorConfig.from_tokenizer(tokenizer, source="data").start_tokens is None


# ---------------------------------------------------------------------------------------------------- routing term
@pytest.mark.parametrize("gate_mode", ["query", "token"])
def test_the_routing_term_is_the_gates_log_loss_on_both_sides(gate_mode):
    """``route_weight * mean(-log(1 - g))`` over the positions that predict a supervised token of the training batch,
    and ``every * route_weight * mean(-log g)`` over the anchor tokens (with the anchor KL), from the gate the
    forwards recorded."""
    ids, mask, labels = labelled_batch()
    kwargs = {"gate_mode": gate_mode, "weight": 0.0, "every": 2}
    routed, plain = anchored(route_weight=0.5, **kwargs), anchored(**kwargs)
    plain.load_state_dict(routed.state_dict())
    for model in (routed, plain):  # (training mode; no dropout anywhere: both models make the same gate)
        prepare_anchors(model)
    with routed.base_model.record_gate(per_token=True) as gates:
        loss = routed(input_ids=ids, attention_mask=mask, labels=labels).loss
    task_loss = plain(input_ids=ids, attention_mask=mask, labels=labels).loss
    supervised = torch.zeros_like(labels, dtype=torch.bool)
    supervised[:, :-1] = labels[:, 1:] != -100
    target_gate, anchor_gate = gates[0], gates[1]  # the training batch, then the anchor pass (rows of the anchors)
    anchor_mask = routed.base_model.anchor_set().attention_mask[routed.base_model.anchor_set().rows(0, 4)]
    to_adapted = -(1 - target_gate[supervised]).log().mean()
    to_frozen = -(anchor_gate.log() * anchor_mask).sum() / anchor_mask.sum()
    torch.testing.assert_close(loss, task_loss + 0.5 * to_adapted + 2 * 0.5 * to_frozen, atol=1e-5, rtol=1e-5)
    with routed.base_model.record_gate(per_token=True) as gates:  # the next forward: no anchor term (every 2)
        loss = routed(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert len(gates) == 1
    torch.testing.assert_close(loss, task_loss + 0.5 * to_adapted, atol=1e-5, rtol=1e-5)


def test_the_route_gates_routing_term_covers_every_anchor_on_every_forward():
    """With the route gate the anchor part is ``route_weight * mean(-log g)`` over the tokens of every anchor on every
    training forward (from the frozen view's cached query summaries), due or not; the anchor pass adds only its KL.
    Reference: the router applied by hand to the mean final hidden states of the base model (adapter disabled) over
    each sequence's query tokens, and the anchor term by its definition; values and the router's gradients."""
    ids, mask, labels = labelled_batch()
    model = anchored(gate_mode="route", route_weight=0.5, every=2, weight=1.0)
    prepare_anchors(model)
    tuner = model.base_model
    anchors = tuner.anchor_set()
    router = tuner.gate.W_R

    def route_gate(input_ids, query):  # [batch, seq] query mask -> [batch] gate, with autograd through the router
        with torch.no_grad(), model.disable_adapter():
            hidden = model(input_ids=input_ids, attention_mask=mask_of[input_ids.shape], output_hidden_states=True)
        q = (hidden.hidden_states[-1] * query[..., None]).sum(1) / query.sum(1, keepdim=True)
        return torch.sigmoid(F.linear(q, router.weight, router.bias) * tuner.gate.lr_scale)[:, 0]

    mask_of = {ids.shape: mask, anchors.input_ids.shape: anchors.attention_mask}
    supervised = torch.zeros_like(labels, dtype=torch.bool)
    supervised[:, :-1] = labels[:, 1:] != -100
    prompt = (mask.bool() & (torch.arange(ids.shape[1]) < 6)).float()  # (labels[:, :6] are -100)

    def reference(kl_rows):
        model.eval()  # (no dropout anywhere; in eval mode the loss is the task loss alone)
        task_loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        model.train()
        g_batch, g_anchors = route_gate(ids, prompt), route_gate(anchors.input_ids, anchors.attention_mask.float())
        to_adapted = -(1 - g_batch[:, None].expand_as(supervised)[supervised]).log().mean()
        weights = anchors.attention_mask.float()
        to_frozen = -(g_anchors.log()[:, None] * weights).sum() / weights.sum()
        kl = 2 * plain_anchor_term(model, kl_rows, 1.0) if kl_rows else 0.0
        return task_loss + 0.5 * (to_adapted + to_frozen) + kl

    for due in (True, False):  # forward 0 has the anchor term (every 2), forward 1 does not
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        got = torch.autograd.grad(loss, [router.weight, router.bias])
        expected = reference(anchors.rows(0, 4) if due else None)
        want = torch.autograd.grad(expected, [router.weight, router.bias])
        torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert tuner.anchor_term.draws == 1


@pytest.mark.parametrize("gate_mode", ["route", "query"])
def test_anchor_weight_0_runs_no_anchor_pass_unless_routing_needs_its_gates(gate_mode):
    """``weight=0``: the KL is off, so a due forward runs no anchor pass, except with a query gate's routing term,
    whose anchor side is the anchor pass's gates. The route gate's routing term still has both sides."""
    ids, mask, labels = labelled_batch()
    model = anchored(gate_mode=gate_mode, route_weight=0.5, weight=0.0, every=1)
    prepare_anchors(model)
    tuner = model.base_model
    term, passes = tuner.anchor_term.term, []
    tuner.anchor_term.term = lambda *args: passes.append(1) or term(*args)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    model.eval()  # (eval mode: the forward alone, no anchor term; the soft gate, as in training)
    with torch.no_grad(), soft_gate():
        task_loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    anchor_passes = 0 if gate_mode == "route" else 1
    assert len(passes) == anchor_passes
    assert tuner.anchor_term.draws == anchor_passes
    # the anchor gate is still logged (from the routing term's cached queries, or the anchor pass): the token mean of
    # the gate of a plain forward of the anchors the term used (all of them, or the anchor pass's batch)
    anchors = tuner.anchor_set()
    rows = list(range(len(anchors))) if gate_mode == "route" else anchors.rows(0, tuner.anchor_term.config.batch_size)
    with torch.no_grad(), soft_gate(), tuner.record_gate() as gates:  # (the soft gate, as in training)
        model(input_ids=anchors.input_ids[rows], attention_mask=anchors.attention_mask[rows])
    tokens = anchors.attention_mask[rows].sum(dim=1).double()
    want = float((gates[0].double() * tokens).sum() / tokens.sum())
    torch.testing.assert_close(tuner.pop_training_stats()["anchor_gate_mean"], want, atol=1e-6, rtol=0)
    # the zero-initialised route gate gives g = 0.5: each side of the routing term is ln 2, weighted 0.5 (the query
    # gate's random projections give g near 0.5, and its two sides, -log(1 - g) and -log g, cancel to first order)
    torch.testing.assert_close(loss, task_loss + math.log(2), atol=1e-6 if gate_mode == "route" else 1e-3, rtol=0)


def test_the_routing_term_teaches_the_gate_to_route():
    """A few steps of the routing term: the gate goes towards the frozen view on the anchors and towards the adapter
    on the training batch (the paper's gate stays near 0.5 in as many steps)."""
    ids, mask, labels = labelled_batch()
    readings = {}
    for route_weight in (0.0, 1.0):
        model = anchored(route_weight=route_weight, every=1, weight=1.0)
        train_steps(model, 30, 1e-2, input_ids=ids, attention_mask=mask, labels=labels)
        model.eval()
        tuner = model.base_model
        anchors = tuner.anchor_set()
        with torch.no_grad(), tuner.record_gate() as on_target:
            model(input_ids=ids, attention_mask=mask)
        with torch.no_grad(), tuner.record_gate() as on_anchors:
            model(input_ids=anchors.input_ids, attention_mask=anchors.attention_mask)
        readings[route_weight] = (on_target[0].mean().item(), on_anchors[0].mean().item())
    assert readings[1.0][0] < 0.3 < 0.8 < readings[1.0][1], readings
    assert abs(readings[0.0][0] - readings[0.0][1]) < abs(readings[1.0][0] - readings[1.0][1]), readings


def test_routing_needs_a_learned_gate():
    from peft import LoraConfig

    with pytest.raises(ValueError, match="gate_mode='fixed' has no gate to train"):
        IMSMConfig(adapter_config=LoraConfig(), gate_mode="fixed", anchor=AnchorConfig(route_weight=1.0))
    with pytest.raises(ValueError, match="route_weight must be None .1 for the route gate, else 0. or a finite"):
        AnchorConfig(route_weight=-1.0)


def test_gate_lr_scale_is_the_same_gate_whose_adam_steps_are_k_times_larger(tmp_path):
    """``gate_lr_scale=k``: the same gate function at initialisation; one AdamW step moves its effective ``W_B`` k
    times as far as the paper's gate (same gradients' signs); saved and reloaded, the same gate again."""
    from peft_imsm.gate import IMSMGate

    gates = {}
    for k in (1.0, 10.0):
        torch.manual_seed(0)
        gates[k] = IMSMGate(16, rank=4, mode="token", dropout=0.0, lr_scale=k)
    h_frozen, h_adapted = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    torch.testing.assert_close(gates[10.0](h_frozen, h_adapted), gates[1.0](h_frozen, h_adapted))
    moved = {}
    for k, gate in gates.items():
        before = gate.projections()[1].clone()
        optimizer = torch.optim.AdamW(gate.parameters(), lr=1e-3, weight_decay=0.0)
        gate(h_frozen, h_adapted).mean().backward()
        optimizer.step()
        moved[k] = gate.projections()[1] - before
    torch.testing.assert_close(moved[10.0], 10 * moved[1.0], atol=1e-6, rtol=1e-3)

    from peft import LoraConfig

    config = IMSMConfig(adapter_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), gate_lr_scale=10.0)
    model = get_peft_model(tiny_model("llama"), config)
    assert model.base_model.gate.lr_scale == 10.0
    ids, mask = batch()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    assert loaded.base_model.gate.lr_scale == 10.0
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected)
    with pytest.raises(ValueError, match="gate_lr_scale must be None or a finite number > 0"):
        IMSMConfig(adapter_config=LoraConfig(), gate_lr_scale=0.0)
