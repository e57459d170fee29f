"""peft's tuner interface of IMSM: what IMSM supports of ``BaseTuner`` and of the wrapped tuner, method by method.

:class:`IMSMTunerInterface` is the base class of :class:`~peft_imsm.model.IMSMModel`; it holds no state of its own.
An IMSM model holds one adapter (a wrapped peft adapter and its gate), or a LoRA library: several route-gate adapters
(``add_adapter`` / ``load_adapter``, or :func:`~peft_imsm.retrofit` with a dict), which ``set_adapter([...])`` makes
active together, each sequence then running the base model or one of them (:meth:`IMSMTunerInterface.inject_adapter`
says what a library member must be). Switching adapters on and off, their gradients and dtype are passed on to the
wrapped tuner (plus the gates and the dual pass); merging, combining or deleting adapters is refused with an error
that says why and what to do instead; ``__getattr__`` reaches the transformers
model's attributes, as peft's tuners do, but refuses the wrapped tuner's other methods.

The attributes it relies on are set by ``IMSMModel.__init__``: ``model``, ``adapter_tuner``, ``imsm_gate``,
``dual_pass``, ``peft_config``, ``_adapter_param_names``, ``_unloaded``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .backbone import hidden_size, model_device
from .gate import IMSMGate

# Methods of the wrapped tuner that IMSM passes on unchanged.
_PASSED_TO_ADAPTER_TUNER = frozenset({"update_and_allocate"})  # AdaLoRA's rank-budget step

#: False while a call runs with peft's mixed-adapter batch (``adapter_names=``): both views then run as two passes.
STACKING_ALLOWED: ContextVar[bool] = ContextVar("imsm_stacking_allowed", default=True)

_MERGE_MESSAGE = (
    "IMSM cannot be merged into the base weights: it needs both the frozen view (adapter off) and the adapted view "
    "(adapter on) at run time, and mixes their hidden states with a gate at every token. Keep the model unmerged "
    "(save it with `save_pretrained`, load it with `PeftModel.from_pretrained`), or call `unload()` to drop IMSM."
)


class IMSMTunerInterface(BaseTuner):
    """peft's ``BaseTuner`` interface of an IMSM model (see the module docstring)."""

    @property
    def _active_name(self) -> str:
        return self.active_adapter if isinstance(self.active_adapter, str) else self.active_adapter[0]

    @property
    def _active_names(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    def _check_usable(self) -> None:
        if self.dual_pass.superseded:
            raise RuntimeError(
                "This IMSM model was superseded: get_peft_model (or PeftModel.from_pretrained) was called again on its "
                f"base model ({type(self.model).__name__}), which removed this model's hooks and adapter layers from it "
                "and gave them to the new IMSM model. Use the newest model, or reload the base model (e.g. "
                "AutoModelForCausalLM.from_pretrained) for each IMSM model you want to keep."
            )
        if self._unloaded:
            raise RuntimeError(
                "IMSM was unloaded from this model (`unload()` returned the base model and removed the gate and the "
                "wrapped adapter's layers), so this IMSM model can no longer run. Use the model `unload()` returned, "
                "or load the saved adapter again with `PeftModel.from_pretrained`."
            )

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:  # adapters are injected by adapter_tuner
        raise NotImplementedError

    @staticmethod
    def _check_target_module_exists(peft_config, key):
        return False

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        pass

    def _apply_freeze_adapter(self) -> None:
        if not self.peft_config[self._active_name].freeze_adapter:
            return
        names = set(self._adapter_param_names)
        for name, param in self.model.named_parameters():
            if name in names:
                param.requires_grad_(False)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """peft's per-call hooks of the wrapped tuner (e.g. LoRA's ``adapter_names=`` mixed batches).

        A mixed batch names one adapter per row, so both views run as separate passes for that call.
        """
        inner = getattr(self.adapter_tuner, "_enable_peft_forward_hooks", None)
        mixed = kwargs.get("adapter_names") is not None
        token = STACKING_ALLOWED.set(False) if mixed else None
        try:
            if inner is None:
                yield
            else:
                with inner(*args, **kwargs):
                    yield
        finally:
            if token is not None:
                STACKING_ALLOWED.reset(token)

    def inject_adapter(
        self, model: nn.Module, adapter_name: str, low_cpu_mem_usage: bool = False, **kwargs: Any
    ) -> None:
        """Add a second (third, ...) IMSM adapter: a member of a LoRA library (``PeftModel.add_adapter`` /
        ``load_adapter`` call this after putting its config in ``peft_config``).

        Every member is a hard-routed route gate (``gate_mode="route"`` with a ``route_threshold``) around plain LoRA
        (no DoRA, no LoRA bias), as the first adapter: at inference each sequence runs the base model or one adapter,
        the others' updates zeroed on its row. It is added inactive; ``set_adapter([...])`` routes over several.
        """
        first = self.peft_config[next(iter(self.imsm_gate))]
        config = self.peft_config[adapter_name]
        problems = [
            f"{name} has gate_mode={c.gate_mode!r}"
            for name, c in ((next(iter(self.imsm_gate)), first), (adapter_name, config))
            if c.gate_mode != "route"
        ] + [
            f"{name} has route_threshold=None (the soft mix)"
            for name, c in ((next(iter(self.imsm_gate)), first), (adapter_name, config))
            if c.gate_mode == "route" and c.route_threshold is None
        ]
        if str(config.adapter_config.peft_type.value) != "LORA" or not self.dual_pass.supports_stacking:
            problems.append("each must wrap plain LoRA (no DoRA, no LoRA bias, no other adapter type)")
        if problems:
            self.peft_config.pop(adapter_name, None)
            raise ValueError(
                f"Cannot add the IMSM adapter {adapter_name!r}: several IMSM adapters in one model form a LoRA library, "
                "where each sequence runs the base model or ONE adapter, chosen by the adapters' route gates; "
                f"{'; '.join(problems)}. Build each with IMSMConfig(adapter_config=LoraConfig(...), gate_mode='route', "
                "anchor=...) (route_threshold 0.5 by default), or serve other adapters as separate models."
            )
        adapter_config = config.adapter_config
        adapter_config.inference_mode = config.inference_mode
        adapter_config.base_model_name_or_path = config.base_model_name_or_path
        active = self.active_adapter
        self.adapter_tuner.peft_config[adapter_name] = adapter_config
        before = {n for n, _ in self.model.named_parameters()}
        self.adapter_tuner.inject_adapter(self.model, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
        added = [n for n, _ in self.model.named_parameters() if n not in before or f".{adapter_name}." in n]
        self._adapter_param_names = sorted(set(self._adapter_param_names) | set(added))
        gate = IMSMGate(hidden_size(self.model), config.gate_rank, config.gate_mode, config.gate_dropout,
                        scalar=config.gate_scalar, lr_scale=config.gate_lr_scale)  # fmt: skip
        gate.to(model_device(self.model))
        gate.requires_grad_(False)
        self.imsm_gate[adapter_name] = gate
        self.model.peft_config = self.peft_config
        self.dual_pass.hook_lora_layers(self.model)
        self.adapter_tuner.set_adapter(active)  # (the new adapter stays inactive until set_adapter names it)
        for name, param in self.model.named_parameters():
            if f".{adapter_name}." in name:
                param.requires_grad_(False)

    def enable_adapter_layers(self) -> None:
        """Turn IMSM back on (both the wrapped adapter and the gate), for every thread.

        Model-wide, as in peft: see :meth:`disable_adapter_layers`.
        """
        self._check_usable()
        self.adapter_tuner.enable_adapter_layers()
        self.dual_pass.enabled = True

    def disable_adapter_layers(self) -> None:
        """Turn IMSM off: the model is then the plain base model (used by ``PeftModel.disable_adapter()``).

        Model-wide, as in peft: while ``with model.disable_adapter():`` runs, every thread sees the base model, as
        with plain LoRA. What is per thread is IMSM's internal frozen view only (the base-model pass inside each
        forward / ``generate()``), so concurrent IMSM calls outside such a block are each exact.
        """
        self._check_usable()
        self.adapter_tuner.disable_adapter_layers()
        self.dual_pass.enabled = False

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make one IMSM adapter active (``"name"``), or several of a LoRA library (``["a", "b", ...]``), over
        which each sequence is routed (to the base model or one of them) at inference."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.imsm_gate]
        if unknown or not names or len(set(names)) != len(names):
            raise ValueError(f"Unknown or repeated IMSM adapters {names}; this model has {list(self.imsm_gate)}.")
        self.adapter_tuner.set_adapter(names[0] if len(names) == 1 else names, inference_mode=inference_mode)
        for name in names:
            self.imsm_gate[name].requires_grad_(not inference_mode and len(names) == 1)
        self.active_adapter = names[0] if len(names) == 1 else names
        self._apply_freeze_adapter()

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Enable or disable gradients of the IMSM adapter (the wrapped adapter and the gate).

        With ``freeze_adapter=True`` the wrapped adapter stays frozen; only the gate follows ``requires_grad``.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.imsm_gate]
        if unknown:
            raise ValueError(f"Unknown IMSM adapter(s) {unknown}; this model has {list(self.imsm_gate)}.")
        self.adapter_tuner.set_requires_grad(names, requires_grad=requires_grad)
        for name in names:
            self.imsm_gate[name].requires_grad_(requires_grad)
        self._apply_freeze_adapter()

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """IMSM cannot be expressed as a LoRA (it mixes two views at run time)."""
        return False

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        self.adapter_tuner._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(_MERGE_MESSAGE)

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise ValueError(_MERGE_MESSAGE)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(
            "add_weighted_adapter is not supported on an IMSM model: it would add a combined adapter to the wrapped "
            "LoRA layers only, without a gate, and IMSM holds exactly one adapter. Combine plain LoRA adapters "
            "first (on a LoRA PeftModel), then wrap the result with IMSM."
        )

    def subtract_mutated_init(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(
            "subtract_mutated_init (PiSSA/OLoRA conversion) is not supported on an IMSM model. Save the wrapped "
            "adapter from a plain LoRA PeftModel to convert it."
        )

    def unload(self) -> nn.Module:
        """Remove IMSM (gate and wrapped adapter) and return the untouched base model."""
        self._check_usable()
        self.dual_pass.remove()
        self._unloaded = True
        return self.adapter_tuner.unload()

    def delete_adapter(self, adapter_name: str) -> None:
        raise ValueError("An IMSM model holds a single adapter; use `unload()` to get the base model back.")

    def __getattr__(self, name: str) -> Any:
        """Attributes of the transformers model (``config``, ``generation_config``, ...), as peft's tuners do.

        The wrapped tuner's own methods are NOT reached this way (they would act on the wrapped adapter alone, e.g.
        add a hidden adapter without a gate): the ones IMSM supports are defined on this class, the rest raise.
        """
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "adapter_tuner", "imsm_gate", "dual_pass", "anchor_term") or name.startswith("__"):
                raise
        adapter_tuner = self.__dict__["adapter_tuner"]
        if name in _PASSED_TO_ADAPTER_TUNER and hasattr(adapter_tuner, name):
            return getattr(adapter_tuner, name)
        tuner_cls = type(adapter_tuner)
        if hasattr(tuner_cls, name) and not hasattr(BaseTuner, name):
            raise AttributeError(
                f"{tuner_cls.__name__}.{name} is not supported on an IMSM model: it would act on the wrapped "
                f"{tuner_cls.__name__} alone, without IMSM's gate. Use it on a plain peft model before wrapping, "
                "or call `unload()` to drop IMSM first."
            )
        return getattr(self.model, name)
