"""What IMSM reads of a transformers causal LM (a leaf module): the backbone and its arguments, final hidden states,
the output head's device and width, the position limit, and whether the injected adapter allows stacked views.

* :func:`find_backbone`: the module whose output feeds the output head (e.g. ``LlamaModel``), where the dual pass
  puts its hooks; :func:`bound_parameter_names` / :func:`cache_parameter_name`: its positional and KV-cache
  arguments.
* :func:`last_hidden_state` / :func:`replace_last_hidden_state`: the ``[batch, seq, d]`` final hidden states of a
  backbone's output (tuple or ``ModelOutput``).
* :func:`model_device`, :func:`hidden_size`, :func:`position_limit`: where the gate goes, how wide it is, how long
  anchors may be.
* :func:`supports_stacked_views`: whether both views can run as one doubled batch (plain LoRA only).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from peft.tuners.lora import LoraLayer, LoraModel, ParamWrapper
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn


def supports_stacked_views(adapter_tuner: nn.Module, model: nn.Module) -> bool:
    """Whether both views can share one doubled batch (see ``peft_imsm.dual_pass._zero_frozen_rows``).

    Plain LoRA only: every adapter layer a LoRA layer whose update is ``lora_B(lora_A(x)) * scaling`` (no DoRA or
    other variant, no LoRA bias, no embedding or parameter LoRA), and no modules_to_save / trainable-token wrappers.
    Not for LoRA on mixture-of-experts experts: an expert sees the tokens routed to it, not the batch's rows.
    """
    if type(adapter_tuner) is not LoraModel:
        return False
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and "expert" in name.lower() and "shared_expert" not in name.lower():
            return False
        if isinstance(module, AuxiliaryTrainingWrapper):
            return False
        if isinstance(module, BaseTunerLayer):
            if not isinstance(module, LoraLayer) or isinstance(module, ParamWrapper) or not module.lora_A:
                return False
            if module.lora_embedding_A or any(module.use_dora.values()) or module.lora_variant:
                return False
            if any(module.lora_bias.values()):
                return False
    return True


def find_backbone(model: nn.Module) -> nn.Module:
    """The module whose output feeds the output head (e.g. ``LlamaModel`` of ``LlamaForCausalLM``)."""
    get_out = getattr(model, "get_output_embeddings", None)
    if get_out is None or get_out() is None:
        raise ValueError(
            f"IMSM needs a causal LM with an output head (lm_head), but {type(model).__name__} has no output "
            "embeddings. Load the model with AutoModelForCausalLM (not AutoModel)."
        )
    # transformers' own lookup of the decoder stack (e.g. OPTForCausalLM calls `model.decoder`, not `model`).
    get_decoder = getattr(model, "get_decoder", None)
    try:
        backbone = get_decoder() if get_decoder is not None else None
    except (AttributeError, ValueError):
        backbone = None
    if backbone is None:
        backbone = getattr(model, "base_model", None)
    if backbone is None or backbone is model:
        raise ValueError(
            f"IMSM could not find the backbone of {type(model).__name__} (the module before the output head, named "
            "by the model's `base_model_prefix`). Only transformers causal LMs are supported."
        )
    return backbone


def bound_parameter_names(module: nn.Module) -> list[str]:
    params = inspect.signature(module.forward).parameters
    return [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def cache_parameter_name(module: nn.Module) -> str | None:
    """The name of the backbone's KV-cache argument (``cache`` in transformers 5, ``past_key_values`` before)."""
    params = inspect.signature(module.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def last_hidden_state(output: Any) -> torch.Tensor:
    """The ``[batch, seq, d]`` final hidden states of a backbone's output (tuple or ``ModelOutput``)."""
    if isinstance(output, tuple):
        return output[0]
    return output.last_hidden_state


def replace_last_hidden_state(output: Any, hidden: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    output.last_hidden_state = hidden
    return output


def model_device(model: nn.Module) -> torch.device:
    """The device a model's inputs, its gate and its anchors go to: its output head's (where the logits come out; on
    a model split over devices, the last part), else its first parameter's."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    weight = getattr(head, "weight", None)
    return weight.device if weight is not None else next(model.parameters()).device


def hidden_size(model: nn.Module) -> int:
    """The width ``d`` of the final hidden states (the output head's input)."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[1])
    return int(model.config.get_text_config().hidden_size)


def position_limit(model: nn.Module) -> int | None:
    """The most positions the model takes (``n_positions`` / ``max_position_embeddings``), or None if unstated."""
    config = model.config.get_text_config()
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
