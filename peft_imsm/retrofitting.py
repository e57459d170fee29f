"""Retrofit: give an adapter you already trained an IMSM gate (``peft_imsm.retrofit``).

:func:`retrofit` builds an IMSM model around an existing peft adapter (a folder written by ``save_pretrained``, or
an in-memory ``PeftModel``): the adapter's weights are loaded unchanged and stay frozen
(``IMSMConfig(freeze_adapter=True)``); only the gate is trainable. The result is an ordinary IMSM ``PeftModel``:
train its gate with :func:`peft_imsm.train_gate` (the fast path, :mod:`peft_imsm.gate_training`) or with the
``Trainer`` / ``SFTTrainer(model=...)``, save it, reload it with ``AutoPeftModelForCausalLM``, ``generate()``.
Retrofitted from a folder, its ``save_pretrained`` (:func:`save_pretrained`) refuses that folder: saving there would
replace the original adapter's files.
"""

from __future__ import annotations

import copy
import os
import types
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from torch import nn

from .anchors import AnchorConfig
from .config import IMSMConfig
from .model import IMSMModel
from .output_dirs import OutputDirError, check_not_protected

_DEFAULT = object()
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


# --------------------------------------------------------------------------------------------------- building
def retrofit(
    model: nn.Module,
    adapter: str | os.PathLike | PeftModel | Mapping[str, str | os.PathLike] | None = None,
    *,
    gate_rank: int = 8,
    gate_mode: str = "query",
    gate_dropout: float = 0.1,
    anchor: AnchorConfig | dict | None | Any = _DEFAULT,
    adapter_name: str = "default",
    **config_kwargs: Any,
) -> PeftModel:
    """Wrap an adapter you already trained in IMSM: its weights loaded unchanged and frozen, a new gate trainable.

    Args:
        model: the base causal LM the adapter was trained on (``AutoModelForCausalLM``, also a QLoRA-quantized one),
            or an in-memory ``PeftModel`` holding the adapter (then leave ``adapter`` out).
        adapter: a folder written by ``PeftModel.save_pretrained`` (``adapter_config.json`` and
            ``adapter_model.safetensors``) or a hub id; or a ``PeftModel`` of that adapter. The adapter may be of
            any type IMSM can wrap (LoRA, DoRA, (IA)3, AdaLoRA, LoHa, LoKr, VeRA, ...). Or a LoRA library: a dict
            ``{name: folder}`` of plain LoRA adapters, each loaded frozen as an IMSM adapter of that name with its own
            route gate (``gate_mode="route"`` is then required), all active together: at inference each sequence
            runs the base model or one of them (see :func:`train_gate` with a dict, and :func:`load_library`).
        gate_rank, gate_mode, gate_dropout: the gate's settings (see :class:`~peft_imsm.IMSMConfig`).
        anchor: the anchor section; default ``AnchorConfig()`` (self anchors, weight 1): they teach the gate what
            "not the adapter's task" looks like. ``None`` trains the gate on target data only (the paper's gate,
            which then leans on the adapter everywhere).
        adapter_name: the name of the IMSM adapter in the returned model.
        **config_kwargs: any other :class:`~peft_imsm.IMSMConfig` field.

    Returns:
        An IMSM ``PeftModel``; ``model.print_trainable_parameters()`` counts the gate only.

    A ``PeftModel`` passed in is consumed, as ``get_peft_model`` consumes its base model: its base model is reused
    (its adapter layers are unloaded and injected again under IMSM, nothing is copied); use the returned model.

    Example::

        import peft_imsm
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained("my-base")
        model = peft_imsm.retrofit(base, "my-lora-adapter")
        peft_imsm.train_gate(model, sample_of_the_task, tokenizer)  # or: Trainer(model=model, ...).train()
        model.save_pretrained("my-lora-adapter-imsm")
    """
    if anchor is _DEFAULT:
        anchor = AnchorConfig()
    if isinstance(adapter, Mapping):
        return _retrofit_library(model, dict(adapter), gate_rank=gate_rank, gate_mode=gate_mode,
                                 gate_dropout=gate_dropout, anchor=anchor, **config_kwargs)  # fmt: skip
    if isinstance(model, PeftModel):
        if adapter is not None:
            raise ValueError(
                "retrofit() got a PeftModel as `model` and also an `adapter`. Pass either the base model and the "
                "adapter (folder or PeftModel), or the PeftModel alone."
            )
        adapter, model = model, None
    if adapter is None:
        raise ValueError(
            "retrofit() needs the adapter to wrap: retrofit(base_model, 'path/to/adapter') or retrofit(peft_model)."
        )
    if isinstance(adapter, PeftModel):
        adapter_config, weights, base = _take_in_memory_adapter(adapter, model)
        source = f"the in-memory {type(adapter).__name__}"
    elif isinstance(adapter, (str, os.PathLike)):
        if model is None or not isinstance(model, nn.Module):
            raise TypeError("retrofit(model, path) needs the base model (a transformers causal LM) as `model`.")
        if isinstance(model, IMSMModel) or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            raise ValueError(
                f"The base model passed to retrofit() already has peft adapters ({type(model).__name__}). Pass the "
                "plain base model, or pass the PeftModel alone: retrofit(peft_model)."
            )
        path = os.fspath(adapter)
        adapter_config, weights = _read_saved_adapter(path)
        base = model
        source = f"the adapter at {path!r}"
    else:
        raise TypeError(
            f"`adapter` must be an adapter folder (str or path) or a PeftModel, got {type(adapter).__name__}."
        )
    _check_wrappable(adapter_config, source)
    adapter_config = copy.deepcopy(adapter_config)
    adapter_config.inference_mode = False
    config_kwargs.setdefault("freeze_adapter", True)
    imsm_config = IMSMConfig(
        adapter_config=adapter_config,
        gate_rank=gate_rank,
        gate_mode=gate_mode,
        gate_dropout=gate_dropout,
        anchor=anchor,
        **config_kwargs,
    )
    try:
        peft_model = get_peft_model(base, imsm_config, adapter_name=adapter_name)
    except ValueError as exc:
        if "not found in the base model" in str(exc) or "Target module" in str(exc):
            raise ValueError(
                f"The modules that {source} adapts ({adapter_config.target_modules}) are not in this base model "
                f"({type(base).__name__}): the adapter was trained on another base model "
                f"({adapter_config.base_model_name_or_path or 'see base_model_name_or_path'}). Pass the base model it "
                f"was trained on. ({exc})"
            ) from exc
        raise
    _load_adapter_weights(peft_model, weights, adapter_name, source, adapter_config)
    if not imsm_config.freeze_adapter:  # (the core freezes it with freeze_adapter=True)
        warnings.warn(
            "retrofit(freeze_adapter=False): the wrapped adapter is trainable, so Trainer training changes it; "
            "train_gate() still trains the gate alone.",
            stacklevel=2,
        )
    if isinstance(adapter, (str, os.PathLike)) and os.path.isdir(adapter):
        peft_model._imsm_retrofitted_from = os.path.abspath(adapter)
        peft_model.save_pretrained = types.MethodType(save_pretrained, peft_model)
    return peft_model


