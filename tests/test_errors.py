"""Bad input to an IMSM model gets a clear error that names the fix: a model IMSM cannot wrap, merging, a second
adapter, a forward that would skip the gate, calls after ``unload()``, an ``attention_mask`` that does not fit the
inputs. (Bad config values: test_config.py; a trained output head: test_output_head.py.)"""

from __future__ import annotations

import pytest
import torch
from helpers import VOCAB, adapter_config, batch, perturb_adapter, tiny_config, tiny_model
from peft import LoraConfig, get_peft_model

from peft_imsm import IMSMConfig


def test_model_without_output_embeddings():
    from transformers import AutoModel

    lora = LoraConfig(r=4, target_modules="all-linear")
    with pytest.raises(ValueError, match="no output embeddings.*AutoModelForCausalLM"):
        get_peft_model(AutoModel.from_config(tiny_config("llama")), IMSMConfig(adapter_config=lora))


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


def test_a_second_adapter_of_the_query_gate_is_refused():
    """Several IMSM adapters form a LoRA library of route gates (tests/test_library.py); others are refused."""
    model = get_peft_model(tiny_model("llama"), IMSMConfig(adapter_config=adapter_config("lora")))
    with pytest.raises(ValueError, match="a LoRA library, where each sequence runs the base model or ONE adapter"):
        model.add_adapter("other", IMSMConfig(adapter_config=adapter_config("lora")))
    assert list(model.peft_config) == ["default"]


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
    ids, mask = batch(seq_len=8)
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask).logits
        start = model(input_ids=ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        with pytest.raises(ValueError, match=r"after 5 cached tokens: the mask must be \[3, 5 \+ 3\]"):
            model(input_ids=ids[:, 5:], attention_mask=mask[:, :2], past_key_values=start.past_key_values)
        rest = model(input_ids=ids[:, 5:], attention_mask=mask, past_key_values=start.past_key_values).logits
        generated = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert rest.shape == whole[:, 5:].shape and torch.isfinite(rest).all()  # (query: the 5 cached tokens)
    assert generated.shape == (3, 12)
