"""The output head stays the base model's: IMSM mixes the two views' final hidden states before the one head, so an
adapter that would train the head (LoRA on it, ``modules_to_save``, trainable tokens of tied embeddings, embeddings
re-tied to a trained copy) is refused before training, and embedding adapters that leave the head alone keep the
frozen view exact."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import batch, perturb_adapter, tiny_config
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper

from peft_imsm import IMSMConfig

pytestmark = pytest.mark.filterwarnings(
    "ignore:Model has `tie_word_embeddings=True`",
    "ignore:You have requested `ensure_weight_tying`",
    "ignore:ensure_weight_tying=True but the model does not have tied weights",
)


def base_with_tying(arch: str, tied: bool) -> transformers.PreTrainedModel:
    config = tiny_config(arch)
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def peft_layers(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]


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
    ids, mask = batch(seq_len=9)
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
    ids, mask = batch(seq_len=9)
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