def _retrofit_library(model: nn.Module, adapters: dict, **kwargs: Any) -> PeftModel:
    """:func:`retrofit` of a LoRA library ``{name: folder}``: the first adapter as usual, the others added to it."""
    if not adapters or not all(isinstance(k, str) and k for k in adapters):
        raise ValueError(
            f"retrofit() got a LoRA library with no adapters or a name that is not a string: {adapters!r}."
        )
    if kwargs.get("gate_mode") != "route":
        raise ValueError(
            f"retrofit() of a LoRA library ({', '.join(adapters)}) routes each sequence to the base model or one "
            f"adapter, which is what the route gate does; got gate_mode={kwargs.get('gate_mode')!r}. Pass "
            "gate_mode='route' (and anchor=AnchorConfig.from_tokenizer(tokenizer) on instruct models)."
        )
    if "__base__" in adapters:
        raise ValueError("'__base__' names the base model's route; give the adapter another name.")
    if isinstance(model, PeftModel):
        raise ValueError("retrofit() of a LoRA library needs the plain base model and a dict of adapter folders.")
    names = list(adapters)
    peft_model = retrofit(model, adapters[names[0]], adapter_name=names[0], **kwargs)
    sources = [os.path.abspath(adapters[names[0]])] if os.path.isdir(adapters[names[0]]) else []
    first = peft_model.peft_config[names[0]]
    for name in names[1:]:
        path = os.fspath(adapters[name])
        adapter_config, weights = _read_saved_adapter(path)
        adapter_config = copy.deepcopy(adapter_config)
        adapter_config.inference_mode = False
        config = IMSMConfig(
            adapter_config=adapter_config, gate_rank=first.gate_rank, gate_mode=first.gate_mode,
            gate_dropout=first.gate_dropout, gate_scalar=first.gate_scalar, gate_lr_scale=first.gate_lr_scale,
            anchor=copy.deepcopy(first.anchor), freeze_adapter=True, route_threshold=first.route_threshold,
            base_model_name_or_path=first.base_model_name_or_path,
        )  # fmt: skip
        peft_model.add_adapter(name, config)
        _load_adapter_weights(peft_model, weights, name, f"the adapter at {path!r}", adapter_config)
        if os.path.isdir(path):
            sources.append(os.path.abspath(path))
    peft_model.base_model.set_adapter(names)
    if sources:
        peft_model._imsm_retrofitted_from = sources
        peft_model.save_pretrained = types.MethodType(save_pretrained, peft_model)
    return peft_model


