"""Reduced precision: QLoRA (bitsandbytes 4-bit NF4 / FP4 and 8-bit, on the CPU), bf16 / fp16 weights, autocast.

What these tests pin down:

* IMSM on a bitsandbytes model adds no second copy of the base weights: the frozen view runs through the very same
  ``Linear4bit`` / ``Linear8bitLt`` modules as the adapted view (each is called twice per training forward), and the
  model's parameter bytes grow by exactly the adapter + gate.
* The gate stays float32 (its own weights, its computation) whatever the dtype of the base model.
* ``prepare_model_for_kbit_training`` is not required: without it training works too (bitsandbytes layers are frozen
  by peft anyway; LoRA adapters on a bf16 base are autocast to float32 by peft).
* TRL's ``SFTTrainer`` casts every trainable parameter of a quantized model to bf16, the IMSM gate included; the
  gate is put back in float32 at the first training forward (see ``test_trl_qlora_gate_dtype``).

bitsandbytes on the CPU: its 4-bit inference path (eval mode, no grad) repacks the weights for the CPU kernel and
needs ``in_features`` to be a multiple of the quantization block size (64), hence ``hidden_size=64`` here (with 32,
plain bitsandbytes inference fails, IMSM or not). That repacking rewrites the weight storage in place, so the
"quantized weights unchanged" check runs before any eval-mode forward.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import transformers
from datasets import Dataset
from helpers import batch, char_llama_config, perturb_adapter, quantizable_config, tiny_model
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

from peft_imsm import IMSMConfig

bnb = pytest.importorskip("bitsandbytes")

QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}
QUANT_ARCHS = ["llama", "gpt2"]  # GPT-2's Conv1D layers are quantized to Linear4bit / Linear8bitLt too
VOCAB = 96


def bnb_config(arch: str) -> transformers.PretrainedConfig:
    return quantizable_config(arch)


@pytest.fixture(scope="module")
def saved_fp32(tmp_path_factory) -> dict[str, str]:
    """Tiny float32 models saved to disk once per module, to be loaded quantized with ``from_pretrained``."""
    paths = {}
    for arch in QUANT_ARCHS:
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(f"fp32-{arch}")
        AutoModelForCausalLM.from_config(bnb_config(arch)).save_pretrained(path)
        paths[arch] = str(path)
    return paths


def load_quantized(path: str, quant: str, dtype: torch.dtype = torch.float32):
    extra = {} if quant == "int8" else {"bnb_4bit_compute_dtype": dtype}
    config = BitsAndBytesConfig(**QUANT[quant], **extra)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu", dtype=dtype)


def quantized_modules(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def param_bytes(model, trainable_only: bool = False) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad or not trainable_only)


def gate_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "imsm_gate" in n}


def no_dropout(model) -> None:
    """Dropout off in train mode (GPT-2's attention / residual dropout, the gate's dropout), for exact comparisons."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def labelled(ids: torch.Tensor, mask: torch.Tensor, prompt: int = 6) -> torch.Tensor:
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return labels


def train_steps(model, steps: int = 3, lr: float = 1e-2) -> list[float]:
    """A few AdamW steps on one fixed batch; returns the losses."""
    model.train()
    ids, mask = batch(batch_size=3, seq_len=12)
    labels = labelled(ids, mask)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# --------------------------------------------------------------------------------------------------------- QLoRA
