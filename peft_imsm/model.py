"""``IMSMModel``, the peft tuner of IMSM: wiring, public API, the anchor term, peft's tuner interface, save/load.

Where things are:

* ``IMSMModel.__init__`` wraps the user's adapter (LoRA, DoRA, (IA)3, AdaLoRA, ...) by building peft's own tuner for
  it on the same model, adds one :class:`~peft_imsm.gate.IMSMGate`, and installs the dual pass
  (:class:`~peft_imsm.dual_pass.DualPass`: the backbone hooks, the frozen view, stacking; read that module to change
  how the two views run).
* ``forward`` / ``generate`` open one :class:`~peft_imsm.dual_pass.CallContext` per call (labels, prompt length,
  what to record) and run the wrapped model; nothing of a call is stored on this object, so one model can serve
  several threads at once.
* The anchor term (``_anchor_term``): the frozen view's KL target on the next anchor batch; anchors and the KL are
  functions of :mod:`peft_imsm.anchors`.
* peft's tuner interface: what IMSM supports of ``BaseTuner`` and of the wrapped tuner is defined here, method by
  method; everything else of the wrapped tuner is refused with a clear error (see ``__getattr__``).
* Save/load: peft's ``_get_adapter_state_dict`` / ``_remap_adapter_state_dict_for_load`` hooks; loading warns about
  missing and unused keys.

A direct call of the inner model (``peft_model.get_base_model()(...)`` or its backbone) is the ADAPTED view alone:
the base model with the adapter injected and no gate, as in peft.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper, TrainableTokensWrapper
from torch import nn

from .anchors import (
    AnchorConfig,
    AnchorSet,
    anchor_kl,
    check_anchor_length,
    sample_self_anchors,
    tokenize_anchor_data,
)
from .config import IMSMConfig
from .dual_pass import CallContext, DualPass, frozen_view, installed_dual_pass
from .gate import IMSMGate
from .query import check_attention_mask

# Key under which the number of anchor batches drawn so far is saved with the adapter (exact resumes).
_ANCHOR_DRAWS_KEY = "base_model.imsm_anchor_draws"
# Key of the number of training forwards that had the anchor term due (saved when AnchorConfig.every > 1).
_TRAINING_FORWARDS_KEY = "base_model.imsm_training_forwards"
# Methods of the wrapped tuner that IMSM passes on unchanged.
_PASSED_TO_ADAPTER_TUNER = frozenset({"update_and_allocate"})  # AdaLoRA's rank-budget step

_GATE_RECORDERS: ContextVar[tuple] = ContextVar("imsm_gate_recorders", default=())
_STACKING_ALLOWED: ContextVar[bool] = ContextVar("imsm_stacking_allowed", default=True)


class IMSMModel(BaseTuner):
    """IMSM tuner (created by ``get_peft_model`` / ``PeftModel.from_pretrained``; not meant to be built by hand).

    Attributes:
        model: the transformers causal LM, with the wrapped adapter's layers injected.
        imsm_gate: ``ModuleDict`` adapter name -> :class:`IMSMGate`.
        adapter_tuner: peft's tuner of the wrapped adapter (e.g. a ``LoraModel``) on the same ``model``; not a
            registered submodule (its parameters are ``model``'s).
        dual_pass: the :class:`~peft_imsm.dual_pass.DualPass` that runs both views.
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
        _refuse_nested_imsm(model)
        _supersede_earlier_imsm(model)
        head_tied = _head_tied_to_input_embeddings(model)

        adapter_config = imsm_config.adapter_config
        adapter_config.inference_mode = imsm_config.inference_mode
        adapter_config.base_model_name_or_path = imsm_config.base_model_name_or_path
        tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING[adapter_config.peft_type]
        adapter_tuner = tuner_cls(
            model, {adapter_name: adapter_config}, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage
        )
        reason = _trained_head_reason(model, head_tied)
        if reason is not None:
            adapter_tuner.unload()  # (the user's model goes back untouched)
            raise ValueError(
                f"IMSM cannot train the output head: {reason}. IMSM's gate mixes the two views' final hidden states "
                "before the single output head, so a trained head would also change the frozen view, which then is no "
                "longer the base model. Leave the output head out of target_modules / modules_to_save / "
                "trainable_token_indices (with tied embeddings, train the input embeddings with LoRA instead: "
                "target_modules=[..., 'embed_tokens'], without ensure_weight_tying)."
            )

        self.model = model
        self.__dict__["adapter_tuner"] = adapter_tuner  # not a submodule: its parameters are `model`'s
        self.peft_config: dict[str, IMSMConfig] = {adapter_name: imsm_config}
        self.active_adapter: str | list[str] = adapter_name
        self.targeted_module_names = list(getattr(adapter_tuner, "targeted_module_names", []))
        self.targeted_parameter_names = list(getattr(adapter_tuner, "targeted_parameter_names", []))
        # The wrapped adapter's own parameters (trainable right after injection), frozen with freeze_adapter.
        self._adapter_param_names = [n for n, p in model.named_parameters() if p.requires_grad]
        hidden_size = _hidden_size(model)
        gate = IMSMGate(hidden_size, imsm_config.gate_rank, imsm_config.gate_mode, imsm_config.gate_dropout,
                        scalar=imsm_config.gate_scalar)  # fmt: skip
        gate.to(_model_device(model))
        gate.requires_grad_(not imsm_config.inference_mode)
        self.imsm_gate = nn.ModuleDict({adapter_name: gate})
        # State the wrapped tuner keeps beside the model (e.g. VeRA's shared vera_A / vera_B projections) is
        # registered here under the same names, so it is saved and loaded where peft's tuner expects it.
        for name, child in adapter_tuner.named_children():
            if name != "model" and name not in self._modules and name not in self.__dict__:
                self._modules[name] = child  # (add_module would see the name through __getattr__)
        model.peft_config = self.peft_config
        self._apply_freeze_adapter()

        self.__dict__["dual_pass"] = DualPass(model, adapter_tuner, self._active_gate)
        self._unloaded = False
        self._gate_dtype_checked = False
        self._anchors: AnchorSet | None = None
        #: Anchor batches drawn so far (saved with the adapter, so resumed runs draw the same batches).
        self.anchor_draws = 0
        #: Training forwards with the anchor term due so far, whether ``AnchorConfig.every`` ran it or skipped it
        #: (saved with the adapter when ``every > 1``, so resumed runs anchor the same forwards).
        self.training_forwards = 0
        # Sums for the Trainer's logs (device tensors, so a training step never waits for the device to read them
        # back) and their counts; read and reset by pop_training_stats.
        self._stats: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------ public API
    @property
    def gate(self) -> IMSMGate:
        """The active adapter's gate."""
        return self.imsm_gate[self._active_name]

    def _active_gate(self) -> IMSMGate:
        return self.gate

    @property
    def _active_name(self) -> str:
        return self.active_adapter if isinstance(self.active_adapter, str) else self.active_adapter[0]

    @property
    def stacked_views(self) -> bool:
        """Run both views as one doubled batch (rows ``[frozen; adapted]``) when autograd is off (generation,
        evaluation) and the wrapped adapter is plain LoRA. Set to False to always run two passes; results are the
        same up to float rounding."""
        return self.dual_pass.stacked_views

    @stacked_views.setter
    def stacked_views(self, value: bool) -> None:
        self.dual_pass.stacked_views = bool(value)

    @property
    def supports_stacked_views(self) -> bool:
        """Whether the wrapped adapter allows both views in one doubled batch (plain LoRA)."""
        return self.dual_pass.supports_stacking

    def forward(self, *args: Any, labels: torch.Tensor | None = None, **kwargs: Any):
        """Run the causal LM with IMSM. Same arguments and outputs as the wrapped model's forward.

        ``labels`` (``[batch, seq]``, ``-100`` where unsupervised) also define the query: the tokens before each
        sequence's first supervised token.
        """
        self._check_usable()
        if self.training and not self._gate_dtype_checked:
            self._keep_gate_float32()
        training = self.training and torch.is_grad_enabled()
        on_gate = functools.partial(self._observe_gate, labels=labels if training else None)
        with self.dual_pass.call(labels=labels, stacking=_STACKING_ALLOWED.get(), on_gate=on_gate) as call:
            if labels is not None:
                kwargs["labels"] = labels
            output = self.adapter_tuner(*args, **kwargs)
        self._check_hooks_ran(call, "forward")
        if self._anchoring_now(output):
            forward_number, self.training_forwards = self.training_forwards, self.training_forwards + 1
            if forward_number % self.anchor_config.every == 0:
                output.loss = output.loss + self._anchor_term(labels, kwargs.get("num_items_in_batch"), output.loss)
        return output

    def generate(self, *args: Any, **kwargs: Any):
        """``generate()`` with both views interwoven at every step, each view on its own KV cache.

        Takes exactly the arguments of transformers' ``generate()``. Prompts must be left-padded.
        """
        self._check_usable()
        input_ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        inputs_embeds = kwargs.get("inputs_embeds")
        attention_mask = kwargs.get("attention_mask")
        prompt = input_ids if input_ids is not None else inputs_embeds
        if self.dual_pass.enabled and prompt is not None:
            # (generate() takes the whole sequence, cached tokens included: the mask covers exactly the prompt)
            inputs_name = "input_ids" if input_ids is not None else "inputs_embeds"
            check_attention_mask(attention_mask, tuple(prompt.shape), 0, inputs_name)
            _check_generation_prompt(attention_mask)
        prompt_length = prompt.shape[1] if prompt is not None else None
        on_gate = functools.partial(self._observe_gate, labels=None)
        with self.dual_pass.call(prompt_length=prompt_length, stacking=_STACKING_ALLOWED.get(), on_gate=on_gate) as c:
            output = self.model.generate(*args, **kwargs)
        sequences = output if isinstance(output, torch.Tensor) else getattr(output, "sequences", None)
        generated = sequences is not None and (input_ids is None or sequences.shape[-1] > input_ids.shape[-1])
        if generated:
            self._check_hooks_ran(c, "generate")
        return output

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

    def _check_hooks_ran(self, call: CallContext, what: str) -> None:
        """A model whose output head is not fed by the hooked backbone would silently skip the gate: refuse it."""
        if self.dual_pass.enabled and call.interwoven == 0:
            raise RuntimeError(
                f"IMSM's hooks on {type(self.dual_pass.backbone).__name__} did not run during {what}() of "
                f"{type(self.model).__name__}: this architecture does not feed its output head from the module IMSM "
                "hooked, so the gate would be skipped. Please report the architecture."
            )

    @contextmanager
    def record_gate(self, per_token: bool = False) -> Iterator[list[torch.Tensor]]:
        """Context manager collecting the gate of every IMSM forward inside it (in this thread only).

        Yields a list that receives one float32 CPU tensor per forward (per step in ``generate()``): with
        ``per_token=False`` the ``[batch]`` mean gate of each row (over the non-padding positions and the hidden
        dimensions); with ``per_token=True`` the ``[batch, seq]`` gate of each position (mean over the hidden
        dimensions; padding positions included, mask them yourself). The gate is the weight of the frozen view:
        near 1 the model leans on what it knew, near 0 on the adapter.
        """
        log: list[torch.Tensor] = []
        token = _GATE_RECORDERS.set((*_GATE_RECORDERS.get(), (log, per_token)))
        try:
            yield log
        finally:
            _GATE_RECORDERS.reset(token)

    def _observe_gate(
        self,
        gate: torch.Tensor,
        attention_mask: torch.Tensor | None,
        call: CallContext,
        labels: torch.Tensor | None = None,
        stat: str = "gate",
    ) -> None:
        """After each interwoven pass: feed :meth:`record_gate` and, in training, the logged mean gate.

        ``labels`` (training forwards only) select the supervised tokens: the gate at position ``t`` makes the
        logits that predict token ``t + 1``, so position ``t`` counts when ``labels[t + 1] != -100``.
        """
        recorders = _GATE_RECORDERS.get()
        if not recorders and labels is None and stat != "anchor_gate":
            return  # (generation and evaluation outside record_gate: nothing to compute at this decode step)
        per_position = gate.mean(dim=-1)  # [batch, seq]
        for log, per_token in recorders:
            log.append(per_position.float().cpu() if per_token else _row_means(per_position, attention_mask))
        weights = None
        if labels is not None and labels.shape == per_position.shape:
            weights = torch.zeros_like(per_position)
            weights[:, :-1] = (labels[:, 1:] != -100).to(per_position.dtype)
        elif stat == "anchor_gate" and attention_mask is not None:
            weights = attention_mask.to(per_position.dtype)
        if weights is not None:
            self._add_stat(f"{stat}_sum", (per_position * weights).sum())
            self._add_stat(f"{stat}_count", weights.sum())

    def _add_stat(self, name: str, value: torch.Tensor) -> None:
        sum_dtype = torch.float32 if value.device.type == "mps" else torch.float64  # (MPS has no float64)
        self._stats[name] = self._stats.get(name, 0.0) + value.detach().to(sum_dtype)

    def pop_training_stats(self) -> dict[str, float]:
        """IMSM's figures since the last call, for the Trainer's logs (see ``IMSMLogCallback``).

        ``gate_mean``: mean gate (weight of the frozen view) on the supervised tokens of the training forwards;
        ``anchor_gate_mean``: the same on the anchors; ``anchor_kl`` / ``task_loss``: mean anchor KL (before
        weighting) and task loss of the anchored training forwards. Keys without data are left out.
        """
        stats, self._stats = self._stats, {}
        out: dict[str, float] = {}
        for name in ("gate", "anchor_gate"):
            count = float(stats.get(f"{name}_count", 0.0))
            if count > 0:
                out[f"{name}_mean"] = float(stats[f"{name}_sum"]) / count
        anchored = int(stats.get("anchor_forwards", 0))
        if anchored:
            out["anchor_kl"] = float(stats["anchor_kl"]) / anchored
            out["task_loss"] = float(stats["task_loss"]) / anchored
        return out

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

    def train(self, mode: bool = True) -> IMSMModel:
        """Set training mode here, on the model, and on the wrapped tuner (which is not a submodule)."""
        super().train(mode)
        self.adapter_tuner.training = mode
        return self

    # ------------------------------------------------------------------------------------------------ anchors
    @property
    def anchor_config(self) -> AnchorConfig | None:
        return self.peft_config[self._active_name].anchor

    def _anchoring_now(self, output: Any) -> bool:
        return (
            self.anchor_config is not None
            and self.dual_pass.enabled
            and self.training
            and torch.is_grad_enabled()
            and getattr(output, "loss", None) is not None
        )

    def _position_limit(self) -> int | None:
        config = self.model.config.get_text_config()
        for name in ("n_positions", "max_position_embeddings"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def set_anchors(self, anchors: AnchorSet) -> None:
        """Use these anchors (checked against the model's position limit) from the next training forward on."""
        check_anchor_length(anchors.length, self._position_limit(), self.anchor_config)
        self._anchors = anchors

    def anchor_set(self) -> AnchorSet:
        """The anchors, sampled from the frozen view on first use when ``source="self"``."""
        if self._anchors is None:
            config = self.anchor_config
            if config is None:
                raise ValueError("This IMSM model has no anchor section (IMSMConfig(anchor=AnchorConfig(...))).")
            if config.source == "data":
                raise ValueError(
                    "IMSMConfig.anchor.source is 'data' but no anchor texts were given: call "
                    "peft_imsm.set_anchor_data(model, texts_or_dataset, tokenizer) before training."
                )
            start = len(config.start_tokens) if config.start_tokens else (
                config.start_length if config.start == "random" else 1
            )  # fmt: skip
            check_anchor_length(start + config.sample_length, self._position_limit(), config)
            with frozen_view():
                self.set_anchors(sample_self_anchors(self.model, config, _model_device(self.model)))
        return self._anchors

    def _frozen_anchor_hidden(self, anchors: AnchorSet) -> torch.Tensor:
        """``[num_anchors, length, d]`` the frozen view's final hidden states of every anchor, computed on first use
        (in batches of ``AnchorConfig.batch_size``, as the anchor term batches them) and kept with the anchors: the
        frozen view does not change during training. Computed in eval mode: a KL target kept for the whole run must
        not be one draw of the base model's dropout. Anchors are used at their full padded width, so each row is
        always computed with the same padding."""
        if anchors.frozen_hidden is None:
            device = _model_device(self.model)
            parts = []
            was_training = self.model.training
            self.model.eval()
            try:
                for start in range(0, len(anchors), self.anchor_config.batch_size):
                    stop = start + self.anchor_config.batch_size
                    ids = anchors.input_ids[start:stop].to(device)
                    mask = anchors.attention_mask[start:stop].to(device)
                    with self.dual_pass.call(capture_frozen=[]) as call, torch.no_grad(), frozen_view():
                        self.model(input_ids=ids, attention_mask=mask, use_cache=False)
                    parts.append(call.capture_frozen[-1])
            finally:
                self.model.train(was_training)
            anchors.frozen_hidden = torch.cat(parts)
        return anchors.frozen_hidden

    def _anchor_term(
        self, labels: torch.Tensor | None, num_items_in_batch: Any, task_loss: torch.Tensor
    ) -> torch.Tensor:
        """``weight * every * KL(p_frozen || p_imsm)`` on the next anchor batch, scaled for gradient accumulation.

        With ``num_items_in_batch`` (the Trainer's token-normalised loss across accumulated micro-batches), the term
        is weighted by this micro-batch's share of the supervised tokens, so the accumulated total carries it once.
        The frozen view's final hidden states of the anchors are computed once (:meth:`_frozen_anchor_hidden`); per
        step only the adapted view runs, without autograd in gate-only mode (``train_adapter=False``, or a frozen
        adapter, ``freeze_adapter=True``: only the gate and the frozen head are differentiated).
        """
        config = self.anchor_config
        anchors = self.anchor_set()
        device = _model_device(self.model)
        rows = anchors.rows(self.anchor_draws, config.batch_size)
        self.anchor_draws += 1
        ids, mask = anchors.input_ids[rows].to(device), anchors.attention_mask[rows].to(device)
        # One model pass on rows [anchors; anchors]: the backbone runs the adapted view on the second half, the first
        # half gets the frozen view's cached final hidden states, and the model's own head turns them into the KL
        # target (the frozen logits) next to IMSM's logits.
        h_frozen = self._frozen_anchor_hidden(anchors)[rows].to(device)
        on_gate = functools.partial(self._observe_gate, stat="anchor_gate")
        # Anchors that share a prefix (self anchors from a chat template's user turn) run it once per batch.
        call = self.dual_pass.call(
            given_h_frozen=h_frozen, frozen_rows_first=True, shared_prefix=anchors.prefix_worth_sharing(len(rows)),
            adapted_without_grad=not config.train_adapter or self.peft_config[self._active_name].freeze_adapter,
            on_gate=on_gate,
        )  # fmt: skip
        with call, torch.enable_grad():
            both = self.model(input_ids=torch.cat([ids, ids]), attention_mask=torch.cat([mask, mask]), use_cache=False)
        frozen_logits, logits = both.logits[: len(rows)].detach(), both.logits[len(rows) :]
        kl = anchor_kl(frozen_logits, logits, mask)
        share = 1.0
        if num_items_in_batch is not None and labels is not None:
            supervised = (labels[..., 1:] != -100).sum()
            share = supervised.to(kl.device).float() / torch.as_tensor(num_items_in_batch, device=kl.device).float()
        self._add_stat("anchor_kl", kl)
        self._add_stat("task_loss", task_loss)
        self._stats["anchor_forwards"] = self._stats.get("anchor_forwards", 0) + 1
        return config.weight * config.every * kl * share

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
        token = _STACKING_ALLOWED.set(False) if mixed else None
        try:
            if inner is None:
                yield
            else:
                with inner(*args, **kwargs):
                    yield
        finally:
            if token is not None:
                _STACKING_ALLOWED.reset(token)

    def inject_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(
            "An IMSM model holds exactly one IMSM adapter (one wrapped adapter and its gate); adding a second adapter "
            "is not supported. Create a new model with get_peft_model for another IMSM adapter."
        )

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
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.imsm_gate]
        if unknown or len(names) != 1:
            raise ValueError(f"Unknown or several IMSM adapters {names}; this model has {list(self.imsm_gate)}.")
        self.adapter_tuner.set_adapter(adapter_name, inference_mode=inference_mode)
        self.imsm_gate[names[0]].requires_grad_(not inference_mode)
        self.active_adapter = names[0]
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
        tuner = find_imsm_tuner(model, required=False)
        if tuner is not None:
            tuner._check_usable()  # (a superseded model's weights are the newer model's: saving them would mislabel)
        gate_prefix = f"imsm_gate.{adapter_name}."
        to_return.update({k: v for k, v in state_dict.items() if gate_prefix in k})
        if tuner is not None and config.anchor is not None and tuner.anchor_draws:
            to_return[_ANCHOR_DRAWS_KEY] = torch.tensor(tuner.anchor_draws, dtype=torch.int64)
            if config.anchor.every > 1:
                to_return[_TRAINING_FORWARDS_KEY] = torch.tensor(tuner.training_forwards, dtype=torch.int64)
        return to_return

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        gate_prefix = f"imsm_gate.{adapter_name}."
        if gate_prefix in key:
            return key.replace(gate_prefix, "imsm_gate.")
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict = dict(state_dict)
        draws = state_dict.pop(_ANCHOR_DRAWS_KEY, None)
        forwards = state_dict.pop(_TRAINING_FORWARDS_KEY, None)
        tuner = find_imsm_tuner(model, required=False)
        if draws is not None and tuner is not None:
            tuner.anchor_draws = int(draws)
            # (saved with every == 1, the anchor term ran on every forward: the next forward is due after the draws)
            every = config.anchor.every if config.anchor is not None else 1
            tuner.training_forwards = int(forwards) if forwards is not None else int(draws) * every
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
        remapped = inner_cls._remap_adapter_state_dict_for_load(
            model=model, config=config.adapter_config, adapter_name=adapter_name, state_dict=remapped
        )
        _warn_about_unmatched_keys(model, config, adapter_name, remapped, model_state)
        return remapped

    def __getattr__(self, name: str) -> Any:
        """Attributes of the transformers model (``config``, ``generation_config``, ...), as peft's tuners do.

        The wrapped tuner's own methods are NOT reached this way (they would act on the wrapped adapter alone, e.g.
        add a hidden adapter without a gate): the ones IMSM supports are defined on this class, the rest raise.
        """
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "adapter_tuner", "imsm_gate", "dual_pass") or name.startswith("__"):
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


