"""generate(): two KV caches, exact against a no-cache reference loop, every decoding mode."""

from __future__ import annotations

import pytest
import torch
from helpers import GENERATION_ARCHS, adapter_config, perturb_adapter, tiny_model
from peft import get_peft_model
from transformers import DynamicCache, GenerationConfig

from peft_imsm import IMSMConfig

PROMPT_LENGTHS = [9, 4, 6]


# (wrapped adapter, run both views as one doubled batch?) — LoRA stacks by default; IA3 always runs two passes.
VIEWS = [("lora", True), ("lora", False), ("ia3", False)]


def imsm(arch: str, kind: str = "lora", stacked: bool = True):
    model = get_peft_model(tiny_model(arch), IMSMConfig(adapter_config=adapter_config(kind, identity=False)))
    model.base_model.stacked_views = stacked
    perturb_adapter(model, scale=0.5)
    with torch.no_grad():
        for p in model.base_model.imsm_gate.parameters():
            p.normal_(0, 0.3)
    model.eval()
    return model


def left_padded(lengths=PROMPT_LENGTHS, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, 96, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask


def greedy(model, ids, mask, n=8, **kwargs):
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        **kwargs,
    )


def positions(mask):
    """Position ids as generate() derives them from a left-padded mask (matters for absolute positions, e.g. GPT-2)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def reference_greedy(model, ids, mask, n=8):
    """The paper's way: the whole sequence through the plain forward at every step, prompt masked as -100."""
    seq, att = ids.clone(), mask.clone()
    prompt_len = ids.shape[1]
    with torch.no_grad():
        for _ in range(n):
            labels = seq.clone()
            labels[:, :prompt_len] = -100
            if seq.shape[1] == prompt_len:
                labels = None  # nothing generated yet: no labels, the query is the whole prompt
            logits = model(
                input_ids=seq, attention_mask=att, position_ids=positions(att), labels=labels, use_cache=False
            ).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            att = torch.cat([att, torch.ones_like(nxt)], 1)
    return seq


@pytest.mark.parametrize("kind,stacked", VIEWS)
@pytest.mark.parametrize("arch", GENERATION_ARCHS)
def test_greedy_equals_no_cache_reference_loop(arch, kind, stacked):
    model = imsm(arch, kind, stacked)
    ids, mask = left_padded()
    out = greedy(model, ids, mask)
    assert torch.equal(out, reference_greedy(model, ids, mask))
    assert torch.equal(out, greedy(model, ids, mask, use_cache=False))
    base_out = greedy(tiny_model(arch), ids, mask)
    assert not torch.equal(out, base_out), "IMSM must change the generation for this test to mean anything"


