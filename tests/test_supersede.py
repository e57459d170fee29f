"""``get_peft_model`` run again (a notebook cell run twice, or changed): on the same base model the new IMSM model
supersedes the earlier one, exactly as if it wrapped a fresh copy of the base model, and the earlier one refuses to
run; on an IMSM model it is refused. (Loading an adapter twice onto one base model: test_save_load.py.)"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from helpers import adapter_config, batch, perturb_adapter, tiny_model
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper

from peft_imsm import IMSMConfig

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to modify a model with PEFT for a second time")


def randomize_gate(model, seed: int = 3) -> None:
    with torch.no_grad():
        for param in model.base_model.gate.parameters():
            param.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))


def greedy(model, ids: torch.Tensor, mask: torch.Tensor, n: int = 4) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )


def peft_layers(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]


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
    ids, mask = batch(seq_len=9)
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
    ids, mask = batch(seq_len=9)
    with torch.no_grad():
        torch.testing.assert_close(
            second(input_ids=ids, attention_mask=mask).logits,
            reference(input_ids=ids, attention_mask=mask).logits,
            atol=1e-6,
            rtol=0,
        )


def test_superseded_model_refuses_to_run_and_leaves_the_new_one_alone(tmp_path):
    base = tiny_model("llama")
    first = get_peft_model(base, IMSMConfig(adapter_config=adapter_config("lora", identity=False)))
    second = get_peft_model(base, IMSMConfig(adapter_config=adapter_config("lora", identity=False))).eval()
    ids, mask = batch(seq_len=9)
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
    ids, mask = batch(seq_len=9)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    message = r"already holds an IMSM model .*Pass the base transformers model .*or keep using the existing PeftModel"
    for wrapped in (model, model.base_model):  # the PeftModel, and its IMSMModel
        with pytest.raises(ValueError, match=message):
            get_peft_model(wrapped, IMSMConfig(adapter_config=adapter_config("lora")))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)  # left as it was
