"""``IMSMModel``, the peft tuner of IMSM: wiring, forward and ``generate()``, peft's tuner interface, save/load.

Where things are:

* ``IMSMModel.__init__`` wraps the user's adapter (LoRA, DoRA, (IA)3, AdaLoRA, ...) by building peft's own tuner for
  it on the same model, adds one :class:`~peft_imsm.gate.IMSMGate`, and installs the dual pass
  (:class:`~peft_imsm.dual_pass.DualPass`: the backbone hooks, the frozen view, stacking; read that module to change
  how the two views run).
* ``forward`` / ``generate`` open one :class:`~peft_imsm.dual_pass.CallContext` per call (labels, prompt length,
  what to record) and run the wrapped model; nothing of a call is stored on this object, so one model can serve
  several threads at once.
* The anchor term is its own component, ``anchor_term`` (:class:`~peft_imsm.anchor_term.AnchorRegularizer`: the
  anchor set, its counters, the cached frozen states, the term); ``forward`` adds it to the loss of the training
  forwards it is due on. The gate's figures (``record_gate``, ``pop_training_stats``) are
  :mod:`peft_imsm.gate_stats`.
* peft's tuner interface (what IMSM supports of ``BaseTuner`` and of the wrapped tuner, method by method; everything
  else of the wrapped tuner refused with a clear error) is the base class,
  :class:`~peft_imsm.tuner_interface.IMSMTunerInterface`.
* Save/load: peft's ``_get_adapter_state_dict`` / ``_remap_adapter_state_dict_for_load`` hooks, here, run
  :mod:`peft_imsm.save_load` (the wrapped adapter's and the gate's weights, and the anchor term's ``state_dict()``).

A direct call of the inner model (``peft_model.get_base_model()(...)`` or its backbone) is the ADAPTED view alone:
the base model with the adapter injected and no gate, as in peft.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper, TrainableTokensWrapper
from torch import nn

from . import gate_stats, save_load
from .anchor_term import AnchorRegularizer, collecting
from .anchors import AnchorConfig, AnchorSet, tokenize_anchor_data
from .backbone import hidden_size, model_device
from .config import IMSMConfig
from .dual_pass import CallContext, DualPass, installed_dual_pass
from .gate import IMSMGate, choose_routes
from .query import build_query_index, check_attention_mask, query_summary
from .tuner_interface import STACKING_ALLOWED, IMSMTunerInterface

BASE_ROUTE = "__base__"
"""The route name of the frozen base model (as peft's mixed batches name it in ``adapter_names``)."""


class IMSMModel(IMSMTunerInterface):
    """IMSM tuner (created by ``get_peft_model`` / ``PeftModel.from_pretrained``; not meant to be built by hand).

    Attributes:
        model: the transformers causal LM, with the wrapped adapter's layers injected.
        imsm_gate: ``ModuleDict`` adapter name -> :class:`IMSMGate`.
        adapter_tuner: peft's tuner of the wrapped adapter (e.g. a ``LoraModel``) on the same ``model``; not a
            registered submodule (its parameters are ``model``'s).
        dual_pass: the :class:`~peft_imsm.dual_pass.DualPass` that runs both views.
        anchor_term: the :class:`~peft_imsm.anchor_term.AnchorRegularizer` (does nothing without an anchor section).
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
        gate = IMSMGate(hidden_size(model), imsm_config.gate_rank, imsm_config.gate_mode, imsm_config.gate_dropout,
                        scalar=imsm_config.gate_scalar, lr_scale=imsm_config.gate_lr_scale)  # fmt: skip
        gate.to(model_device(model))
        gate.requires_grad_(not imsm_config.inference_mode)
        self.imsm_gate = nn.ModuleDict({adapter_name: gate})
        # State the wrapped tuner keeps beside the model (e.g. VeRA's shared vera_A / vera_B projections) is
        # registered here under the same names, so it is saved and loaded where peft's tuner expects it.
        for name, child in adapter_tuner.named_children():
            if name != "model" and name not in self._modules and name not in self.__dict__:
                self._modules[name] = child  # (add_module would see the name through __getattr__)
        model.peft_config = self.peft_config
        self._apply_freeze_adapter()

        self.__dict__["dual_pass"] = DualPass(
            model, adapter_tuner, self._active_gate, lambda: self._active_config().route_threshold, self._route_gates
        )
        self._unloaded = False
        self._gate_dtype_checked = False
        self._stats = gate_stats.TrainingStats()  # (read and reset by pop_training_stats)
        self.anchor_term = AnchorRegularizer(
            model, self.dual_pass, self._active_config, self._active_gate, self._stats
        )

    # ------------------------------------------------------------------------------------------------ public API
    @property
    def gate(self) -> IMSMGate:
        """The active adapter's gate."""
        return self.imsm_gate[self._active_name]

    def _active_gate(self) -> IMSMGate:
        return self.gate

    def _active_config(self) -> IMSMConfig:
        return self.peft_config[self._active_name]

    def _route_gates(self) -> list[tuple[str, IMSMGate]]:
        """``(name, gate)`` of every active adapter, in routing order (several: a LoRA library)."""
        return [(name, self.imsm_gate[name]) for name in self._active_names]

    @property
    def route_names(self) -> list[str]:
        """What a hard-routed sequence can run, in route order: ``"__base__"`` (the frozen base model), then each
        active adapter (one, or several for a LoRA library)."""
        return [BASE_ROUTE, *self._active_names]

    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[str]:
        """The route each prompt takes under hard routing (``route_threshold``): ``"__base__"`` or an adapter name
        per row of ``input_ids`` (``[batch, seq]``, left- or right-padded, with its ``attention_mask``). One no-grad
        pass of the frozen view over the prompts."""
        self._check_usable()
        threshold = self._active_config().route_threshold
        if self.gate.mode != "route" or threshold is None:
            raise ValueError(
                f"route() needs a hard-routed route gate (gate_mode='route' with a route_threshold); this adapter has "
                f"gate_mode={self.gate.mode!r}, route_threshold={threshold!r}."
            )
        with torch.no_grad():
            h_frozen = self.dual_pass.frozen_states(self.model, input_ids=input_ids, attention_mask=attention_mask)
            index = build_query_index(*input_ids.shape[:2], h_frozen.device, attention_mask=attention_mask)
            q_frozen = query_summary(h_frozen, index)
        routes = choose_routes([gate for _, gate in self._route_gates()], q_frozen, threshold)
        names = self.route_names
        return [names[int(r) + 1] for r in routes]

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
        if torch.is_grad_enabled() and len(self._active_names) > 1:
            raise ValueError(
                f"Several IMSM adapters are active ({self._active_names}): a LoRA library routes each sequence to one "
                "of them at inference (without autograd), but it does not train as one. Train each adapter alone "
                "(model.base_model.set_adapter(name), or peft_imsm.train_gate(model, {name: rows, ...}) for the "
                "routers), then activate them together with model.base_model.set_adapter([...])."
            )
        on_gate = functools.partial(self._stats.observe_gate, labels=labels if training else None)
        gates = [] if training and self.anchor_term.routes else None  # (the routing term's input)
        if gates is not None:
            on_gate = collecting(on_gate, gates)
        with self.dual_pass.call(labels=labels, stacking=STACKING_ALLOWED.get(), on_gate=on_gate) as call:
            if labels is not None:
                kwargs["labels"] = labels
            output = self.adapter_tuner(*args, **kwargs)
        self._check_hooks_ran(call, "forward")
        if training and self.dual_pass.enabled and _is_fused_output(output):
            task = (
                output.loss.detach() if getattr(output, "loss", None) is not None else output.log_probs.new_zeros(())
            )
            _fold_into_log_probs(output, self.anchor_term.add_to_loss(task, labels, None, gates) - task)
        elif training and self.dual_pass.enabled and getattr(output, "loss", None) is not None:
            num_items = kwargs.get("num_items_in_batch")
            output.loss = self.anchor_term.add_to_loss(output.loss, labels, num_items, gates)
        return output

    def generate(self, *args: Any, **kwargs: Any):
        """``generate()`` with both views interwoven at every step, each view on its own KV cache; with a hard-routed
        route gate (``IMSMConfig.route_threshold``), each sequence in the one view its prompt was routed to, on one
        KV cache.

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
        on_gate = functools.partial(self._stats.observe_gate, labels=None)
        with self.dual_pass.call(prompt_length=prompt_length, stacking=STACKING_ALLOWED.get(), on_gate=on_gate) as c:
            output = self.model.generate(*args, **kwargs)
        sequences = output if isinstance(output, torch.Tensor) else getattr(output, "sequences", None)
        generated = sequences is not None and (input_ids is None or sequences.shape[-1] > input_ids.shape[-1])
        if generated:
            self._check_hooks_ran(c, "generate")
        return output

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
        with gate_stats.record_gate(per_token) as log:
            yield log

    def pop_training_stats(self) -> dict[str, float]:
        """IMSM's figures since the last call, for the Trainer's logs (see ``IMSMLogCallback``).

        ``gate_mean``: mean gate (weight of the frozen view) on the supervised tokens of the training forwards;
        ``anchor_gate_mean``: the same on the anchors; ``anchor_kl`` / ``task_loss``: mean anchor KL (before
        weighting) and task loss of the anchored training forwards. Keys without data are left out.
        """
        return self._stats.pop()

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

    def set_anchors(self, anchors: AnchorSet) -> None:
        """Use these anchors (checked against the model's position limit) from the next training forward on."""
        self.anchor_term.set_anchors(anchors)

    def anchor_set(self) -> AnchorSet:
        """The anchors, sampled from the frozen view on first use when ``source="self"``."""
        return self.anchor_term.anchor_set()

    # ------------------------------------------------------------------------- save / load (peft's hooks)
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        tuner = find_imsm_tuner(model, required=False)
        return save_load.adapter_state_dict(tuner, model, config, adapter_name, state_dict, unwanted_adapter_names)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        gate_prefix = f"imsm_gate.{adapter_name}."
        if gate_prefix in key:
            return key.replace(gate_prefix, "imsm_gate.")
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        tuner = find_imsm_tuner(model, required=False)
        return save_load.remap_state_dict_for_load(tuner, model, config, adapter_name, state_dict)


def _is_fused_output(output: Any) -> bool:
    """Whether ``output`` is TRL's fused-head output (``model(..., fused_lm_head=True)``: per-token ``log_probs`` and
    a ``label_mask``, no logits), from which TRL's ``SFTTrainer`` builds the loss itself, ignoring ``output.loss``."""
    return getattr(output, "log_probs", None) is not None and getattr(output, "label_mask", None) is not None


def _fold_into_log_probs(output: Any, extra: torch.Tensor) -> None:
    """Carry IMSM's extra loss terms (anchor KL, routing term: ``extra``, this micro-batch's full term) into TRL's
    fused-head loss, ``-sum(log_probs) / N`` (N: the Trainer's supervised-token count of the accumulated batch, or this
    micro-batch's).

    The one place IMSM adapts to TRL's ``SFTTrainer.compute_loss`` (TRL >= 1.16 computes the loss from
    ``outputs.log_probs`` of its fused LM head and never reads ``outputs.loss``, where IMSM adds its terms): each
    supervised position's log-probability gets ``-(extra - extra.detach())``, zero in value (the logged loss, entropy
    and accuracy are unchanged) and ``-d extra`` in gradient, so TRL's sum over this micro-batch's ``n`` supervised
    positions, divided by N, carries ``(n / N) * d extra``: the term weighted by the micro-batch's share of the
    accumulated batch, exactly as ``peft_imsm`` adds it to ``output.loss`` for the HF ``Trainer``."""
    mask = output.label_mask.to(output.log_probs.dtype)
    output.log_probs = output.log_probs - (extra - extra.detach()).to(output.log_probs.dtype) * mask
    if getattr(output, "loss", None) is not None:
        output.loss = output.loss + extra


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
            f"adapter's layers could not be removed ({save_load.first_keys(left)}), so the new IMSM model would not be built on "
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
