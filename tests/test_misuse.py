"""Misuse that used to give silently wrong results or errors pointing the wrong way: each is now exact or refused
with the cause and the fix.

* ``get_peft_model`` run twice on one base model (a notebook cell run again), or on an IMSM model.
* A trained output head (IMSM mixes the views' hidden states before the single head).
* Non-finite or boolean numbers in the configs; bad ``AnchorConfig.start_tokens``.
* An ``attention_mask`` that does not fit the inputs.
* ``disable_adapter()`` beside concurrent calls (model-wide, as in peft).
"""

from __future__ import annotations

import copy
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import transformers
from helpers import VOCAB, adapter_config, perturb_adapter, tiny_config, tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper

from peft_imsm import AnchorConfig, IMSMConfig, prepare_anchors

pytestmark = pytest.mark.filterwarnings(
    "ignore:You are trying to modify a model with PEFT for a second time",
    "ignore:Model has `tie_word_embeddings=True`",
    "ignore:You have requested `ensure_weight_tying`",
    "ignore:ensure_weight_tying=True but the model does not have tied weights",
)


def randomize_gate(model, seed: int = 3) -> None:
    with torch.no_grad():
        for param in model.base_model.gate.parameters():
            param.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))


def left_padded(batch_size: int = 3, seq_len: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=gen)
    mask = torch.ones_like(ids)
    for row in range(1, batch_size):
        mask[row, :row] = 0
        ids[row, :row] = 0
    return ids, mask


def greedy(model, ids: torch.Tensor, mask: torch.Tensor, n: int = 4) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )


def peft_layers(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]


# ---------------------------------------------------------------------------------------------------------------
# 1. get_peft_model twice on one base model; on an IMSM model
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "dora", "ia3", "adalora"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_second_get_peft_model_on_one_base_model_is_exactly_a_fresh_one(arch, kind):
    """The earlier IMSM model's hooks and adapter layers leave the base model: the second model gives what the same
    weights give on a fresh copy of the base model, in forward and generate()."""
    base = tiny_model(arch)
    fresh = copy.deepcopy(base)

    def config():
        return IMSMConfig(adapter_config=adapter_config(kind, identity=False), gate_dropout=0.0)

    first = get_peft_model(base, config())
    second = get_peft_model(base, config())
    perturb_adapter(second, scale=0.5)
    randomize_gate(second)
    second.eval()
    reference = get_peft_model(fresh, config())
    reference.load_state_dict(second.state_dict())  # (strict: the same weights, no leftover layers)
    reference.eval()
    ids, mask = left_padded()
    with torch.no_grad():
        got = second(input_ids=ids, attention_mask=mask).logits
        expected = reference(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    with torch.no_grad():
        adapted_only = reference.get_base_model()(input_ids=ids, attention_mask=mask).logits
    assert (got - adapted_only).abs().max() > 1e-3  # the gate mixes in the frozen view: IMSM, not the adapter alone
    assert torch.equal(greedy(second, ids, mask), greedy(reference, ids, mask))
    with pytest.raises(RuntimeError, match="superseded"):
        first(input_ids=ids, attention_mask=mask)


def test_second_model_with_other_targets_keeps_none_of_the_first_models_layers():
    """A second call with another adapter and other targets (a changed notebook cell): none of the first model's
    layers stay active."""
    base = tiny_model("llama")
    fresh = copy.deepcopy(base)
    get_peft_model(base, IMSMConfig(adapter_config=adapter_config("ia3", identity=False)))

    def config():
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        return IMSMConfig(adapter_config=lora, gate_dropout=0.0)

    second = get_peft_model(base, config()).eval()
    reference = get_peft_model(fresh, config()).eval()
    reference.load_state_dict(second.state_dict())
    assert sorted(peft_layers(second)) == sorted(peft_layers(reference))
    ids, mask = left_padded()
    with torch.no_grad():
        torch.testing.assert_close(
            second(input_ids=ids, attention_mask=mask).logits,
            reference(input_ids=ids, attention_mask=mask).logits,
            atol=1e-6,
            rtol=0,
        )


def test_loading_an_adapter_twice_onto_one_base_model_is_exact(tmp_path):
    trained = get_peft_model(tiny_model("llama"), IMSMConfig(adapter_config=adapter_config("lora", identity=False)))
    perturb_adapter(trained, scale=0.5)
    randomize_gate(trained)
    trained.save_pretrained(tmp_path)
    base = tiny_model("llama")
    PeftModel.from_pretrained(base, tmp_path)
    again = PeftModel.from_pretrained(base, tmp_path).eval()
    reference = PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    ids, mask = left_padded()
    with torch.no_grad():
        torch.testing.assert_close(
            again(input_ids=ids, attention_mask=mask).logits,
            reference(input_ids=ids, attention_mask=mask).logits,
            atol=1e-6,
            rtol=0,
        )
    assert torch.equal(greedy(again, ids, mask), greedy(reference, ids, mask))


def test_superseded_model_refuses_to_run_and_leaves_the_new_one_alone(tmp_path):
    base = tiny_model("llama")
    first = get_peft_model(base, IMSMConfig(adapter_config=adapter_config("lora", identity=False)))
    second = get_peft_model(base, IMSMConfig(adapter_config=adapter_config("lora", identity=False))).eval()
    ids, mask = left_padded()
    with torch.no_grad():
        before = second(input_ids=ids, attention_mask=mask).logits
    message = r"superseded: get_peft_model .* was called again on its base model .* Use the newest model, or reload"
    with pytest.raises(RuntimeError, match=message):
        first(input_ids=ids, attention_mask=mask)
    with pytest.raises(RuntimeError, match=message):
        first.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)
    with pytest.raises(RuntimeError, match=message):
        first.unload()  # (would unload the second model's layers)
    with pytest.raises(RuntimeError, match=message):
        with first.disable_adapter():  # (would switch off the second model's layers)
            pass
    with pytest.raises(RuntimeError, match=message):
        first.save_pretrained(tmp_path / "first")  # (would save the second model's weights under the first's config)
    assert not os.path.exists(tmp_path / "first" / "adapter_model.safetensors")
    with torch.no_grad():
        assert torch.equal(second(input_ids=ids, attention_mask=mask).logits, before)


