"""Saving and loading an IMSM adapter (the bodies of ``IMSMModel``'s peft hooks ``_get_adapter_state_dict`` and
``_remap_adapter_state_dict_for_load``).

What is saved: the wrapped adapter's weights (by its own peft tuner), the gate's weights (``imsm_gate.<name>.`` keys,
saved without the adapter name) and the anchor term's counters (``AnchorRegularizer.state_dict()``, the keys
``base_model.imsm_anchor_draws`` / ``base_model.imsm_training_forwards``). Loading takes the counters back
(``AnchorRegularizer.load_state_dict``), checks the gate's shapes against the model, and warns, naming the keys, about
weights of the model left unloaded and saved weights nothing uses.

The gate's weights in the file are its EFFECTIVE weights. In memory the gate keeps ``W_B`` (the route gate's ``W_R``,
``b_R``) divided by its ``lr_scale`` (``IMSMConfig.gate_lr_scale``) and multiplies its output by it (so that Adam
moves it ``lr_scale`` times faster; the optimizer's state is for that stored parameter). :func:`adapter_state_dict`
saves those weights times ``lr_scale`` (:data:`SCALED_GATE_WEIGHTS`, in float64, so that loading at the same scale
gives back the trained float32 weights bit for bit: exact resumes) and the marker :data:`EFFECTIVE_KEY`;
:func:`remap_state_dict_for_load` divides them by the loading model's ``lr_scale``. The gate is then the same
function whatever ``gate_lr_scale`` the adapter is loaded with (an edited ``adapter_config.json``, a training resumed
with another ``--imsm_gate_lr_scale``).

Files without the marker (written before it existed) hold the stored weights, divided by the ``gate_lr_scale`` they
were trained with; they load unchanged, i.e. read at the ``gate_lr_scale`` of the config they are loaded with. That is
right with the config they were saved with; whether that config's ``gate_lr_scale`` was edited since cannot be told
from the file, so such a file loads to another gate (its router's logit times new / old scale). Save it again from a
model loaded with its original config to get a file in the current format.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from torch import nn

from .anchor_term import STATE_KEYS as ANCHOR_STATE_KEYS
from .config import IMSMConfig

EFFECTIVE_KEY = "base_model.imsm_gate.effective"
"""The marker saved with the gate's weights (an int64 1): they are the effective weights (``lr_scale`` folded in)."""
SCALED_GATE_WEIGHTS = ("W_B.weight", "W_R.weight", "W_R.bias")
"""The gate's weights that it keeps divided by its ``lr_scale`` (names inside the gate)."""


def adapter_state_dict(
    tuner: Any, model: nn.Module, config: IMSMConfig, adapter_name: str, state_dict: dict, unwanted_adapter_names: Any
) -> dict[str, torch.Tensor]:
    """The weights to save of the IMSM adapter ``adapter_name`` of ``model`` (``tuner``: its ``IMSMModel``, or None),
    taken from ``model``'s full ``state_dict``."""
    inner_cls = PEFT_TYPE_TO_TUNER_MAPPING[config.adapter_config.peft_type]
    to_return = inner_cls._get_adapter_state_dict(
        model=model,
        config=config.adapter_config,
        adapter_name=adapter_name,
        state_dict=state_dict,
        unwanted_adapter_names=unwanted_adapter_names,
    )
    if tuner is not None:
        tuner._check_usable()  # (a superseded model's weights are the newer model's: saving them would mislabel)
    gate_prefix = f"imsm_gate.{adapter_name}."
    scale = gate_lr_scale(tuner, config, adapter_name)
    for key, value in state_dict.items():
        if gate_prefix not in key:
            continue
        if key.split(gate_prefix)[-1] in SCALED_GATE_WEIGHTS:
            value = value.detach().double() * scale  # (the effective weight; float64: exact back at load)
        to_return[key] = value
        to_return[EFFECTIVE_KEY] = torch.tensor(1, dtype=torch.int64)
    if tuner is not None:
        to_return.update(tuner.anchor_term.state_dict())  # (the anchor counters, for exact resumes)
    return to_return