def load_library(model: nn.Module, folder: str | os.PathLike, is_trainable: bool = False) -> PeftModel:
    """Load a LoRA library that ``save_pretrained`` of a model from :func:`retrofit` with a dict wrote: peft's
    multi-adapter layout (one sub-folder per adapter name, ``default`` in the folder itself), loaded the peft way
    (``PeftModel.from_pretrained`` for the first adapter, ``load_adapter`` for each other one) and made active
    together (``set_adapter([...])``), in the order of the sub-folders' names.

    Args:
        model: the base model the adapters were trained on.
        folder: the folder ``save_pretrained`` wrote.
        is_trainable: load the gates trainable (then train one adapter at a time: ``set_adapter(name)``).
    """
    folder = os.fspath(folder)
    found = []
    if os.path.isfile(os.path.join(folder, "adapter_config.json")):
        found.append(("default", folder))
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            found.append((name, path))
    if not found:
        raise ValueError(
            f"{folder!r} holds no saved adapter (no adapter_config.json in it or in a sub-folder). Pass the folder that "
            "save_pretrained of the LoRA library wrote."
        )
    for _, path in found:
        config = PeftConfig.from_pretrained(path)
        if str(getattr(config.peft_type, "value", config.peft_type)) != "IMSM":
            raise ValueError(
                f"{path!r} holds a {config.peft_type} adapter, not an IMSM one: not a LoRA library member."
            )
    (first, first_path), rest = found[0], found[1:]
    peft_model = PeftModel.from_pretrained(model, first_path, adapter_name=first, is_trainable=is_trainable)
    for name, path in rest:
        peft_model.load_adapter(path, adapter_name=name, is_trainable=is_trainable)
    peft_model.base_model.set_adapter([name for name, _ in found])
    return peft_model


def save_pretrained(self: PeftModel, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
    """``PeftModel.save_pretrained`` of a model retrofitted from an adapter folder (:func:`retrofit` binds it to the
    model), refusing that folder: saving there would replace the original adapter's ``adapter_config.json`` and
    weights with the IMSM adapter's. Raises ``OutputDirError`` (a ``ValueError``) before anything is written."""
    sources = self.__dict__.get("_imsm_retrofitted_from")
    sources = [sources] if isinstance(sources, str) else list(sources or [])
    for name in kwargs.get("selected_adapters") or list(self.peft_config):
        target = save_directory if name == "default" else os.path.join(save_directory, name)  # (where peft saves)
        for source in sources:
            try:
                check_not_protected(target, {"adapter folder": source}, name="save_directory", nested=False,
                                    working_dirs=False)  # fmt: skip
            except OutputDirError:
                raise OutputDirError(
                    f"save_pretrained({os.fspath(save_directory)!r}) would write the IMSM adapter {name!r} into "
                    f"{source}, the folder of an adapter this model was retrofitted from, replacing that adapter's "
                    "adapter_config.json and weights. Save the retrofitted model to a new folder, e.g. "
                    f"model.save_pretrained({(source.rstrip(os.sep) + '-imsm')!r})."
                ) from None
    return type(self).save_pretrained(self, save_directory, *args, **kwargs)


def _take_in_memory_adapter(
    peft_model: PeftModel, base: nn.Module | None
) -> tuple[PeftConfig, dict[str, torch.Tensor], nn.Module]:
    if base is not None:
        raise ValueError(
            "retrofit(base_model, peft_model): the PeftModel already holds its base model; call retrofit(peft_model)."
        )
    inner = peft_model.base_model
    if isinstance(inner, IMSMModel):
        raise ValueError(
            "This PeftModel is already an IMSM model (it has a gate). To train its gate further, load it with "
            "PeftModel.from_pretrained(base, path, is_trainable=True) and call peft_imsm.train_gate(model, ...)."
        )
    active = peft_model.active_adapter
    if not isinstance(active, str):
        raise ValueError(
            f"This PeftModel has several active adapters {active}; retrofit wraps one. Call "
            "peft_model.set_adapter(name) first."
        )
    config = peft_model.peft_config[active]
    _check_wrappable(config, f"the in-memory PeftModel's adapter {active!r}")
    weights = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model, adapter_name=active).items()}
    base_model = peft_model.unload()
    return config, weights, base_model