_MERGE_MESSAGE = (
    "IMSM cannot be merged into the base weights: it needs both the frozen view (adapter off) and the adapted view "
    "(adapter on) at run time, and mixes their hidden states with a gate at every token. Keep the model unmerged "
    "(save it with `save_pretrained`, load it with `PeftModel.from_pretrained`), or call `unload()` to drop IMSM."
)


def find_imsm_tuner(model: Any, required: bool = True) -> IMSMModel | None:
    """The :class:`IMSMModel` inside ``model``: a ``PeftModel``, or one wrapped by DDP / FSDP / DeepSpeed /
    ``torch.compile`` (``.module`` / ``._orig_mod``), or the tuner itself.

    Raises ``TypeError`` when there is none (returns None instead with ``required=False``).
    """
    seen = model
    for _ in range(8):
        if isinstance(model, IMSMModel):
            return model
        if model is None:
            break
        model = (
            getattr(model, "_orig_mod", None)
            or getattr(model, "module", None)
            or model.__dict__.get("_modules", {}).get("base_model")
        )
    if required:
        raise TypeError(f"Expected an IMSM peft model (get_peft_model with an IMSMConfig), got {type(seen).__name__}.")
    return None


def set_anchor_data(model: Any, data: Any, tokenizer: Any, column: str = "text") -> int:
    """Give an IMSM model with ``anchor.source="data"`` its anchor texts. Returns the number of anchors.

    Args:
        model: the ``PeftModel`` (or its ``IMSMModel``).
        data: a list of strings, or a ``datasets.Dataset`` with a text ``column``.
        tokenizer: the model's tokenizer.
    """
    tuner = find_imsm_tuner(model)
    config = tuner.anchor_config
    if config is None:
        raise ValueError("This IMSM model has no anchor section: IMSMConfig(anchor=AnchorConfig(source='data')).")
    tuner.set_anchors(tokenize_anchor_data(data, tokenizer, column, config.max_length, config.seed))
    return len(tuner.anchor_set())