@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("arch", QUANT_ARCHS)
def test_qlora_shares_quantized_weights_and_trains_adapter_and_gate(saved_fp32, arch, quant):
    """prepare_model_for_kbit_training + IMSM LoRA: no second copy of the base, frozen base, fp32 gate, generate()."""
    base = prepare_model_for_kbit_training(  # also turns on (reentrant) gradient checkpointing, as users get it
        load_quantized(saved_fp32[arch], quant), gradient_checkpointing_kwargs={"use_reentrant": True}
    )
    quantized = quantized_modules(base)
    assert len(quantized) == {"llama": 14, "gpt2": 8}[arch]  # per block: Llama 7 linears, GPT-2 4 Conv1D; no lm_head
    bytes_before = param_bytes(base)

    model = get_peft_model(base, IMSMConfig(adapter_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")))

    # The same quantized modules, no full-precision copy: parameters grow by exactly the adapter + the gate.
    assert [id(m) for m in quantized_modules(model)] == [id(m) for m in quantized]
    assert param_bytes(model) == bytes_before + param_bytes(model, trainable_only=True)
    assert all(not p.requires_grad for m in quantized for p in m.parameters())
    gates = gate_params(model)
    assert gates and all(p.dtype == torch.float32 and p.requires_grad for p in gates.values())

    # Both views run through the same quantized modules: each is called twice per training forward.
    calls = {id(m): 0 for m in quantized}
    hooks = [
        m.register_forward_hook(lambda mod, a, o: calls.__setitem__(id(mod), calls[id(mod)] + 1)) for m in quantized
    ]
    model.train()
    ids, mask = batch(batch_size=3, seq_len=12)
    model(input_ids=ids, attention_mask=mask, labels=labelled(ids, mask))
    for hook in hooks:
        hook.remove()
    assert set(calls.values()) == {2}

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train_steps(model)
    assert all(math.isfinite(x) for x in losses), losses
    for name, param in model.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        assert changed == param.requires_grad, f"{name}: changed={changed}, trainable={param.requires_grad}"
    assert all(p.dtype == torch.float32 for p in gate_params(model).values())

    model.eval()
    prompt_ids, prompt_mask = batch(batch_size=2, seq_len=6)
    out = model.generate(
        input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
        eos_token_id=None, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    assert out.sequences.shape == (2, 10)
    positions = (prompt_mask.cumsum(-1) - 1).masked_fill(prompt_mask == 0, 1)  # as generate() derives them (GPT-2)
    with torch.no_grad():
        first = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=False).logits
    first = first[:, -1]
    assert torch.isfinite(out.logits[0]).all()
    torch.testing.assert_close(out.logits[0], first, atol=1e-5, rtol=0)
    # Quantized LoRA layers stack both views in one batch too: same as two separate passes.
    assert model.base_model.supports_stacked_views
    model.base_model.stacked_views = False
    two_pass = model.generate(
        input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
        eos_token_id=None, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    assert torch.equal(two_pass.sequences, out.sequences)
    torch.testing.assert_close(torch.stack(two_pass.logits), torch.stack(out.logits), atol=1e-4, rtol=0)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_kbit_without_prepare_model_for_kbit_training_trains(saved_fp32, quant):
    """IMSM on a bf16 quantized model WITHOUT prepare_model_for_kbit_training: it trains (no error is needed).

    peft freezes the base (bitsandbytes weights included) and autocasts the LoRA weights to float32; the gate is
    float32 by construction; the loss is computed by the model in float32.
    """
    base = load_quantized(saved_fp32["llama"], quant, dtype=torch.bfloat16)
    model = get_peft_model(base, IMSMConfig(adapter_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")))
    assert {p.dtype for n, p in model.named_parameters() if p.requires_grad} == {torch.float32}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = train_steps(model, steps=3)
    assert all(math.isfinite(x) for x in losses), losses
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert not torch.equal(param.detach(), before[name]), name
            assert param.dtype == torch.float32, name
    model.eval()
    ids, mask = batch(batch_size=2, seq_len=6)
    assert model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False).shape == (2, 9)


def caps_dataset(n: int = 32) -> Dataset:
    """Prompt ``<word> in caps:`` -> completion ``WORD`` (for the char-level tokenizer)."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7))) for _ in range(n)]
    return Dataset.from_list([{"prompt": f"<{w}> in caps:", "completion": w.upper()} for w in words])


def test_trl_qlora_gate_dtype(tmp_path):
    """TRL's SFTTrainer casts all trainable parameters of a quantized model to bf16 (the QLoRA paper's recipe), and
    this catches the IMSM gate too. IMSM puts the gate's weights back in float32 at the first training forward,
    before the optimizer holds any state for them, so the gate trains in float32.
    """
    from trl import SFTConfig, SFTTrainer

    from imsm_bench.skills import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    config = char_llama_config(tok, hidden_size=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    base = load_quantized(str(tmp_path / "base"), "nf4", dtype=torch.bfloat16)
    args = SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, max_length=64, bf16=True,
        disable_tqdm=True,
    )  # fmt: skip
    peft_config = IMSMConfig(adapter_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    trainer = SFTTrainer(
        model=base, args=args, train_dataset=caps_dataset(), processing_class=tok, peft_config=peft_config
    )
    gates = gate_params(trainer.model)
    assert {p.dtype for p in gates.values()} == {torch.bfloat16}  # TRL's cast (sft_trainer.py, "QLoRA" comment)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses), losses
    assert {p.dtype for p in gate_params(trainer.model).values()} == {torch.float32}
    state = trainer.optimizer.state
    assert all(state[p]["exp_avg"].dtype == torch.float32 for p in gate_params(trainer.model).values())


# ------------------------------------------------------------------------------------------ bf16 / fp16 / autocast
HALF_ARCHS = ["llama", "gpt2", "gemma2"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", HALF_ARCHS)
def test_half_precision_base_with_float32_gate(arch, dtype):
    """bf16 / fp16 base weights: forward, backward and generate() run, no NaNs, the gate stays float32; with the gate
    forced to 1 the output is exactly the half-precision base model's."""
    model = get_peft_model(
        tiny_model(arch).to(dtype),
        IMSMConfig(adapter_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")),
    )
    perturb_adapter(model)
    no_dropout(model)
    assert all(p.dtype == torch.float32 for p in gate_params(model).values())
    model.train()
    ids, mask = batch()
    labels = labelled(ids, mask)
    with model.base_model.record_gate() as gate_log:
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert out.logits.dtype == dtype and torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    assert gate_log[0].dtype == torch.float32
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
            assert param.grad.abs().sum() > 0, name
    assert all(p.dtype == torch.float32 for p in gate_params(model).values())

    # Same weights in float32: the half-precision IMSM model is a rounding of it.
    reference = get_peft_model(
        tiny_model(arch), IMSMConfig(adapter_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    )
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    no_dropout(reference)
    reference.train()
    ref_logits = reference(input_ids=ids, attention_mask=mask).logits
    got = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert (got.float() - ref_logits)[valid].abs().max() < (0.1 if dtype == torch.bfloat16 else 0.02)

    model.base_model.gate.forced_value = 1.0
    plain = tiny_model(arch).to(dtype)
    no_dropout(plain)
    plain.train()
    frozen = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(frozen, plain(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)
    model.base_model.gate.forced_value = None

    model.eval()
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (ids.shape[0], ids.shape[1] + 4)


@pytest.mark.parametrize("arch", HALF_ARCHS)
def test_bf16_autocast_like_the_trainer(arch):
    """float32 weights under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (what ``Trainer(bf16=True)`` does): no
    dtype errors, the gate computes in float32, gradients are finite and close to the float32 ones."""
    model = get_peft_model(
        tiny_model(arch), IMSMConfig(adapter_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    )
    perturb_adapter(model)
    no_dropout(model)
    model.train()
    ids, mask = batch()
    labels = labelled(ids, mask)

    def grads(autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], list]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), model.base_model.record_gate() as log:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, log

    loss32, grads32, _ = grads(False)
    loss16, grads16, log = grads(True)
    assert torch.isfinite(loss16) and abs(loss16.item() - loss32.item()) < 0.01
    assert log[0].dtype == torch.float32
    assert all(torch.isfinite(g).all() for g in grads16.values())

    def cosine(names: list[str]) -> float:
        flat = [torch.cat([g[n].flatten() for n in names]) for g in (grads16, grads32)]
        return torch.nn.functional.cosine_similarity(*flat, dim=0).item()

    gate_names = [n for n in grads16 if "imsm_gate" in n]
    assert cosine(gate_names) > 0.95  # measured >= 0.98 (bf16 rounding of a random tiny model)
    assert cosine(list(grads16)) > 0.9  # measured >= 0.93
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert generated.shape == (ids.shape[0], ids.shape[1] + 3)


def test_trainer_bf16_on_cpu(tmp_path):
    """``Trainer(bf16=True, use_cpu=True)``: the forward runs under bf16 autocast, the loss stays finite and only the
    adapter + gate (float32) change."""
    model = get_peft_model(
        tiny_model("llama"), IMSMConfig(adapter_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    )
    ids, mask = batch(batch_size=8, seq_len=12, left_pad=False)
    rows = [{"input_ids": i, "attention_mask": m, "labels": labelled(i[None], m[None])[0]} for i, m in zip(ids, mask)]
    autocast_seen = []
    hook = model.base_model.model.get_decoder().register_forward_pre_hook(
        lambda m, a: autocast_seen.append(torch.is_autocast_enabled("cpu"))
    )
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
        report_to=[], save_strategy="no", remove_unused_columns=False, use_cpu=True, bf16=True, disable_tqdm=True,
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows))
    trainer.train()
    hook.remove()
    assert trainer.accelerator.mixed_precision == "bf16"
    assert autocast_seen and all(autocast_seen)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    for name, param in model.named_parameters():
        assert (not torch.equal(param.detach(), before[name])) == param.requires_grad, name
    assert all(p.dtype == torch.float32 for p in gate_params(model).values())