def test_get_peft_model_on_an_imsm_model_is_refused_at_construction():
    model = get_peft_model(tiny_model("llama"), IMSMConfig(adapter_config=adapter_config("lora", identity=False)))
    model.eval()
    ids, mask = left_padded()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    message = r"already holds an IMSM model .*Pass the base transformers model .*or keep using the existing PeftModel"
    for wrapped in (model, model.base_model):  # the PeftModel, and its IMSMModel
        with pytest.raises(ValueError, match=message):
            get_peft_model(wrapped, IMSMConfig(adapter_config=adapter_config("lora")))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)  # left as it was


# ---------------------------------------------------------------------------------------------------------------
# 2. A trained output head
# ---------------------------------------------------------------------------------------------------------------
def base_with_tying(arch: str, tied: bool) -> transformers.PreTrainedModel:
    config = tiny_config(arch)
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


REFUSED_HEADS = {
    "lora_on_lm_head": ("llama", False, dict(target_modules=["q_proj", "lm_head"]), "peft.tuners.lora.layer.Linear"),
    "modules_to_save_lm_head": ("llama", False, dict(modules_to_save=["lm_head"]), "modules_to_save trains a copy"),
    "gpt2_modules_to_save_lm_head": ("gpt2", True, dict(modules_to_save=["lm_head"]), "modules_to_save trains a copy"),
    # tied embeddings: peft wraps lm_head itself
    "tied_trainable_tokens": ("llama", True, dict(trainable_token_indices=[5, 6]), "trainable_token_indices trains"),
    "gpt2_trainable_tokens": ("gpt2", True, dict(trainable_token_indices={"wte": [5, 6]}), "trainable_token_indices"),
    "tied_embedding_lora_ensure_tying": (
        "llama", True, dict(target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True), "lora.layer.Linear",
    ),
    "tied_modules_to_save_ensure_tying": (
        "llama", True, dict(modules_to_save=["embed_tokens"], ensure_weight_tying=True), "modules_to_save trains",
    ),
    # tied embeddings, the head left alone by peft but re-tied to the trained copy by tie_weights()
    "tied_modules_to_save_embeddings": ("llama", True, dict(modules_to_save=["embed_tokens"]), "shares its weight"),
    "gpt2_modules_to_save_wte": ("gpt2", True, dict(modules_to_save=["wte"]), "shares its weight"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED_HEADS))
