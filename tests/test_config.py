"""``IMSMConfig`` and ``AnchorConfig`` refuse bad values when they are built, with the value and the fix: the wrapped
adapter config, the task type, the gate's rank, mode and dropout, the anchor numbers (finite, not booleans) and
``start_tokens`` (and, once the model is known, start tokens outside its vocabulary)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import VOCAB, adapter_config, tiny_model
from peft import LoraConfig, PromptTuningConfig, get_peft_model

from peft_imsm import AnchorConfig, IMSMConfig, prepare_anchors


def lora():
    return LoraConfig(r=4, target_modules="all-linear")


# ---------------------------------------------------------------------------------------------------------------
# IMSMConfig
# ---------------------------------------------------------------------------------------------------------------
def test_prompt_learning_adapter_is_refused():
    with pytest.raises(ValueError, match="prompt-learning.*LoraConfig"):
        IMSMConfig(adapter_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))


def test_missing_or_unknown_adapter_config():
    with pytest.raises(ValueError, match="adapter_config=LoraConfig"):
        IMSMConfig()
    with pytest.raises(TypeError, match="peft config such as LoraConfig"):
        IMSMConfig(adapter_config="lora")
    with pytest.raises(ValueError, match="unknown peft_type"):
        IMSMConfig(adapter_config={"peft_type": "NOPE"})
    with pytest.raises(ValueError, match="cannot wrap the peft method IMSM"):
        IMSMConfig(adapter_config=IMSMConfig(adapter_config=lora()))


def test_non_causal_lm_task_type():
    with pytest.raises(ValueError, match="causal language models only.*CAUSAL_LM"):
        IMSMConfig(adapter_config=lora(), task_type="SEQ_CLS")


@pytest.mark.parametrize("rank", [0, -1, 2.5, True])
def test_bad_gate_rank(rank):
    with pytest.raises(ValueError, match="gate_rank must be an integer >= 1"):
        IMSMConfig(adapter_config=lora(), gate_rank=rank)


def test_bad_gate_mode():
    with pytest.raises(ValueError, match="Unknown gate_mode 'avg'.*query, token, fixed"):
        IMSMConfig(adapter_config=lora(), gate_mode="avg")


@pytest.mark.parametrize("dropout", [float("nan"), float("inf"), -0.1, 1.0, 1.5, True, False, "0.1", None])
def test_gate_dropout_must_be_a_number_in_0_1(dropout):
    with pytest.raises(ValueError, match=r"gate_dropout must be a number in \[0, 1\)"):
        IMSMConfig(adapter_config=adapter_config("lora"), gate_dropout=dropout)


# ---------------------------------------------------------------------------------------------------------------
# AnchorConfig
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


def test_good_numbers_still_pass():
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