def remap_state_dict_for_load(
    tuner: Any, model: nn.Module, config: IMSMConfig, adapter_name: str, state_dict: dict
) -> dict[str, torch.Tensor]:
    """A saved IMSM adapter's weights, keyed for ``model`` (the gate's keys get ``adapter_name`` back); the anchor
    counters go to ``tuner`` (its ``IMSMModel``, or None). Raises ``ValueError`` for a gate of another shape."""
    state_dict = dict(state_dict)
    anchor_state = {k: state_dict.pop(k) for k in ANCHOR_STATE_KEYS if k in state_dict}
    if tuner is not None:
        tuner.anchor_term.load_state_dict(anchor_state)
    effective = state_dict.pop(EFFECTIVE_KEY, None) is not None  # (else the stored weights, as saved before)
    scale = gate_lr_scale(tuner, config, adapter_name)
    model_state = model.state_dict()
    remapped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if "imsm_gate." in key and f"imsm_gate.{adapter_name}." not in key:
            key = key.replace("imsm_gate.", f"imsm_gate.{adapter_name}.")
            expected = model_state.get(key)
            if effective and key.split(f"imsm_gate.{adapter_name}.")[-1] in SCALED_GATE_WEIGHTS:
                dtype = expected.dtype if expected is not None else torch.float32
                value = (value.double() / scale).to(dtype)  # (the gate keeps it divided by its lr_scale)
            # (a ZeRO-3-partitioned model reports empty shapes: nothing to compare there)
            if expected is not None and expected.numel() > 0 and expected.shape != value.shape:
                raise ValueError(
                    f"The saved IMSM gate weight {key.split('imsm_gate.')[-1]} has shape {tuple(value.shape)} "
                    f"but this model needs {tuple(expected.shape)}: the adapter was trained on a base model with "
                    f"another hidden size (or another gate_rank / gate_mode). Load it onto the base model it was "
                    f"trained on ({config.base_model_name_or_path or 'see base_model_name_or_path'})."
                )
        remapped[key] = value
    inner_cls = PEFT_TYPE_TO_TUNER_MAPPING[config.adapter_config.peft_type]
    remapped = inner_cls._remap_adapter_state_dict_for_load(
        model=model, config=config.adapter_config, adapter_name=adapter_name, state_dict=remapped
    )
    warn_about_unmatched_keys(model, config, adapter_name, remapped, model_state)
    return remapped


def gate_lr_scale(tuner: Any, config: IMSMConfig, adapter_name: str) -> float:
    """The ``lr_scale`` of the gate of ``adapter_name`` (``tuner``: its ``IMSMModel``, or None: the config's)."""
    gates = getattr(tuner, "imsm_gate", None) if tuner is not None else None
    if gates is not None and adapter_name in gates:
        return float(gates[adapter_name].lr_scale)
    return float(config.gate_lr_scale)


def warn_about_unmatched_keys(
    model: nn.Module, config: IMSMConfig, adapter_name: str, state_dict: dict, model_state: dict
) -> None:
    """Warn, naming the keys, when a saved IMSM adapter leaves weights of this model unloaded or holds weights that
    nothing here uses (e.g. a file without the wrapped adapter's weights, or a config whose nested ``peft_type`` /
    ``gate_mode`` no longer matches the weights): the adapter would silently keep its initial values."""
    marker = f".{adapter_name}"
    expected = {k for k in model_state if f"{marker}." in k or k.endswith(marker)}
    # State that peft does not save per adapter (VB-LoRA's shared vector bank, AdaLoRA's rank counters, VeRA's
    # projections without save_projection).
    expected = {k for k in expected if "vblora_vector_bank" not in k and ".ranknum." not in k}
    if getattr(config.adapter_config, "save_projection", True) is False:
        expected = {k for k in expected if ".vera_A." not in k and ".vera_B." not in k}
    prefix = "base_model.model."
    if not any(k.startswith(prefix) for k in model_state):
        state_keys = {k.removeprefix(prefix) for k in state_dict}
    else:
        state_keys = set(state_dict)
    missing = sorted(expected - state_keys)
    unused = sorted(k for k in state_keys if k not in model_state)
    if missing:
        warnings.warn(
            f"Loading the IMSM adapter '{adapter_name}' left {len(missing)} weight(s) of this model at their initial "
            f"values because the saved adapter does not hold them: {first_keys(missing)}. The saved adapter_model file "
            "does not match its adapter_config.json (wrapped peft_type "
            f"{config.adapter_config.peft_type}, gate_mode {config.gate_mode!r}); save the adapter again from the "
            "trained model, or load it with the config it was saved with.",
            stacklevel=5,
        )
    if unused:
        warnings.warn(
            f"The saved IMSM adapter '{adapter_name}' holds {len(unused)} weight(s) that nothing in this model uses, "
            f"so they were ignored: {first_keys(unused)}. The adapter_config.json (wrapped peft_type "
            f"{config.adapter_config.peft_type}, gate_mode {config.gate_mode!r}) does not describe the saved weights.",
            stacklevel=5,
        )


def first_keys(keys: list[str], n: int = 5) -> str:
    """The first ``n`` of ``keys``, comma-separated, and how many more (for error messages)."""
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")