def test_a_trained_output_head_is_refused_before_training(case):
    arch, tied, extra, reason = REFUSED_HEADS[case]
    base = base_with_tying(arch, tied)
    ids, mask = left_padded()
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask).logits
    lora = LoraConfig(**{"r": 4, "target_modules": ["c_attn" if arch == "gpt2" else "q_proj"], **extra})
    with pytest.raises(ValueError, match=f"IMSM cannot train the output head: .*{reason}.*Leave the output head out"):
        get_peft_model(base, IMSMConfig(adapter_config=lora))
    assert peft_layers(base) == [] and not hasattr(base, "peft_config")  # the base model is given back untouched
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids, attention_mask=mask).logits, expected)


ALLOWED_EMBEDDINGS = {
    "embedding_lora": ("llama", False, dict(target_modules=["q_proj", "embed_tokens"])),
    "tied_embedding_lora": ("llama", True, dict(target_modules=["q_proj", "embed_tokens"])),
    "gpt2_embedding_lora": ("gpt2", True, dict(target_modules=["c_attn", "wte"])),
    "modules_to_save_embeddings": ("llama", False, dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"])),
    "trainable_tokens": ("llama", False, dict(target_modules=["q_proj"], trainable_token_indices=[5, 6, 7])),
}


@pytest.mark.parametrize("case", list(ALLOWED_EMBEDDINGS))
def test_embedding_adapters_that_leave_the_head_alone_keep_the_frozen_view_exact(case):
    """The frozen view switches these off, and the head is the base model's: gate 1 gives the base model's logits."""
    arch, tied, extra = ALLOWED_EMBEDDINGS[case]
    ids, mask = left_padded()
    ids[:, -3:] = torch.tensor([5, 6, 7])  # (tokens whose embedding rows the adapter trains)
    with torch.no_grad():
        expected = base_with_tying(arch, tied)(input_ids=ids, attention_mask=mask).logits
    lora = LoraConfig(r=4, init_lora_weights=False, **extra)
    model = get_peft_model(base_with_tying(arch, tied), IMSMConfig(adapter_config=lora, gate_dropout=0.0))
    perturb_adapter(model, scale=0.5)
    model.eval()
    gate = model.base_model.gate
    with torch.no_grad():
        gate.forced_value = 1.0
        frozen = model(input_ids=ids, attention_mask=mask).logits
        gate.forced_value = 0.0
        adapted = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(frozen, expected, atol=1e-6, rtol=0)
    assert (adapted - expected).abs().max() > 1e-3  # the embedding adapter does change the adapted view


# ---------------------------------------------------------------------------------------------------------------
# 3. and 4. Config numbers and start_tokens
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(weight=float("nan")), "anchor weight must be a number >= 0"),
        (dict(weight=float("inf")), "anchor weight must be a number >= 0"),
        (dict(weight=True), "anchor weight must be a number >= 0"),
        (dict(weight="1.0"), "anchor weight must be a number >= 0"),
        (dict(temperature=float("nan")), "anchor temperature must be > 0 and finite"),
        (dict(temperature=float("inf")), "anchor temperature must be > 0 and finite"),
        (dict(temperature=True), "anchor temperature must be > 0 and finite"),
        (dict(temperature=0.0), "anchor temperature must be > 0 and finite"),
        (dict(batch_size=True), "anchor batch_size must be an integer >= 1"),
        (dict(every=True), "anchor every must be an integer >= 1"),
        (dict(num_samples=2.0), "anchor num_samples must be an integer >= 1"),
        (dict(seed=False), "anchor seed must be an integer"),
        (dict(train_adapter="no"), "anchor train_adapter must be True or False"),
    ],
)
def test_anchor_config_refuses_non_finite_and_boolean_numbers(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AnchorConfig(**kwargs)


@pytest.mark.parametrize("dropout", [float("nan"), float("inf"), -0.1, 1.0, True, False, "0.1", None])
def test_gate_dropout_must_be_a_number_in_0_1(dropout):
    with pytest.raises(ValueError, match=r"gate_dropout must be a number in \[0, 1\)"):
        IMSMConfig(adapter_config=adapter_config("lora"), gate_dropout=dropout)


def test_good_numbers_still_pass():
    import numpy as np

    AnchorConfig(weight=0, temperature=2, seed=-1)
    AnchorConfig(weight=np.float64(0.5), temperature=np.float32(0.7))
    IMSMConfig(adapter_config=adapter_config("lora"), gate_dropout=0)
    assert AnchorConfig(start_tokens=(1, 5)).start_tokens == [1, 5]


@pytest.mark.parametrize("tokens", [[], ["a"], [1, -1], [1.0], [True], "1 2", 3])
def test_bad_start_tokens_are_refused_by_the_config(tokens):
    message = r"start_tokens must be None .*non-empty list of token ids.*chat_start_tokens"
    with pytest.raises(ValueError, match=message):
        AnchorConfig(start_tokens=tokens)


def test_start_tokens_outside_the_vocabulary_are_refused_at_sampling():
    anchor = AnchorConfig(start_tokens=[5, VOCAB + 3, 999], num_samples=2, sample_length=2)
    model = get_peft_model(tiny_model("llama"), IMSMConfig(adapter_config=adapter_config("lora"), anchor=anchor))
    with pytest.raises(ValueError, match=rf"token id\(s\) \[{VOCAB + 3}, 999\] .*vocabulary of {VOCAB} tokens"):
        prepare_anchors(model)


# ---------------------------------------------------------------------------------------------------------------
# 5. attention_mask of the wrong shape
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_shape", [(2, 5), (2, 12), (3, 8), (1, 8)])
def test_attention_mask_that_does_not_fit_the_inputs_names_the_fix(mask_shape):
    model = get_peft_model(tiny_model("llama"), IMSMConfig(adapter_config=adapter_config("lora", identity=False)))
    ids = torch.randint(3, VOCAB, (2, 8))
    mask = torch.ones(mask_shape, dtype=torch.long)
    message = (
        rf"attention_mask has shape \[{mask_shape[0]}, {mask_shape[1]}\] but input_ids has shape \[2, 8\]: the mask "
        r"must be \[2, 8\] .*Pass the attention_mask the tokenizer returned"
    )
    model.eval()
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        model(input_ids=ids, attention_mask=mask)
    model.train()
    with pytest.raises(ValueError, match=message):
        model(input_ids=ids, attention_mask=mask, labels=ids)
    model.eval()
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)


