"""Bad input gets a clear error that names the fix."""

from __future__ import annotations

import pytest
import torch
from helpers import adapter_config, tiny_model
from peft import LoraConfig, PromptTuningConfig, get_peft_model

from peft_imsm import IMSMConfig


def lora():
    return LoraConfig(r=4, target_modules="all-linear")


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


@pytest.mark.parametrize("rank", [0, -1, 2.5, True])
def test_bad_gate_rank(rank):
    with pytest.raises(ValueError, match="gate_rank must be an integer >= 1"):
        IMSMConfig(adapter_config=lora(), gate_rank=rank)


def test_bad_gate_mode_and_dropout():
    with pytest.raises(ValueError, match="Unknown gate_mode 'avg'.*query, token, fixed"):
        IMSMConfig(adapter_config=lora(), gate_mode="avg")
    with pytest.raises(ValueError, match="gate_dropout"):
        IMSMConfig(adapter_config=lora(), gate_dropout=1.5)


def test_non_causal_lm_task_type():
    with pytest.raises(ValueError, match="causal language models only.*CAUSAL_LM"):
        IMSMConfig(adapter_config=lora(), task_type="SEQ_CLS")


def test_model_without_output_embeddings():
    from helpers import tiny_config
    from transformers import AutoModel

    with pytest.raises(ValueError, match="no output embeddings.*AutoModelForCausalLM"):
        get_peft_model(AutoModel.from_config(tiny_config("llama")), IMSMConfig(adapter_config=lora()))


def test_merging_is_refused_with_the_reason():
    model = get_peft_model(tiny_model("llama"), IMSMConfig(adapter_config=adapter_config("lora")))
    with pytest.raises(ValueError, match="cannot be merged.*both the frozen view"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()


def test_unload_gives_back_the_base_model():
    base = tiny_model("llama")
    ids = torch.randint(3, 96, (2, 8))
    expected = base(input_ids=ids).logits
    model = get_peft_model(base, IMSMConfig(adapter_config=adapter_config("lora", identity=False)))
    plain = model.unload()
    assert type(plain).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(plain(input_ids=ids).logits, expected)


def test_second_adapter_is_refused():
    model = get_peft_model(tiny_model("llama"), IMSMConfig(adapter_config=adapter_config("lora")))
    with pytest.raises(ValueError, match="exactly one IMSM adapter"):
        model.add_adapter("other", IMSMConfig(adapter_config=adapter_config("lora")))


def test_forward_and_generate_refuse_to_skip_the_gate():
    """If the output head were not fed by the hooked backbone, the gate would be skipped: both entry points refuse."""
    model = get_peft_model(tiny_model("llama"), IMSMConfig(adapter_config=adapter_config("lora")))
    model.eval()
    ids = torch.randint(3, 90, (1, 5))
    for hook in model.base_model.dual_pass._hooks[
        :2
    ]:  # the backbone's pre- and post-hook: as if the head read another module
        hook.remove()
    with pytest.raises(RuntimeError, match="did not run during forward"):
        model(input_ids=ids)
    with pytest.raises(RuntimeError, match="did not run during generate"):
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    with model.disable_adapter():  # the plain base model needs no hooks
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_methods_of_the_wrapped_tuner_are_supported_or_refused_never_silently_applied():
    """Every public method of the wrapped tuner that ``BaseTuner`` lacks: defined by IMSM, or a clear error."""
    from peft.tuners.lora import LoraModel
    from peft.tuners.tuners_utils import BaseTuner

    model = get_peft_model(tiny_model("llama"), IMSMConfig(adapter_config=adapter_config("lora")))
    tuner = model.base_model
    before = {n for n, _ in model.named_modules()}
    with pytest.raises(ValueError, match="add_weighted_adapter is not supported on an IMSM model"):
        model.add_weighted_adapter(["default"], [1.0], "combined")
    assert {n for n, _ in model.named_modules()} == before  # no hidden adapter was added
    public = [n for n in dir(LoraModel) if not n.startswith("_") and not hasattr(BaseTuner, n)]
    assert public  # (add_weighted_adapter, subtract_mutated_init, ...)
    imsm_classes = type(tuner).__mro__[: type(tuner).__mro__.index(BaseTuner)]  # (IMSMModel and its IMSM bases)
    for name in public:
        if any(name in vars(cls) for cls in imsm_classes):
            continue  # IMSM's own definition
        with pytest.raises(AttributeError, match="not supported on an IMSM model"):
            getattr(tuner, name)
    assert model.config is tuner.model.config  # the transformers model's attributes are still reachable


def test_calling_the_model_after_unload_says_that_imsm_was_unloaded():
    model = get_peft_model(tiny_model("llama"), IMSMConfig(adapter_config=adapter_config("lora")))
    ids = torch.randint(3, 90, (1, 5))
    base = model.base_model.unload()
    assert not any("lora" in n or "imsm" in n for n, _ in base.named_parameters())
    with pytest.raises(RuntimeError, match="IMSM was unloaded"):
        model(input_ids=ids)
    with pytest.raises(RuntimeError, match="IMSM was unloaded"):
        model.generate(input_ids=ids, max_new_tokens=2, pad_token_id=0)
    base(input_ids=ids)  # the returned model works
