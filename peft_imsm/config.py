"""``IMSMConfig``: the peft config of IMSM, wrapping the config of any non-prompt-learning peft adapter."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from peft.config import PeftConfig
from peft.utils.peft_types import TaskType

from .anchors import AnchorConfig, is_finite_number
from .gate import GATE_MODES, check_lr_scale
from .peft_type import IMSM_PEFT_TYPE

ROUTE_GATE_LR_SCALE = 100.0
"""``gate_lr_scale`` of the route gate when none is given."""
ANCHOR_BATCH_SIZE = 4
"""``AnchorConfig.batch_size`` when none is given (the route gate: :data:`ROUTE_ANCHOR_BATCH_SIZE`)."""
ROUTE_ANCHOR_BATCH_SIZE = 2
"""``AnchorConfig.batch_size`` of the route gate when none is given."""
ROUTE_THRESHOLD = 0.5
"""``route_threshold`` of the route gate when none is given: one view per prompt at inference."""

# Adapters that run a second model pass of their own or replace the forward; IMSM cannot wrap them.
# AdaMSS reads peft's per-layer switch directly instead of through `disable_adapters`, so the frozen view (see
# peft_imsm.registration) cannot switch it off.
_UNSUPPORTED_ADAPTERS = {"XLORA", "POLY", "ADAPTION_PROMPT", "IMSM", "TRAINABLE_TOKENS", "ADAMSS"}


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, set):
        return sorted(value)
    if isinstance(value, dict):
        return {k: _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    return value


@dataclass
class IMSMConfig(PeftConfig):
    """Configuration of an IMSM adapter.

    Args:
        adapter_config: the config of the wrapped adapter (``LoraConfig`` — also for DoRA —, ``IA3Config``,
            ``AdaLoraConfig``, ``LoHaConfig``, ``LoKrConfig``, ``VeraConfig``, ...). Any non-prompt-learning peft
            config. Saved inside ``adapter_config.json`` and restored as the same config class.
        gate_rank: ``r`` of the gate's low-rank projection (``W_A: 4d x r``, ``W_B: r x d``); the paper uses 8.
        gate_mode: ``"query"`` (the paper's gate), ``"token"`` (the "w/o query" ablation), ``"fixed"`` (the
            "w/o gate" ablation: plain 0.5/0.5 average of the two memories) or ``"route"``: one gate value per
            query from the frozen view's query summary (a logistic router, see :class:`~peft_imsm.gate.IMSMGate`),
            trained by the anchors' routing term to send general prompts to the frozen view and the target task to
            the adapter. ``"route"`` needs ``anchor`` (anchors are what it learns "general" from); use it with
            ``AnchorConfig.from_tokenizer(tokenizer)`` on instruct models.
        gate_dropout: dropout after each gate projection (0.1 in the authors' settings).
        gate_scalar: one gate value per token (``W_B: r x 1``): the mix is a convex combination of the two views'
            states. Default False: the paper's gate, one value per hidden dimension (``W_B: r x d``).
        gate_lr_scale: the gate's output projection ``W_B`` (the route gate's ``W_R``, ``b_R``) moves this many
            times as far per step under Adam-type optimizers, as with a learning rate this many times the training
            one (a reparametrisation, see :class:`~peft_imsm.gate.IMSMGate`; the same gate at initialisation).
            None (default): 100 for ``gate_mode="route"`` (a logistic router learns at about 100x an adapter's
            learning rate), 1 (the paper's gate) otherwise. At most :data:`~peft_imsm.gate.MAX_LR_SCALE` (1e6). The
            saved adapter holds the gate's effective weights (see :mod:`peft_imsm.save_load`), so an adapter loads
            to the same gate whatever ``gate_lr_scale`` it is loaded (or its training resumed) with.
        anchor: an :class:`~peft_imsm.anchors.AnchorConfig` (or its dict) to add the anchor KL term that teaches the
            gate what general, non-target inputs look like; None (default) is the paper's method.
        freeze_adapter: keep the wrapped adapter's weights frozen (never trainable, also when loaded with
            ``is_trainable=True``): only the gate trains. Used to retrofit a gate onto an adapter trained before.
        route_threshold: the route gate only. At inference (every forward without autograd: ``generate()``,
            evaluation, the vLLM export) each sequence runs ONE view, chosen at prefill from its router value ``g``
            (the frozen view's weight): the frozen view alone where ``g > route_threshold``, the adapted view alone
            otherwise. The model then costs what the base model or plain LoRA costs (one KV cache, one pass per
            step); training forwards keep the soft gate, which the router learns through. ``"auto"`` (default):
            0.5 for ``gate_mode="route"``, None otherwise. None: the soft mix ``g * h_frozen + (1 - g) * h_adapted``
            at inference too (both views at every step).

    Attributes that TRL and peft read or set on a config (``target_modules``, ``modules_to_save``,
    ``trainable_token_indices``) read and write the wrapped adapter's config. ``task_type`` must be
    ``"CAUSAL_LM"`` (the default).

    Example::

        import peft_imsm
        from peft import LoraConfig, get_peft_model

        config = peft_imsm.IMSMConfig(adapter_config=LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))
        model = get_peft_model(base_model, config)
    """

    adapter_config: PeftConfig | dict | None = field(
        default=None, metadata={"help": "The peft config of the wrapped adapter (e.g. a LoraConfig)."}
    )
    gate_rank: int = field(default=8, metadata={"help": "Rank r of the gate projection."})
    gate_mode: str = field(default="query", metadata={"help": "'query', 'token', 'fixed' or 'route'."})
    gate_dropout: float = field(default=0.1, metadata={"help": "Dropout after each gate projection."})
    gate_scalar: bool = field(
        default=False, metadata={"help": "One gate value per token instead of one per hidden dimension."}
    )
    gate_lr_scale: float | None = field(
        default=None,
        metadata={"help": "The gate learns this many times as fast (None: 100 for 'route', else 1)."},
    )
    anchor: AnchorConfig | dict | None = field(
        default=None, metadata={"help": "Self-anchored gate (off by default); see peft_imsm.anchors.AnchorConfig."}
    )
    freeze_adapter: bool = field(
        default=False, metadata={"help": "Keep the wrapped adapter frozen: only the gate trains."}
    )
    route_threshold: float | str | None = field(
        default="auto",
        metadata={
            "help": "Route gate: one view per sequence at inference, the frozen one where g > this (None: soft)."
        },
    )

    def __post_init__(self) -> None:
        if self.task_type is None:
            self.task_type = TaskType.CAUSAL_LM
        super().__post_init__()
        self.peft_type = IMSM_PEFT_TYPE
        if self.task_type != TaskType.CAUSAL_LM:
            raise ValueError(
                f"IMSM works on causal language models only, got task_type={self.task_type!r}. Use "
                "task_type='CAUSAL_LM' (the default) and load the model with AutoModelForCausalLM."
            )
        self.adapter_config = self._build_adapter_config(self.adapter_config)
        if isinstance(self.gate_rank, bool) or not isinstance(self.gate_rank, int) or self.gate_rank < 1:
            raise ValueError(f"gate_rank must be an integer >= 1 (the paper uses 8), got {self.gate_rank!r}.")
        if self.gate_mode not in GATE_MODES:
            raise ValueError(f"Unknown gate_mode {self.gate_mode!r}; choose one of {', '.join(GATE_MODES)}.")
        if not is_finite_number(self.gate_dropout) or not 0.0 <= self.gate_dropout < 1.0:
            raise ValueError(
                f"gate_dropout must be a number in [0, 1) (0.1 in the authors' settings, 0.0 for none), got "
                f"{self.gate_dropout!r}."
            )
        if self.gate_lr_scale is None:
            self.gate_lr_scale = ROUTE_GATE_LR_SCALE if self.gate_mode == "route" else 1.0
        check_lr_scale(self.gate_lr_scale, "gate_lr_scale")
        if not isinstance(self.gate_scalar, bool):
            raise ValueError(f"gate_scalar must be True or False, got {self.gate_scalar!r}.")
        if not isinstance(self.freeze_adapter, bool):
            raise ValueError(f"freeze_adapter must be True or False, got {self.freeze_adapter!r}.")
        if isinstance(self.anchor, dict):
            anchor = dict(self.anchor)
            anchor.pop("extra", None)  # (an unused field that peft-imsm 0.1.0 wrote into every saved config)
            self.anchor = AnchorConfig(**anchor)
        if self.anchor is not None and not isinstance(self.anchor, AnchorConfig):
            raise TypeError(f"anchor must be an AnchorConfig, a dict or None, got {type(self.anchor).__name__}.")
        if self.gate_mode == "route" and self.anchor is None:
            raise ValueError(
                "gate_mode='route' learns which prompts are general from the anchors, but anchor is None. Pass "
                "anchor=AnchorConfig.from_tokenizer(tokenizer) (or another AnchorConfig), or use gate_mode='query'."
            )
        if self.anchor is not None and self.anchor.route_weight is None:
            # A copy: the same AnchorConfig may serve configs of other gate modes.
            route_weight = 1.0 if self.gate_mode == "route" else 0.0
            self.anchor = dataclasses.replace(self.anchor, route_weight=route_weight)
        if self.anchor is not None and self.anchor.batch_size is None:
            batch_size = ROUTE_ANCHOR_BATCH_SIZE if self.gate_mode == "route" else ANCHOR_BATCH_SIZE
            self.anchor = dataclasses.replace(self.anchor, batch_size=batch_size)
        if self.anchor is not None and self.anchor.route_weight > 0 and self.gate_mode == "fixed":
            raise ValueError(
                f"anchor route_weight={self.anchor.route_weight!r} trains the gate to route, but gate_mode='fixed' "
                "has no gate to train. Use gate_mode='route' (or 'query', 'token') with routing, or route_weight=0."
            )
        if self.route_threshold == "auto":
            self.route_threshold = ROUTE_THRESHOLD if self.gate_mode == "route" else None
        if self.route_threshold is not None:
            if self.gate_mode != "route":
                raise ValueError(
                    f"route_threshold={self.route_threshold!r} picks one view per sequence from the route gate's "
                    f"router, but gate_mode={self.gate_mode!r} has none. Use gate_mode='route', or leave "
                    "route_threshold unset."
                )
            if not is_finite_number(self.route_threshold) or not 0.0 < self.route_threshold < 1.0:
                raise ValueError(
                    f"route_threshold must be None (the soft mix) or a number strictly between 0 and 1 (0.5: the "
                    f"view with the larger weight), got {self.route_threshold!r}."
                )
            self.route_threshold = float(self.route_threshold)
        if self.gate_mode == "route" and self.anchor.route_weight == 0:
            raise ValueError(
                "gate_mode='route' learns from the routing term, but anchor route_weight=0 turns it off. Leave "
                "route_weight unset (None: 1) or give a weight > 0."
            )

    @staticmethod
    def _build_adapter_config(adapter_config: PeftConfig | dict | None) -> PeftConfig:
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

        if adapter_config is None:
            raise ValueError(
                "IMSMConfig needs the config of the adapter it wraps, e.g. "
                "IMSMConfig(adapter_config=LoraConfig(r=16, target_modules='all-linear'))."
            )
        if isinstance(adapter_config, dict):
            data = dict(adapter_config)
            peft_type = data.get("peft_type")
            if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
                raise ValueError(f"The saved adapter_config has an unknown peft_type {peft_type!r}.")
            adapter_config = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type].from_peft_type(**data)
        if not isinstance(adapter_config, PeftConfig):
            raise TypeError(
                f"adapter_config must be a peft config such as LoraConfig, got {type(adapter_config).__name__}."
            )
        peft_type = str(getattr(adapter_config.peft_type, "value", adapter_config.peft_type))
        if adapter_config.is_prompt_learning:
            raise ValueError(
                f"IMSM cannot wrap the prompt-learning method {peft_type}: it needs an adapter that changes the "
                "model's weights (LoRA, DoRA, (IA)3, AdaLoRA, LoHa, LoKr, VeRA, ...), so that turning it off gives the "
                "frozen view. Use e.g. adapter_config=LoraConfig(...)."
            )
        if peft_type in _UNSUPPORTED_ADAPTERS or adapter_config.peft_type not in PEFT_TYPE_TO_TUNER_MAPPING:
            raise ValueError(
                f"IMSM cannot wrap the peft method {peft_type}. Wrap a weight adapter such as LoRA, DoRA, (IA)3, "
                "AdaLoRA, LoHa, LoKr or VeRA."
            )
        if adapter_config.task_type is None:
            adapter_config.task_type = TaskType.CAUSAL_LM
        return adapter_config

    def to_dict(self) -> dict:
        """JSON-ready dict; the wrapped adapter's config is nested under ``adapter_config``."""
        out = {
            f.name: copy.deepcopy(getattr(self, f.name))
            for f in fields(self)
            if f.name not in ("adapter_config", "anchor")
        }
        out["adapter_config"] = _to_jsonable(self.adapter_config.to_dict())
        out["anchor"] = None if self.anchor is None else self.anchor.to_dict()
        return _to_jsonable(out)

    # Attributes that TRL / peft read or set on a peft config: they live on the wrapped adapter's config.
    @property
    def target_modules(self) -> Any:
        return getattr(self.adapter_config, "target_modules", None)

    @target_modules.setter
    def target_modules(self, value: Any) -> None:
        self.adapter_config.target_modules = value

    @property
    def modules_to_save(self) -> Any:
        return getattr(self.adapter_config, "modules_to_save", None)

    @modules_to_save.setter
    def modules_to_save(self, value: Any) -> None:
        self.adapter_config.modules_to_save = value

    @property
    def trainable_token_indices(self) -> Any:
        return getattr(self.adapter_config, "trainable_token_indices", None)

    @trainable_token_indices.setter
    def trainable_token_indices(self, value: Any) -> None:
        if not hasattr(self.adapter_config, "trainable_token_indices"):
            raise ValueError(
                f"The wrapped {type(self.adapter_config).__name__} does not support trainable_token_indices; "
                "use modules_to_save=['embed_tokens'] instead."
            )
        self.adapter_config.trainable_token_indices = value
