"""Shared test helpers: tiny causal LMs built from configs (no downloads), adapter configs for the test matrices,
random batches. Imported by the tests as ``from helpers import ...`` (``conftest.py`` only sets up the session)."""

from __future__ import annotations

import torch
import transformers

import peft_imsm  # noqa: F401  (registers IMSM with peft)

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _llama_like(cls_name: str, **extra):
    cfg = getattr(transformers, cls_name)(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **COMMON,
        **extra,
    )
    return cfg


def tiny_config(arch: str) -> transformers.PretrainedConfig:
    if arch == "llama":
        return _llama_like("LlamaConfig")
    if arch == "qwen3":
        return _llama_like("Qwen3Config", head_dim=8)
    if arch == "qwen2":
        return _llama_like("Qwen2Config")
    if arch == "mistral":
        return _llama_like("MistralConfig", sliding_window=8)
    if arch == "gemma2":
        return _llama_like(
            "Gemma2Config", head_dim=8, final_logit_softcapping=2.0, attn_logit_softcapping=50.0, sliding_window=8
        )
    if arch == "cohere":
        return _llama_like("CohereConfig", logit_scale=0.5)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **COMMON)
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, **COMMON,
        )  # fmt: skip
    if arch == "opt":
        return transformers.OPTConfig(
            hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
            word_embed_proj_dim=32, **COMMON,
        )  # fmt: skip
    raise ValueError(arch)


ARCHS = ["llama", "qwen3", "mistral", "gemma2", "cohere", "gpt2", "gpt_neox", "opt"]
GENERATION_ARCHS = ["llama", "qwen3", "gemma2", "gpt2", "opt"]


def tiny_model(arch: str, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch))
    model.eval()
    return model


def adapter_config(kind: str, identity: bool = True):
    """A peft config of the given kind on all linear layers; identity-initialised when ``identity``."""
    from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoraConfig

    if kind == "lora":
        return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=identity)
    if kind == "dora":
        return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, init_lora_weights=identity)
    if kind == "ia3":
        return IA3Config(target_modules="all-linear", feedforward_modules=[], init_ia3_weights=identity)
    if kind == "adalora":
        return AdaLoraConfig(
            init_r=4, target_r=2, total_step=20, tinit=2, tfinal=4, deltaT=2, target_modules="all-linear",
            init_lora_weights=identity,
        )  # fmt: skip
    if kind == "loha":
        return LoHaConfig(r=4, alpha=8, target_modules="all-linear", init_weights=identity)
    raise ValueError(kind)


ADAPTERS = ["lora", "dora", "ia3", "adalora"]


def perturb_adapter(model, scale: float = 0.3, seed: int = 1) -> None:
    """Give every wrapped-adapter parameter a random value, so the adapted view differs from the frozen one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "imsm_gate" not in name:
                param.add_(torch.randn(param.shape, generator=gen) * scale)


def batch(seed: int = 0, batch_size: int = 3, seq_len: int = 12, left_pad: bool = True):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    if left_pad:
        for row in range(1, batch_size):
            attention_mask[row, : 2 * row] = 0
            input_ids[row, : 2 * row] = 0
    return input_ids, attention_mask


def quantizable_config(arch: str = "llama", **overrides) -> transformers.PretrainedConfig:
    """A tiny config whose linear layers bitsandbytes can quantize (hidden size 64)."""
    if arch == "llama":
        kwargs = dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, **COMMON,
        )  # fmt: skip
        return transformers.LlamaConfig(**{**kwargs, **overrides})
    if arch == "gpt2":
        return transformers.GPT2Config(
            **{**dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, **COMMON), **overrides}
        )
    raise ValueError(arch)


def char_llama_config(tokenizer, hidden_size: int = 48) -> transformers.LlamaConfig:
    """A tiny Llama over the benchmark's character tokenizer (``imsm_bench.skills.build_tokenizer()``)."""
    return transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip


def plain_adapted_reference(arch: str, kind: str, imsm_model):
    """The plain peft model (no IMSM) with the same wrapped-adapter weights as ``imsm_model``."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    ref = get_peft_model(tiny_model(arch), adapter_config(kind, identity=False))
    state = {k: v for k, v in get_peft_model_state_dict(imsm_model).items() if "imsm_gate" not in k}
    result = set_peft_model_state_dict(ref, state)
    assert not result.unexpected_keys
    ref.eval()
    return ref


def logits_of_hidden(base, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """``[batch, seq, vocab]`` logits of the plain ``base`` model with its decoder's final hidden states replaced by
    ``hidden`` (``[batch, seq, d]``): the model's own head applied to a mix computed by hand."""

    def replace(module, args, kwargs, output):
        output.last_hidden_state = hidden
        return output

    handle = base.get_decoder().register_forward_hook(replace, with_kwargs=True)
    try:
        return base(input_ids=input_ids, attention_mask=attention_mask).logits
    finally:
        handle.remove()


def train_steps(model, steps: int, lr: float, **batch_kwargs) -> None:
    """``steps`` AdamW steps at ``lr`` on the trainable parameters of ``model``, on one batch (``model(**batch_kwargs)``
    must return a loss)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(**batch_kwargs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def cached_step_logits(model, prompt: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """``[batch, len(response), vocab]``: the logits after ``prompt`` and then after each token of ``response`` but the
    last, one cached step at a time (what decoding computes; compare with one pass over ``prompt + response``)."""
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        step_logits = [out.logits[:, -1]]
        cache = out.past_key_values if "past_key_values" in out else out.cache
        for t in range(response.shape[1] - 1):
            out = model(input_ids=response[:, t : t + 1], cache=cache, use_cache=True)
            step_logits.append(out.logits[:, -1])
    return torch.stack(step_logits, 1)