@pytest.mark.parametrize("kind,stacked", VIEWS)
@pytest.mark.parametrize("arch", GENERATION_ARCHS)
def test_step_logits_equal_teacher_forced_forward(arch, kind, stacked):
    model = imsm(arch, kind, stacked)
    ids, mask = left_padded()
    out = greedy(model, ids, mask, n=6, return_dict_in_generate=True, output_logits=True, output_scores=True)
    step_logits = torch.stack(out.logits, dim=1)
    full = out.sequences
    labels = full.clone()
    labels[:, : ids.shape[1]] = -100
    att = torch.cat([mask, torch.ones(full.shape[0], full.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
    with torch.no_grad():
        forced = model(
            input_ids=full, attention_mask=att, position_ids=positions(att), labels=labels, use_cache=False
        ).logits
    torch.testing.assert_close(step_logits, forced[:, ids.shape[1] - 1 : -1], atol=1e-4, rtol=1e-4)
    assert len(out.scores) == 6


@pytest.mark.parametrize("stacked", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rows_do_not_leak_in_a_padded_batch(arch, stacked):
    model = imsm(arch, stacked=stacked)
    ids, mask = left_padded()
    together = greedy(model, ids, mask)
    width = ids.shape[1]
    for row, n in enumerate(PROMPT_LENGTHS):
        alone = greedy(model, ids[row : row + 1, width - n :], mask[row : row + 1, width - n :])
        assert torch.equal(alone[0, n:], together[row, width:]), row


@pytest.mark.parametrize("stacked", [True, False])
def test_sampling_is_seeded_and_cache_independent(stacked):
    model = imsm("llama", stacked=stacked)
    ids, mask = left_padded()
    kwargs = dict(do_sample=True, temperature=0.8, top_p=0.9, top_k=20, max_new_tokens=8, pad_token_id=0)
    torch.manual_seed(7)
    a = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    torch.manual_seed(7)
    b = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
    torch.manual_seed(7)
    c = model.generate(input_ids=ids, attention_mask=mask, num_return_sequences=3, **kwargs)
    torch.manual_seed(7)
    d = model.generate(input_ids=ids, attention_mask=mask, num_return_sequences=3, use_cache=False, **kwargs)
    assert torch.equal(a, b) and torch.equal(c, d) and c.shape[0] == 9


@pytest.mark.parametrize("stacked", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_beam_search_cache_equals_no_cache(arch, stacked):
    model = imsm(arch, stacked=stacked)
    ids, mask = left_padded()
    kwargs = dict(num_beams=3, num_return_sequences=2, max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
    assert cached.shape[0] == 6 and torch.equal(cached, uncached)


@pytest.mark.parametrize("stacked", [True, False])
def test_assisted_decoding_crops_both_caches(stacked):
    model = imsm("llama", stacked=stacked)
    ids, mask = left_padded([7])
    plain = greedy(model, ids, mask, n=10)
    assisted = greedy(model, ids, mask, n=10, assistant_model=tiny_model("llama", seed=5))
    assert torch.equal(plain, assisted)


def test_eos_stop_strings_and_streamer():
    from transformers import TextStreamer

    from imsm_bench.skills import build_tokenizer

    tok = build_tokenizer()
    model = imsm("llama")
    ids, mask = left_padded()
    first = greedy(model, ids, mask, n=8)
    eos = int(first[0, ids.shape[1] + 2])  # make the 3rd generated token of row 0 the eos
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0
    )
    assert out[0, ids.shape[1] + 2] == eos and (out[0, ids.shape[1] + 3 :] == 0).all()
    one = ids[:1, -PROMPT_LENGTHS[0] :]
    text = tok.decode(greedy(model, one, torch.ones_like(one), n=8)[0, one.shape[1] :])
    stop = text[2:4]
    if stop and stop.strip():
        stopped = model.generate(
            input_ids=one, max_new_tokens=8, do_sample=False, stop_strings=[stop], tokenizer=tok, pad_token_id=0
        )
        assert tok.decode(stopped[0, one.shape[1] :]).endswith(stop)
    streamed: list[str] = []

    class Capture(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            streamed.append(text)

    model.generate(
        input_ids=one, max_new_tokens=5, do_sample=False, streamer=Capture(tok, skip_prompt=True), pad_token_id=0
    )
    assert "".join(streamed) == tok.decode(greedy(model, one, torch.ones_like(one), n=5)[0, one.shape[1] :])


def test_disable_adapter_generates_like_the_base_model():
    model = imsm("llama")
    ids, mask = left_padded()
    with model.disable_adapter():
        out = greedy(model, ids, mask)
    assert torch.equal(out, greedy(tiny_model("llama"), ids, mask))


def test_generation_config_object_and_loaded_model(tmp_path):
    from peft import PeftModel

    model = imsm("llama")
    ids, mask = left_padded()
    expected = greedy(model, ids, mask)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    cfg = GenerationConfig(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(loaded.generate(input_ids=ids, attention_mask=mask, generation_config=cfg), expected)


def test_bad_generation_inputs():
    model = imsm("llama")
    ids, mask = left_padded()
    right = torch.flip(mask, dims=[1])
    with pytest.raises(ValueError, match="right-padded.*padding_side = 'left'"):
        greedy(model, ids, right)
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match="empty prompt"):
        greedy(model, ids, empty)
    foreign = DynamicCache()
    tiny_model("llama")(input_ids=ids[:, :4], cache=foreign, use_cache=True)
    with pytest.raises(ValueError, match="computed without IMSM's frozen view"):
        model(input_ids=ids[:, 4:], cache=foreign, use_cache=True)
    with pytest.raises(TypeError, match="transformers `Cache`"):
        model(input_ids=ids, cache=((torch.zeros(1),),), use_cache=True)


def test_stacked_and_two_pass_views_agree():
    model = imsm("llama")
    ids, mask = left_padded()
    with torch.no_grad():
        stacked = model(input_ids=ids, attention_mask=mask).logits
        model.base_model.stacked_views = False
        two_pass = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(stacked, two_pass, atol=1e-5, rtol=1e-5)


def count_backbone_passes(model) -> list[int]:
    calls = [0]
    model.base_model.dual_pass.backbone.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unpadded_prompts_run_one_doubled_batch(arch, with_mask):
    """Without padding, generate() may drop the all-ones mask; both views must still share one pass per step."""
    model = imsm(arch)
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(3))
    kwargs = {"attention_mask": torch.ones_like(ids)} if with_mask else {}
    calls = count_backbone_passes(model)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0,
            return_dict_in_generate=True, **kwargs,
        )  # fmt: skip
    assert out.past_key_values.imsm_stacked
    assert calls[0] == 5  # one backbone pass per new token (prefill + 4 cached steps), not two
    model.base_model.stacked_views = False
    with torch.no_grad():
        two_pass = model.generate(
            input_ids=ids, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0, **kwargs
        )
    assert torch.equal(out.sequences, two_pass)
    assert torch.equal(out.sequences, reference_greedy(model, ids, torch.ones_like(ids), n=5))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_stacked_frozen_rows_get_the_base_model_exactly(arch):
    """In the doubled batch the LoRA update is zeroed on the frozen rows: gate = 1 gives the base model's logits."""
    model = imsm(arch)
    model.base_model.gate.forced_value = 1.0
    ids, mask = left_padded()
    with torch.no_grad():
        imsm_logits = model(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            base = model(input_ids=torch.cat([ids, ids]), attention_mask=torch.cat([mask, mask])).logits[: len(ids)]
    torch.testing.assert_close(imsm_logits, base, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "extra",
    [
        {"lora_bias": True},
        {"target_modules": ["q_proj", "v_proj", "embed_tokens"]},
        {"modules_to_save": ["embed_tokens"]},
    ],
    ids=["lora_bias", "embedding_lora", "modules_to_save"],
)
def test_lora_that_cannot_stack_falls_back_to_two_passes(extra):
    from peft import LoraConfig

    config = LoraConfig(
        **{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False, **extra}
    )
    model = get_peft_model(tiny_model("llama"), IMSMConfig(adapter_config=config))
    perturb_adapter(model, scale=0.5)
    model.eval()
    assert not model.base_model.supports_stacked_views
    ids, mask = left_padded()
    calls = count_backbone_passes(model)
    with torch.no_grad():
        out = greedy(model, ids, mask, n=4)
    assert calls[0] == 2 * 4  # frozen view + adapted view at every step
    assert torch.equal(out, reference_greedy(model, ids, mask, n=4))


@pytest.mark.parametrize(
    "targets,stacks", [("all-linear", False), (["q_proj", "v_proj"], True)], ids=["experts", "attention"]
)
def test_mixture_of_experts_generation(targets, stacks):
    """Mixtral: LoRA on the experts (peft wraps their fused parameters) runs two passes; on attention only it stacks.

    Both give the no-cache reference loop's tokens.
    """
    from peft import LoraConfig
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    base = MixtralForCausalLM(
        MixtralConfig(
            vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0,
        )
    )  # fmt: skip
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(base, IMSMConfig(adapter_config=config))
    perturb_adapter(model, scale=0.5)
    model.eval()
    assert model.base_model.supports_stacked_views == stacks
    ids, mask = left_padded()
    calls = count_backbone_passes(model)
    out = greedy(model, ids, mask, n=5)
    assert calls[0] == (5 if stacks else 10)  # one pass per token, or frozen + adapted
    assert torch.equal(out, reference_greedy(model, ids, mask, n=5))


def test_stacked_views_refuse_rows_they_cannot_attribute():
    """A LoRA layer seeing neither the doubled batch's rows nor its tokens (e.g. routed experts) raises clearly."""
    from peft_imsm.dual_pass import BackbonePass

    model = imsm("llama")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with model.base_model.dual_pass.call() as call:
        call.passes.append(BackbonePass(stacked_rows=2, stacked_tokens=10))
        with torch.no_grad(), pytest.raises(RuntimeError, match="stacked_views = False"):
            layer(torch.randn(3, layer.in_features))
        with torch.no_grad():
            out = layer(torch.randn(4, 1, layer.in_features))  # 2 frozen rows + 2 adapted rows: fine
        assert out.shape[0] == 4


@pytest.mark.parametrize("stacked", [True, False])
def test_inputs_embeds_generate_and_forward_like_input_ids(stacked):
    model = imsm("llama", stacked=stacked)
    ids, mask = left_padded()
    embeds = model.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        from_embeds = model.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5, do_sample=False, eos_token_id=None,
            pad_token_id=0,
        )  # fmt: skip
        assert torch.equal(from_embeds, greedy(model, ids, mask, n=5)[:, ids.shape[1] :])
    labels = ids.masked_fill(mask == 0, -100)
    loss_ids = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss_embeds = model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss_embeds, loss_ids, atol=1e-6, rtol=0)


def test_inputs_that_are_not_batch_first_are_not_stacked():
    """Multimodal rotary position ids ([3, batch, seq]) or 4D masks cannot be doubled along the batch: two passes."""
    model = imsm("llama")
    tuner = model.base_model.dual_pass
    ids = torch.ones(3, 4, dtype=torch.long)
    with torch.no_grad():
        assert tuner.can_stack({"input_ids": ids, "position_ids": torch.zeros(3, 4, dtype=torch.long)}, None, None)
        assert not tuner.can_stack(
            {"input_ids": ids, "position_ids": torch.zeros(3, 3, 4, dtype=torch.long)}, None, None
        )
        assert not tuner.can_stack({"input_ids": ids, "attention_mask": torch.ones(3, 1, 4, 4)}, None, None)
    assert not tuner.can_stack({"input_ids": ids}, None, None)  # autograd on: never stacked
