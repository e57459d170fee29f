"""The IMSM tuner: one model, two views (wrapped adapter off / on), interwoven by a gate before the output head.

Where things happen:

* ``IMSMModel.__init__`` wraps the user's adapter (LoRA, DoRA, (IA)3, AdaLoRA, ...) by building peft's own tuner
  for it on the same model, and adds one :class:`~peft_imsm.gate.IMSMGate`.
* The dual pass lives in two hooks on the model's backbone (the module whose output feeds the output head, e.g.
  ``LlamaModel``), so it runs the same way for ``forward``, the HF ``Trainer``, TRL, and ``generate()``:

  1. ``_backbone_pre_hook`` runs the FROZEN view: the backbone again, under ``torch.no_grad()`` with every adapter
     layer switched off, on its own KV cache; it also finds the query tokens.
  2. The backbone then runs as usual: the ADAPTED view, with autograd.
  3. ``_backbone_post_hook`` computes the gate from both views' final hidden states and the query summaries and
     replaces the backbone's ``last_hidden_state`` with the interwoven state. The model's own head, logit
     post-processing (soft-capping, scaling) and loss function then run on it, once.

  Without autograd (generation, evaluation) and with plain LoRA, steps 1 and 2 are one pass instead: the pre-hook
  doubles the batch (rows ``[frozen; adapted]``), ``_zero_frozen_rows`` (a hook on every ``lora_A``) cancels the
  LoRA update on the frozen rows, and the post-hook splits the two halves; see ``_can_stack``.

* Two KV caches: see :mod:`peft_imsm.cache`. The query rule: see :mod:`peft_imsm.query`.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.lora import LoraLayer, LoraModel, ParamWrapper
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from .anchors import AnchorConfig, AnchorSet, anchor_kl, sample_self_anchors
from .cache import as_imsm_cache, is_imsm_cache
from .config import IMSMConfig
from .gate import IMSMGate
from .query import QueryIndex, build_query_index, per_token, query_summary

# Backbone inputs with a batch dimension, doubled when both views run as one batch.
_BATCHED_KWARGS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "token_type_ids")
# Keyword arguments of a causal LM's forward that belong to its head or loss, not to the backbone.
_HEAD_ONLY_KWARGS = ("labels", "logits_to_keep", "num_items_in_batch", "return_dict")


@dataclass
class _ForwardState:
    """What the pre-hook hands to the post-hook within one forward pass."""

    labels: torch.Tensor | None = None  # [batch, seq] set by IMSMModel.forward
    prompt_length: int | None = None  # set by IMSMModel.generate
    in_frozen_view: bool = False
    h_base: torch.Tensor | None = None  # [batch, seq, d]
    index: QueryIndex | None = None
    cache: Cache | None = None
    gate_log: list[torch.Tensor] | None = None
    stacked_rows: int | None = None  # rows per view in the doubled batch
    stacked_tokens: int = 0  # rows * seq per view in the doubled batch (layers that flatten the batch)
    given_h_base: torch.Tensor | None = None  # frozen view already computed by the caller (anchor term)
    detach_tuned: bool = False  # anchor term in gate-only mode: no gradient through the adapted view
    interweaved: int = 0  # interwoven forwards since IMSMModel.forward last began (a guard that the hooks run)
    extras: dict[str, Any] = field(default_factory=dict)


class IMSMModel(BaseTuner):
    """IMSM tuner (created by ``get_peft_model`` / ``PeftModel.from_pretrained``; not meant to be built by hand).

    Attributes:
        model: the transformers causal LM, with the wrapped adapter's layers injected.
        imsm_gate: ``ModuleDict`` adapter name -> :class:`IMSMGate`.
        adapter_tuner: peft's tuner of the wrapped adapter (e.g. a ``LoraModel``) on the same ``model``; not a
            registered submodule (its parameters are ``model``'s).
    """

    prefix: str = "imsm_"
    tuner_layer_cls = BaseTunerLayer
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(
        self,
        model: nn.Module,
        config: IMSMConfig | dict[str, IMSMConfig],
        adapter_name: str = "default",
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> None:
        nn.Module.__init__(self)
        imsm_config = config[adapter_name] if isinstance(config, dict) else config
        if not isinstance(imsm_config, IMSMConfig):
            raise TypeError(f"IMSMModel needs an IMSMConfig, got {type(imsm_config).__name__}.")
        backbone = _find_backbone(model)

        adapter_config = imsm_config.adapter_config
        adapter_config.inference_mode = imsm_config.inference_mode
        adapter_config.base_model_name_or_path = imsm_config.base_model_name_or_path
        tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING[adapter_config.peft_type]
        adapter_tuner = tuner_cls(
            model, {adapter_name: adapter_config}, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage
        )

        self.model = model
        self.__dict__["adapter_tuner"] = adapter_tuner  # not a submodule: its parameters are `model`'s
        self.__dict__["_backbone"] = backbone
        self.peft_config: dict[str, IMSMConfig] = {adapter_name: imsm_config}
        self.active_adapter: str | list[str] = adapter_name
        self.targeted_module_names = list(getattr(adapter_tuner, "targeted_module_names", []))
        self.targeted_parameter_names = list(getattr(adapter_tuner, "targeted_parameter_names", []))
        hidden_size = _hidden_size(model)
        gate = IMSMGate(hidden_size, imsm_config.gate_rank, imsm_config.gate_mode, imsm_config.gate_dropout)
        gate.to(_model_device(model))
        gate.requires_grad_(not imsm_config.inference_mode)
        self.imsm_gate = nn.ModuleDict({adapter_name: gate})
        # State the wrapped tuner keeps beside the model (e.g. VeRA's shared vera_A / vera_B projections) is
        # registered here under the same names, so it is saved and loaded where peft's tuner expects it.
        for name, child in adapter_tuner.named_children():
            if name != "model" and name not in self._modules and name not in self.__dict__:
                self._modules[name] = child  # (add_module would see the name through __getattr__)
        model.peft_config = self.peft_config

        self._imsm_enabled = True
        self._gate_dtype_checked = False
        self._state = _ForwardState()
        self._anchors: AnchorSet | None = None
        # Sums of the anchor KL and of the task loss (device tensors, so a training step never waits for the device
        # to read them back), and their count; read by pop_anchor_stats when the Trainer logs.
        self._anchor_stats: list[Any] = [0.0, 0.0, 0]
        self._backbone_params = _bound_parameter_names(backbone)
        self._switchable_layers = [
            m for m in model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))
        ]
        #: Run both views as one doubled batch (rows [frozen; adapted]) when autograd is off (generation,
        #: evaluation) and the wrapped adapter is plain LoRA (see _zero_frozen_rows). Set to False to always run
        #: two passes; results are the same up to float rounding.
        self.stacked_views = True
        self._supports_stacked_views = _supports_stacked_views(adapter_tuner, model)
        self._hooks = [
            backbone.register_forward_pre_hook(self._backbone_pre_hook, with_kwargs=True),
            backbone.register_forward_hook(self._backbone_post_hook, with_kwargs=True),
        ]
        if self._supports_stacked_views:
            self._hooks += [
                lora_A.register_forward_hook(self._zero_frozen_rows)
                for m in model.modules()
                if isinstance(m, LoraLayer)
                for lora_A in m.lora_A.values()
            ]

    # ------------------------------------------------------------------------------------------------ public API
    @property
    def gate(self) -> IMSMGate:
        """The active adapter's gate."""
        return self.imsm_gate[self._active_name]

    @property
    def _active_name(self) -> str:
        return self.active_adapter if isinstance(self.active_adapter, str) else self.active_adapter[0]

    def forward(self, *args: Any, labels: torch.Tensor | None = None, **kwargs: Any):
        """Run the causal LM with IMSM. Same arguments and outputs as the wrapped model's forward.

        ``labels`` (``[batch, seq]``, ``-100`` where unsupervised) also define the query: the tokens before each
        sequence's first supervised token.
        """
        if self.training and not self._gate_dtype_checked:
            self._keep_gate_float32()
        previous = self._state.labels
        self._state.labels = labels
        # Reset, not a running count compared before/after: torch.compile guards on the integers it reads, so a
        # count read on entry recompiled the whole model at every call (tests/test_long_sequences.py, torch.compile).
        self._state.interweaved = 0
        try:
            if labels is not None:
                kwargs["labels"] = labels
            output = self.adapter_tuner(*args, **kwargs)
        finally:
            self._state.labels = previous
        self._check_hooks_ran("forward")
        if self._anchoring_now(output):
            output.loss = output.loss + self._anchor_term(labels, kwargs.get("num_items_in_batch"), output.loss)
        return output

    def generate(self, *args: Any, **kwargs: Any):
        """``generate()`` with both views interwoven at every step, each view on its own KV cache.

        Takes exactly the arguments of transformers' ``generate()``. Prompts must be left-padded.
        """
        input_ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        inputs_embeds = kwargs.get("inputs_embeds")
        attention_mask = kwargs.get("attention_mask")
        prompt = input_ids if input_ids is not None else inputs_embeds
        if self._imsm_enabled and prompt is not None:
            _check_generation_prompt(attention_mask)
        previous = self._state.prompt_length
        self._state.prompt_length = prompt.shape[1] if prompt is not None else None
        self._state.interweaved = 0
        try:
            output = self.model.generate(*args, **kwargs)
        finally:
            self._state.prompt_length = previous
        sequences = output if isinstance(output, torch.Tensor) else getattr(output, "sequences", None)
        generated = sequences is not None and (input_ids is None or sequences.shape[-1] > input_ids.shape[-1])
        if generated:
            self._check_hooks_ran("generate")
        return output

    def _check_hooks_ran(self, what: str) -> None:
        """A model whose output head is not fed by the hooked backbone would silently skip the gate: refuse it."""
        if self._imsm_enabled and self._state.interweaved == 0:
            raise RuntimeError(
                f"IMSM's hooks on {type(self._backbone).__name__} did not run during {what}() of "
                f"{type(self.model).__name__}: this architecture does not feed its output head from the module IMSM "
                "hooked, so the gate would be skipped. Please report the architecture."
            )

    @contextmanager
    def record_gate(self):
        """Context manager collecting, for every forward inside it, the mean gate value of each row.

        Yields a list that receives one ``[batch]`` float32 tensor per forward (mean over the non-padding positions
        of that forward and over the hidden dimensions). Useful to compare how much each kind of prompt leans on
        the frozen view (gate near 1) or on the adapted view (gate near 0).
        """
        log: list[torch.Tensor] = []
        previous = self._state.gate_log
        self._state.gate_log = log
        try:
            yield log
        finally:
            self._state.gate_log = previous

    def _keep_gate_float32(self) -> None:
        """Put the gate's weights back in float32 before the first training step.

        Some trainers cast every trainable parameter to the base model's half dtype after the model was built (TRL's
        SFTTrainer does on quantized models); the gate is meant to train in float32. Done in place on the same
        Parameter objects, before the optimizer has any state for them, and never on sharded (FSDP/DTensor) params.
        """
        self._gate_dtype_checked = True
        for param in self.imsm_gate.parameters():
            if param.dtype != torch.float32 and type(param) is nn.Parameter:
                param.data = param.data.float()

    # ------------------------------------------------------------------------------------------------ anchors
    @property
    def anchor_config(self) -> AnchorConfig | None:
        return self.peft_config[self._active_name].anchor

    def _anchoring_now(self, output: Any) -> bool:
        config = self.anchor_config
        return (
            config is not None
            and self._imsm_enabled
            and self.training
            and torch.is_grad_enabled()
            and getattr(output, "loss", None) is not None
        )

    def _anchor_set(self) -> AnchorSet:
        if self._anchors is None:
            config = self.anchor_config
            if config is None:
                raise ValueError("This IMSM model has no anchor section (IMSMConfig(anchor=AnchorConfig(...))).")
            if config.source == "data":
                raise ValueError(
                    "IMSMConfig.anchor.source is 'data' but no anchor texts were given: call "
                    "peft_imsm.set_anchor_data(model, texts_or_dataset, tokenizer) before training."
                )
            with self._frozen_view():
                self._anchors = sample_self_anchors(self.model, config, _model_device(self.model))
        return self._anchors

    def _anchor_term(
        self, labels: torch.Tensor | None, num_items_in_batch: Any, task_loss: torch.Tensor
    ) -> torch.Tensor:
        """``weight * KL(p_frozen || p_imsm)`` on the next anchor batch, scaled for gradient accumulation.

        With ``num_items_in_batch`` (the Trainer's token-normalised loss across accumulated micro-batches), the term
        is weighted by this micro-batch's share of the supervised tokens, so the accumulated total carries it once.
        """
        config = self.anchor_config
        ids, mask = self._anchor_set().next_batch(config.batch_size, _model_device(self.model))
        # The frozen view's logits (the KL target) and its final hidden states, which the IMSM pass below reuses
        # instead of running the frozen view a second time.
        captured: list[torch.Tensor] = []
        capture = self._backbone.register_forward_hook(lambda m, a, out: captured.append(_last_hidden_state(out)))
        try:
            with torch.no_grad(), self._frozen_view():
                frozen_logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        finally:
            capture.remove()
        self._state.given_h_base = captured[-1] if captured else None
        self._state.detach_tuned = not config.train_adapter
        try:
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        finally:
            self._state.detach_tuned = False
            self._state.given_h_base = None
        kl = anchor_kl(frozen_logits, logits, mask)
        share = 1.0
        if num_items_in_batch is not None and labels is not None:
            supervised = (labels[..., 1:] != -100).sum()
            share = supervised.to(kl.device).float() / torch.as_tensor(num_items_in_batch, device=kl.device).float()
        sum_dtype = torch.float32 if kl.device.type == "mps" else torch.float64  # (MPS has no float64)
        self._anchor_stats[0] = self._anchor_stats[0] + kl.detach().to(sum_dtype)
        self._anchor_stats[1] = self._anchor_stats[1] + task_loss.detach().to(sum_dtype)
        self._anchor_stats[2] += 1
        return config.weight * kl * share

    def pop_anchor_stats(self) -> dict[str, float]:
        """Mean anchor KL and task loss over the training forwards since the last call (for logging)."""
        total_kl, total_task, count = self._anchor_stats
        self._anchor_stats = [0.0, 0.0, 0]
        if not count:
            return {}
        return {"anchor_kl": float(total_kl) / count, "task_loss": float(total_task) / count}

    # ------------------------------------------------------------------------------------------- the dual pass
    def _backbone_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = self._state
        state.stacked_rows = None
        if state.in_frozen_view or not self._imsm_enabled:
            return None
        kwargs = dict(kwargs)
        if args:
            kwargs.update(self._args_to_kwargs(module, args))
            args = ()
        cache_key = "past_key_values" if "past_key_values" in kwargs else "cache"
        cache = kwargs.get(cache_key)
        first = kwargs.get("input_ids")
        if first is None:
            first = kwargs.get("inputs_embeds")
        batch_size, seq_len, device = first.shape[0], first.shape[1], first.device
        index = None
        if not (is_imsm_cache(cache) and cache.imsm_has_query):
            index = build_query_index(
                batch_size,
                seq_len,
                device,
                attention_mask=kwargs.get("attention_mask"),
                labels=self._matching_labels(batch_size, seq_len),
                position_ids=kwargs.get("position_ids"),
                prompt_length=state.prompt_length,
            )
        stacked = self._can_stack(kwargs, cache, index)
        if cache is None:
            use_cache = kwargs.get("use_cache")
            if use_cache is None:
                use_cache = getattr(module.config, "use_cache", False)
            if use_cache and not module.training:
                cache = DynamicCache(config=module.config)
            else:
                kwargs["use_cache"] = False
        if cache is not None:
            if index is not None and not index.one_per_row:
                raise ValueError(
                    "IMSM cannot keep a KV cache for packed (padding-free) sequences; pass use_cache=False."
                )
            cache = as_imsm_cache(cache, stacked=stacked)
            stacked = cache.imsm_stacked
            kwargs[cache_key] = cache

        state.cache = cache
        state.index = index

        if stacked:
            # Both views in ONE pass: rows [frozen; adapted], the LoRA update zeroed on the frozen rows (see
            # _zero_frozen_rows). Only without autograd (generation / evaluation).
            if cache is not None:
                cache.imsm_half_rows = batch_size
            for key in _BATCHED_KWARGS:
                value = kwargs.get(key)
                if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch_size:
                    kwargs[key] = torch.cat([value, value])
            state.stacked_rows = batch_size
            state.stacked_tokens = batch_size * seq_len
            return args, kwargs

        state.stacked_rows = None
        given, state.given_h_base = state.given_h_base, None
        if given is not None and cache is None and given.shape[:2] == (batch_size, seq_len):
            state.h_base = given  # the caller already ran the frozen view on these exact inputs (anchor term)
            return args, kwargs
        frozen_kwargs = {k: v for k, v in kwargs.items() if k not in _HEAD_ONLY_KWARGS}
        if cache is not None:
            frozen_kwargs[cache_key] = cache.imsm_frozen
        with torch.no_grad(), self._frozen_view():
            out = module(**frozen_kwargs)
        state.h_base = _last_hidden_state(out)
        return args, kwargs

    def _backbone_post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        state = self._state
        if state.in_frozen_view or not self._imsm_enabled:
            return None
        hidden = _last_hidden_state(output)
        if state.detach_tuned:
            hidden = hidden.detach()
        if state.stacked_rows is not None:
            h_base, h_tuned = hidden[: state.stacked_rows], hidden[state.stacked_rows :]
            state.stacked_rows = None
        elif state.h_base is not None:
            h_base, h_tuned = state.h_base, hidden
            state.h_base = None
        else:
            return None
        gate = self.gate
        q_base = q_tuned = None
        cache = state.cache
        if gate.mode == "query":
            if state.index is None:
                q_base = _expand_rows(cache.imsm_query_base, h_tuned)
                q_tuned = _expand_rows(cache.imsm_query_tuned, h_tuned)
            else:
                summary_base = query_summary(h_base, state.index)
                summary_tuned = query_summary(h_tuned, state.index)
                q_base = per_token(summary_base, state.index)
                q_tuned = per_token(summary_tuned, state.index)
                if cache is not None:
                    cache.imsm_query_base = summary_base.detach()
                    cache.imsm_query_tuned = summary_tuned.detach()
        g = gate(h_base, h_tuned, q_base, q_tuned)
        if state.gate_log is not None:
            state.gate_log.append(_row_means(g.detach(), kwargs.get("attention_mask"), h_tuned.shape[1]))
        state.index = None
        state.cache = None
        state.interweaved += 1
        mixed = IMSMGate.interweave(h_base, h_tuned, g)
        return _replace_last_hidden_state(output, mixed)

    def _can_stack(self, kwargs: dict, cache: Cache | None, index: QueryIndex | None) -> bool:
        """Whether both views can run as one doubled batch (see :attr:`stacked_views`)."""
        if not (self.stacked_views and self._supports_stacked_views) or torch.is_grad_enabled():
            return False
        if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
            return False
        if is_imsm_cache(cache):
            return cache.imsm_stacked  # decided at prefill
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            return False
        positions = kwargs.get("position_ids")
        if positions is not None and (not isinstance(positions, torch.Tensor) or positions.dim() != 2):
            return False  # e.g. multimodal rotary positions [3, batch, seq]: not batch-first, cannot be doubled
        if index is not None and not index.one_per_row:
            return False  # packed sequences: doubling the batch would break the padding-free attention
        if cache is None:
            return True
        return type(cache) is DynamicCache and cache.get_seq_length() == 0

    def _zero_frozen_rows(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """Forward hook on each ``lora_A``: while both views run stacked, zero the frozen rows' LoRA activations.

        LoRA adds ``lora_B(lora_A(x)) * scaling`` to the base layer's output; with ``lora_A``'s output zeroed on the
        frozen rows (and no LoRA bias, see ``_supports_stacked_views``) that update is exactly 0 there, so those rows
        get the base layer's output bit for bit while the adapted rows get plain LoRA. peft's own mixed-adapter
        batches (``adapter_names=``) give the same result but index the batch with Python lists in every layer,
        which made each decode step of ``benchmarks/generation_speed.py`` about 1 ms slower (float32, batch 1).

        The frozen rows are the first half of dim 0, also for layers that see the batch flattened to
        ``[batch * seq, ...]`` (e.g. OPT's MLP). Zeroed in place: stacking only runs without autograd.
        """
        state = self._state
        if state.stacked_rows is None:
            return
        rows = output.shape[0]
        if rows != 2 * state.stacked_rows and rows != 2 * state.stacked_tokens:
            raise RuntimeError(
                f"IMSM stacked views: a LoRA layer saw {rows} rows where the doubled batch has {2 * state.stacked_rows}"
                f" rows ({2 * state.stacked_tokens} tokens), so its frozen rows cannot be told apart (tokens routed "
                "to experts?). Set `model.base_model.stacked_views = False` to run the two views as separate passes."
            )
        output[: rows // 2].zero_()

    @contextmanager
    def _frozen_view(self):
        """Every adapter layer (and modules_to_save / trainable-token wrapper) off, without touching requires_grad."""
        layers = self._switchable_layers
        saved = [m._disable_adapters for m in layers]
        self._state.in_frozen_view = True
        try:
            for m in layers:
                m._disable_adapters = True
            yield
        finally:
            for m, s in zip(layers, saved):
                m._disable_adapters = s
            self._state.in_frozen_view = False

    def _matching_labels(self, batch_size: int, seq_len: int) -> torch.Tensor | None:
        labels = self._state.labels
        if labels is None or labels.dim() != 2 or labels.shape != (batch_size, seq_len):
            return None
        return labels

    def _args_to_kwargs(self, module: nn.Module, args: tuple) -> dict:
        names = self._backbone_params
        if len(args) > len(names):
            raise TypeError(f"Too many positional arguments for {type(module).__name__}.forward.")
        return dict(zip(names, args))

    # ------------------------------------------------------------------------- peft tuner interface
    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:  # adapters are injected by adapter_tuner
        raise NotImplementedError

    @staticmethod
    def _check_target_module_exists(peft_config, key):
        return False

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        pass

    def inject_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(
            "An IMSM model holds exactly one IMSM adapter (one wrapped adapter and its gate); adding a second adapter "
            "is not supported. Create a new model with get_peft_model for another IMSM adapter."
        )

    def enable_adapter_layers(self) -> None:
        """Turn IMSM back on (both the wrapped adapter and the gate)."""
        self.adapter_tuner.enable_adapter_layers()
        self._imsm_enabled = True

    def disable_adapter_layers(self) -> None:
        """Turn IMSM off: the model is then the plain base model (used by ``PeftModel.disable_adapter()``)."""
        self.adapter_tuner.disable_adapter_layers()
        self._imsm_enabled = False

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.imsm_gate]
        if unknown or len(names) != 1:
            raise ValueError(f"Unknown or several IMSM adapters {names}; this model has {list(self.imsm_gate)}.")
        self.adapter_tuner.set_adapter(adapter_name, inference_mode=inference_mode)
        self.imsm_gate[names[0]].requires_grad_(not inference_mode)
        self.active_adapter = names[0]

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        self.adapter_tuner._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(_MERGE_MESSAGE)

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise ValueError(_MERGE_MESSAGE)

    def unload(self) -> nn.Module:
        """Remove IMSM (gate and wrapped adapter) and return the untouched base model."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        return self.adapter_tuner.unload()

    def delete_adapter(self, adapter_name: str) -> None:
        raise ValueError("An IMSM model holds a single adapter; use `unload()` to get the base model back.")

    # ------------------------------------------------------------------------- save / load (peft's hooks)
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        inner_cls = PEFT_TYPE_TO_TUNER_MAPPING[config.adapter_config.peft_type]
        to_return = inner_cls._get_adapter_state_dict(
            model=model,
            config=config.adapter_config,
            adapter_name=adapter_name,
            state_dict=state_dict,
            unwanted_adapter_names=unwanted_adapter_names,
        )
        gate_prefix = f"imsm_gate.{adapter_name}."
        to_return.update({k: v for k, v in state_dict.items() if gate_prefix in k})
        return to_return

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        gate_prefix = f"imsm_gate.{adapter_name}."
        if gate_prefix in key:
            return key.replace(gate_prefix, "imsm_gate.")
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        model_state = model.state_dict()
        remapped: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            if "imsm_gate." in key and f"imsm_gate.{adapter_name}." not in key:
                key = key.replace("imsm_gate.", f"imsm_gate.{adapter_name}.")
                expected = model_state.get(key)
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
        return inner_cls._remap_adapter_state_dict_for_load(
            model=model, config=config.adapter_config, adapter_name=adapter_name, state_dict=remapped
        )

    def __getattr__(self, name: str) -> Any:
        """Forward missing attributes to the wrapped adapter's tuner (and through it to the model)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "adapter_tuner", "imsm_gate"):
                raise
            return getattr(self.__dict__["adapter_tuner"], name)


_MERGE_MESSAGE = (
    "IMSM cannot be merged into the base weights: it needs both the frozen view (adapter off) and the adapted view "
    "(adapter on) at run time, and mixes their hidden states with a gate at every token. Keep the model unmerged "
    "(save it with `save_pretrained`, load it with `PeftModel.from_pretrained`), or call `unload()` to drop IMSM."
)


def _find_backbone(model: nn.Module) -> nn.Module:
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


def _hidden_size(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[1])
    return int(model.config.get_text_config().hidden_size)


def _model_device(model: nn.Module) -> torch.device:
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    return weight.device if weight is not None else next(model.parameters()).device


def _bound_parameter_names(module: nn.Module) -> list[str]:
    params = inspect.signature(module.forward).parameters
    return [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _last_hidden_state(output: Any) -> torch.Tensor:
    if isinstance(output, tuple):
        return output[0]
    return output.last_hidden_state


def _replace_last_hidden_state(output: Any, hidden: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    output.last_hidden_state = hidden
    return output


def _supports_stacked_views(adapter_tuner: nn.Module, model: nn.Module) -> bool:
    """Whether both views can share one doubled batch (see ``IMSMModel._zero_frozen_rows``).

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


def _expand_rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[batch, d]`` -> ``[batch, seq, d]`` shaped like ``like``."""
    return rows[:, None, :].expand(like.shape[0], like.shape[1], rows.shape[-1])


def _row_means(gate: torch.Tensor, attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor:
    per_pos = gate.mean(dim=-1)  # [batch, seq]
    if attention_mask is None or attention_mask.dim() != 2:
        return per_pos.mean(dim=1).cpu()
    mask = attention_mask[: per_pos.shape[0], -seq_len:].to(per_pos.dtype)  # (stacked views: both halves equal)
    return ((per_pos * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).cpu()


def _check_generation_prompt(attention_mask: torch.Tensor | None) -> None:
    if attention_mask is None or attention_mask.dim() != 2:
        return
    mask = attention_mask.bool()
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"Row(s) {empty} of the batch have an empty prompt (attention_mask is all 0). IMSM summarises the prompt "
            "to gate every generated token, so each row needs at least one prompt token."
        )
    right_padded = (~mask[:, -1]).nonzero().flatten().tolist()
    if right_padded:
        raise ValueError(
            f"Row(s) {right_padded} of the batch are right-padded (their last attention_mask entry is 0). Decoder-only "
            "generation needs left padding: set `tokenizer.padding_side = 'left'` before tokenizing the prompts."
        )