def prepare_anchors(model: Any) -> int:
    """Build the anchors now (self sampling otherwise happens at the first training forward). Returns their count."""
    return len(find_imsm_tuner(model).anchor_set())


def _warn_about_unmatched_keys(
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
            f"values because the saved adapter does not hold them: {_first(missing)}. The saved adapter_model file "
            "does not match its adapter_config.json (wrapped peft_type "
            f"{config.adapter_config.peft_type}, gate_mode {config.gate_mode!r}); save the adapter again from the "
            "trained model, or load it with the config it was saved with.",
            stacklevel=4,
        )
    if unused:
        warnings.warn(
            f"The saved IMSM adapter '{adapter_name}' holds {len(unused)} weight(s) that nothing in this model uses, "
            f"so they were ignored: {_first(unused)}. The adapter_config.json (wrapped peft_type "
            f"{config.adapter_config.peft_type}, gate_mode {config.gate_mode!r}) does not describe the saved weights.",
            stacklevel=4,
        )


def _first(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _refuse_nested_imsm(model: nn.Module) -> None:
    """Refuse to build IMSM on a model that already holds an IMSM model (a PeftModel of IMSM, or its tuner)."""
    if any(isinstance(m, IMSMModel) for m in model.modules()):
        raise ValueError(
            f"get_peft_model was given a model that already holds an IMSM model ({type(model).__name__}): IMSM cannot "
            "wrap an IMSM model. Pass the base transformers model instead (a newly loaded one, or "
            "`peft_model.get_base_model()`, on which the new IMSM model then replaces the old one), or keep using the "
            "existing PeftModel."
        )


def _supersede_earlier_imsm(model: nn.Module) -> None:
    """Remove an earlier IMSM model from ``model`` (``get_peft_model`` run twice on one base model, e.g. a notebook
    cell run again): its hooks and its wrapped adapter's layers go, and it is marked superseded (it then refuses to
    run), so that the new IMSM model is built exactly as on a fresh base model."""
    earlier = installed_dual_pass(model)
    if earlier is None:
        return
    earlier.remove()
    earlier.superseded = True
    earlier.adapter_tuner.unload()  # (also drops `model.peft_config`)
    left = [n for n, m in model.named_modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
    if left:
        raise ValueError(
            f"get_peft_model was called again on a model that an earlier IMSM model had adapted, and the earlier "
            f"adapter's layers could not be removed ({_first(left)}), so the new IMSM model would not be built on "
            "the plain base model. Reload the base model (e.g. AutoModelForCausalLM.from_pretrained) and call "
            "get_peft_model on it."
        )


def _head_tied_to_input_embeddings(model: nn.Module) -> bool:
    """Whether the output head's weight IS the input embeddings' weight (tied embeddings), before injection."""
    try:
        head_weight = getattr(model.get_output_embeddings(), "weight", None)
        embeddings_weight = getattr(model.get_input_embeddings(), "weight", None)
    except (AttributeError, NotImplementedError):
        return False
    return head_weight is not None and head_weight is embeddings_weight


def _trained_head_reason(model: nn.Module, head_tied: bool) -> str | None:
    """Why the wrapped adapter, as injected, trains the output head (None when it does not).

    The head trains when it is (or contains) a peft adapter layer (LoRA etc. on ``lm_head``, also peft's
    ``ensure_weight_tying`` copy of an embedding adapter) or a modules_to_save / trainable-tokens wrapper (peft
    wraps a tied head with the input embeddings' trainable tokens); and when the head shares its weight with input
    embeddings that such a wrapper trains a copy of (transformers' ``tie_weights()`` re-ties the head to that copy).
    LoRA on the input embeddings leaves the head's weight alone: the frozen view switches it off.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if head is None:
        return None
    head_name = next((n for n, m in model.named_modules() if m is head), "lm_head")
    for name, module in head.named_modules():
        where = f"`{head_name}.{name}`" if name else f"`{head_name}`"
        if isinstance(module, ModulesToSaveWrapper):
            return (
                f"modules_to_save trains a copy of the output head {where} (named in modules_to_save, which TRL's "
                "SFTTrainer does when the chat template adds tokens, or put there by ensure_weight_tying to follow "
                "the input embeddings)"
            )
        if isinstance(module, TrainableTokensWrapper):
            return (
                f"trainable_token_indices trains rows of the output head {where} (named there, or tied to the input "
                "embeddings' trainable tokens because the model has tie_word_embeddings=True)"
            )
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            return (
                f"the wrapped adapter put a {type(module).__module__}.{type(module).__name__} layer on the output head "
                f"{where} (lm_head in target_modules, or ensure_weight_tying with an embedding adapter)"
            )
    embeddings = model.get_input_embeddings()
    if head_tied and isinstance(embeddings, AuxiliaryTrainingWrapper):
        option = "modules_to_save" if isinstance(embeddings, ModulesToSaveWrapper) else "trainable_token_indices"
        return (
            f"the output head `{head_name}` shares its weight with the input embeddings (tie_word_embeddings=True), "
            f"and {option} trains a copy of those: transformers re-ties the head to the trained copy whenever "
            "model.tie_weights() runs (accelerate's FSDP set-up, resize_token_embeddings, checkpoint loading)"
        )
    return None


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


def _row_means(per_position: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[batch, seq]`` gate -> ``[batch]`` float32 CPU means over the non-padding positions."""
    if attention_mask is None:
        return per_position.float().mean(dim=1).cpu()
    mask = attention_mask.to(per_position.dtype)
    return ((per_position * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).float().cpu()


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