def _read_saved_adapter(path: str) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    if os.path.isfile(path):
        raise ValueError(
            f"{path!r} is a file; retrofit() needs the adapter FOLDER written by PeftModel.save_pretrained "
            "(holding adapter_config.json and adapter_model.safetensors)."
        )
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "adapter_config.json")):
        hint = (
            " It holds a config.json: this looks like a full model. Pass it as the base model, and the adapter folder "
            "(written by PeftModel.save_pretrained) as `adapter`."
            if os.path.isfile(os.path.join(path, "config.json"))
            else ""
        )
        raise ValueError(
            f"No adapter in {path!r}: there is no adapter_config.json. retrofit() needs the folder written by "
            f"PeftModel.save_pretrained (adapter_config.json + adapter_model.safetensors).{hint}"
        )
    if not os.path.isdir(path) and (os.path.isabs(path) or path.startswith(".") or path.count("/") != 1):
        raise FileNotFoundError(
            f"No adapter folder at {path!r} (and it is not a hub id of the form 'owner/name'). Pass the folder "
            "written by PeftModel.save_pretrained."
        )
    try:
        config = PeftConfig.from_pretrained(path)
    except Exception as exc:  # (network / hub errors come in many classes)
        raise ValueError(
            f"Could not read an adapter config from {path!r} ({type(exc).__name__}: {exc}). Pass the folder written "
            "by PeftModel.save_pretrained, or a hub id of an adapter."
        ) from exc
    _check_wrappable(config, f"the adapter at {path!r}")
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in _WEIGHT_FILES):
        raise ValueError(
            f"{path!r} has an adapter_config.json but no adapter weights ({' or '.join(_WEIGHT_FILES)}): it was not "
            "saved completely. Save the adapter again with model.save_pretrained(path)."
        )
    weights = load_peft_weights(path, device="cpu")
    return config, weights


def _check_wrappable(config: PeftConfig, source: str) -> None:
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    if peft_type == "IMSM":
        raise ValueError(
            f"{source} is already an IMSM adapter (it has a gate). Load it with PeftModel.from_pretrained(base, path, "
            "is_trainable=True) (after `import peft_imsm`) and train its gate with peft_imsm.train_gate(model, ...)."
        )
    if config.is_prompt_learning:
        raise ValueError(
            f"{source} is a prompt-learning adapter ({peft_type}); it adds virtual tokens instead of changing the "
            "model's weights, so there is no adapted view of the same model for a gate to weigh against the frozen "
            "one. Retrofit works on weight adapters (LoRA, DoRA, (IA)3, AdaLoRA, LoHa, LoKr, VeRA); train one of "
            "those, or IMSM from the start: get_peft_model(base, IMSMConfig(adapter_config=LoraConfig(...)))."
        )
    try:
        IMSMConfig._build_adapter_config(copy.deepcopy(config))
    except ValueError as exc:
        raise ValueError(f"{source} cannot be retrofitted: {exc}") from exc


def _load_adapter_weights(
    peft_model: PeftModel,
    weights: dict[str, torch.Tensor],
    adapter_name: str,
    source: str,
    adapter_config: PeftConfig,
) -> None:
    """Load the wrapped adapter's weights bit for bit; every adapter tensor must be found, with its shape."""
    current = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    expected = {k: v for k, v in current.items() if "imsm_gate." not in k}
    new_gate = {k: v.detach().clone() for k, v in current.items() if "imsm_gate." in k}
    trained_on = adapter_config.base_model_name_or_path or "the base model named in its adapter_config.json"
    mismatched = [
        f"{k}: adapter {tuple(weights[k].shape)}, this model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and tuple(weights[k].shape) != tuple(v.shape)
    ]
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if mismatched or missing or unexpected:
        details = "; ".join(
            part
            for part in (
                f"shape mismatch for {len(mismatched)} tensor(s), e.g. {mismatched[0]}" if mismatched else "",
                f"{len(missing)} adapter tensor(s) of this model not in the adapter, e.g. {missing[0]}"
                if missing
                else "",
                f"{len(unexpected)} adapter tensor(s) with no place in this model, e.g. {unexpected[0]}"
                if unexpected
                else "",
            )
            if part
        )
        raise ValueError(
            f"{source} does not fit this base model ({type(peft_model.get_base_model()).__name__}): {details}. It was "
            f"trained on another base model ({trained_on}); pass the base model it was trained on."
        )
    # The complete IMSM state: the adapter's weights and the new gate as initialised (so nothing is missing).
    result = set_peft_model_state_dict(peft_model, {**new_gate, **weights}, adapter_name=adapter_name)
    left = [k for k in result.unexpected_keys if "imsm_gate" not in k]
    if left:
        raise ValueError(f"{source}: {len(left)} adapter tensor(s) were not loaded, e.g. {left[0]}.")