def test_attention_mask_over_cached_and_new_tokens_is_fine():
    """With a KV cache the mask covers the cached tokens too (a user-given cache, generate()'s decoding)."""
    model = get_peft_model(tiny_model("llama"), IMSMConfig(adapter_config=adapter_config("lora", identity=False)))
    perturb_adapter(model, scale=0.5)
    model.eval()
    ids, mask = left_padded(seq_len=8)
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask).logits
        start = model(input_ids=ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        with pytest.raises(ValueError, match=r"after 5 cached tokens: the mask must be \[3, 5 \+ 3\]"):
            model(input_ids=ids[:, 5:], attention_mask=mask[:, :2], past_key_values=start.past_key_values)
        rest = model(input_ids=ids[:, 5:], attention_mask=mask, past_key_values=start.past_key_values).logits
    assert rest.shape == whole[:, 5:].shape and torch.isfinite(rest).all()  # (query: the 5 cached tokens)
    assert greedy(model, ids, mask).shape == (3, 12)


# ---------------------------------------------------------------------------------------------------------------
# 6. disable_adapter() beside concurrent calls
# ---------------------------------------------------------------------------------------------------------------
def test_disable_adapter_is_model_wide_and_concurrent_imsm_calls_stay_exact():
    """Documented behaviour (as in peft): while one thread is inside ``with model.disable_adapter():``, every thread
    gets the base model; outside such a block, concurrent IMSM calls each give what they give alone."""
    base = tiny_model("llama")
    plain = copy.deepcopy(base)
    model = get_peft_model(base, IMSMConfig(adapter_config=adapter_config("lora", identity=False), gate_dropout=0.0))
    perturb_adapter(model, scale=0.5)
    randomize_gate(model)
    model.eval()
    ids, mask = left_padded()
    imsm_tokens = greedy(model, ids, mask, n=6)
    base_tokens = greedy(plain, ids, mask, n=6)
    assert not torch.equal(imsm_tokens, base_tokens)

    inside, release = threading.Event(), threading.Event()

    def hold_disabled() -> None:
        with model.disable_adapter():
            inside.set()
            release.wait(timeout=60)

    holder = threading.Thread(target=hold_disabled)
    holder.start()
    try:
        assert inside.wait(timeout=60)
        assert torch.equal(greedy(model, ids, mask, n=6), base_tokens)  # another thread: the base model too
    finally:
        release.set()
        holder.join()
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: greedy(model, ids, mask, n=6), range(6)))
    assert all(torch.equal(tokens, imsm_tokens) for tokens in results)
