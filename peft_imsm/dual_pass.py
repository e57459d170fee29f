"""The dual pass: one model, two views (wrapped adapter off = FROZEN, on = ADAPTED), interwoven by the gate.

This module knows the transformers model and peft's adapter layers, not peft's tuner plumbing. :class:`DualPass`
puts two hooks on the model's backbone (the module whose output feeds the output head, e.g. ``LlamaModel``), so the
dual pass runs the same way for ``forward``, the HF ``Trainer``, TRL and ``generate()``:

1. ``_pre_hook`` runs the FROZEN view (``_run_frozen_view``): the backbone again, under ``torch.no_grad()`` inside
   :func:`frozen_view` (every adapter layer off), on its own KV cache; it also finds the query tokens.
2. The backbone then runs as usual: the ADAPTED view, with autograd.
3. ``_post_hook`` computes the gate from both views' final hidden states and query summaries and replaces the
   backbone's ``last_hidden_state`` with the interwoven state; the model's own head and loss then run on it, once.

Without autograd (generation, evaluation) and with plain LoRA, steps 1 and 2 are ONE pass instead (``_stack_views``):
the batch doubled (rows ``[frozen; adapted]``), ``_zero_frozen_rows`` (a hook on every ``lora_A``) cancels the LoRA
update on the frozen rows, and the post-hook splits the two halves (see :meth:`DualPass.can_stack`). The anchor
term's pass (:class:`AnchorPass`, ``_anchor_step``) skips step 1: it brings the frozen states, computed once (with a
shared prefix its output is one packed row, :func:`~peft_imsm.losses.pack_rows`, the layout the anchor KL reads).

Hard routing (a route gate with ``route_threshold``, without autograd, plain LoRA; see :meth:`DualPass.can_route`)
runs ONE view per sequence instead. At prefill (``_open_routed_prefill``) the backbone runs the frozen view on every
row; the post-hook (``_finish_routed_pass``) routes each row from its frozen query summary
(:func:`~peft_imsm.gate.choose_routes`: the frozen view, or one of the active adapters when several route gates are
active, a LoRA library), runs the adapted view again on the rows routed to an adapter only, and writes their states
and key/values over the frozen ones, so the one KV cache holds each row's own view. Every later pass
(``_open_routed_step``) is one pass of the batch: the frozen view when every row is routed there, else the adapted
view with each LoRA update zeroed on the rows not routed to that adapter (``_zero_unrouted_rows``, a hook on every
``lora_A``; the row routes travel in a ``ContextVar``). Elsewhere (other adapters, packed sequences, other cache
classes) the route gate is rounded to 0 or 1 at the end of the usual two-view pass, which gives the same outputs at
the cost of both views (one adapter only).

Per-call state, safe when several threads share one model:

* An IMSM call (``IMSMModel.forward`` / ``generate``, the anchor term) opens a :class:`CallContext` with
  :meth:`DualPass.call`. It lives in a ``ContextVar``, so each thread (and each nested call) sees its own. Each
  backbone pass inside the call pushes a :class:`BackbonePass` in the pre-hook and pops it in the post-hook; nothing
  of a call is kept on the model.
* :func:`frozen_view` switches the adapter layers off for the current thread only (a ``ContextVar`` read by the
  layers' ``disable_adapters`` property, see :mod:`peft_imsm.registration`), never by flipping flags on the shared
  layers. Per thread is IMSM's internal frozen view only: ``PeftModel.disable_adapter()`` keeps peft's behaviour and is
  model-wide (while its block runs, every thread sees the base model, as with plain LoRA; see
  ``IMSMModel.disable_adapter_layers``). Concurrent forward / ``generate()`` calls are each exact.
* Outside an IMSM call the hooks do nothing: a direct call of the inner model (``peft_model.get_base_model()(...)``
  or its backbone) is the ADAPTED view alone, the base model with the adapter injected, as in peft.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from .backbone import (
    bound_parameter_names,
    cache_parameter_name,
    find_backbone,
    last_hidden_state,
    replace_last_hidden_state,
    supports_stacked_views,
)
from .cache import as_imsm_cache, copy_rows, is_imsm_cache
from .gate import IMSMGate, choose_routes
from .losses import pack_rows
from .query import QueryIndex, build_query_index, check_attention_mask, per_token_queries

# Backbone inputs with a batch dimension, doubled when both views run as one batch.
_BATCHED_KWARGS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "token_type_ids")
# Keyword arguments of a causal LM's forward that belong to its head or loss, not to the backbone.
_HEAD_ONLY_KWARGS = ("labels", "logits_to_keep", "num_items_in_batch", "return_dict")

_FROZEN_VIEW: ContextVar[bool] = ContextVar("imsm_frozen_view", default=False)


@dataclass(frozen=True)
class RowRoutes:
    """The routes of a one-view routed pass, read by the ``lora_A`` hooks: ``routes`` (``[rows]`` long, -1 for the
    frozen view, k for ``names[k]``) and ``tokens`` (``rows * seq``, for layers that flatten the batch)."""

    routes: torch.Tensor
    names: tuple[str, ...]
    tokens: int


_ROW_ROUTES: ContextVar[RowRoutes | None] = ContextVar("imsm_row_routes", default=None)
_SOFT_GATE: ContextVar[bool] = ContextVar("imsm_soft_gate", default=False)


@contextmanager
def soft_gate() -> Iterator[None]:
    """Run the route gate's soft mix (both views) in this thread even where it would be hard-routed (for code that
    needs both views' states without autograd, e.g. :func:`~peft_imsm.train_gate`'s stored pass)."""
    token = _SOFT_GATE.set(True)
    try:
        yield
    finally:
        _SOFT_GATE.reset(token)


def in_frozen_view() -> bool:
    """True while the current thread runs the frozen view (every peft adapter layer reads as disabled)."""
    return _FROZEN_VIEW.get()


@contextmanager
def frozen_view() -> Iterator[None]:
    """Run the frozen view: in this thread (only), every peft adapter layer and modules_to_save wrapper is off."""
    token = _FROZEN_VIEW.set(True)
    try:
        yield
    finally:
        _FROZEN_VIEW.reset(token)


@dataclass
class BackbonePass:
    """What the pre-hook hands to the post-hook within one backbone pass."""

    index: QueryIndex | None = None
    cache: Cache | None = None
    h_frozen: torch.Tensor | None = None  # [batch, seq, d] (two-pass layout)
    stacked_rows: int | None = None  # rows per view in the doubled batch (stacked layout)
    stacked_tokens: int = 0  # rows * seq per view (layers that flatten the batch, e.g. OPT's MLP)
    grad_enabled: bool | None = None  # autograd state to restore after an adapted view run without it
    prefix_hidden: torch.Tensor | None = None  # [1, prefix, d] adapted view of a shared prefix (run once)
    hard_route: bool = False  # round the route gate to 0 / 1 (route_threshold, without autograd)
    routed_prefill: dict | None = None  # one-view routing at prefill: the backbone's kwargs for the adapted rerun
    routes: torch.Tensor | None = None  # [batch] long: -1 frozen view, k >= 0 the k-th routed adapter
    frozen_view_token: Any = None  # the frozen-view switch set for this whole pass (reset by the post-hook)
    row_routes_token: Any = None  # the row routes set for this whole pass (reset by the post-hook)


@dataclass
class AnchorPass:
    """The anchor term's one model pass (:mod:`peft_imsm.anchor_term`): the call's batch is rows ``[x; x]``.

    The backbone runs the ADAPTED view on the second half only; ``h_frozen`` (the frozen view's states of ``x``,
    computed earlier with :meth:`DualPass.frozen_states`) stands for the frozen view; and the backbone's output is
    ``[h_frozen; interwoven]``, so the model's own head (and logit post-processing) gives the frozen view's logits
    (the KL target) and IMSM's in one pass. Never stacked.

    Attributes:
        h_frozen: ``[batch, seq, d]`` the frozen view's final hidden states of ``x``, taken by the call's first
            backbone pass (set to None there; a pass that cannot use it runs the frozen view itself).
        adapted_without_grad: run the adapted view's backbone without autograd; the gate and the head still get
            gradients (gate-only mode).
        shared_prefix: every row's first ``shared_prefix`` tokens are the same and unpadded (self anchors that start
            from a chat template's user turn). The adapted view runs them once, on one row, and the other rows
            continue from that row's KV cache; the post-hook puts the prefix's states back in front of every row, so
            what follows is unchanged (up to float rounding) at a fraction of the cost. The head then runs on the
            prefix once too: the backbone's output becomes ONE packed row (:func:`~peft_imsm.losses.pack_rows`).
        packed_imsm: set by the post-hook when it packed the output: whether IMSM's half is packed like the frozen
            half (its prefix states are the same in every row: fixed gate, or a gate without dropout or query).
    """

    h_frozen: torch.Tensor | None
    adapted_without_grad: bool = False
    shared_prefix: int = 0
    packed_imsm: bool | None = None


@dataclass
class CallContext:
    """The state of one IMSM call (a forward, a ``generate()``, an anchor pass), created for that call only.

    Attributes:
        labels: ``[batch, seq]`` labels of the forward (they define the query), or None.
        prompt_length: prompt length of a ``generate()`` call (the query at prefill), or None.
        anchor: the anchor term's pass (:class:`AnchorPass`: batch ``[x; x]``, frozen states given), or None.
        frozen_capture: when a list, the final hidden states of every backbone pass run in the frozen view within
            this call are appended to it (see :meth:`DualPass.frozen_states`).
        stacking: whether this call may run both views as one doubled batch.
        on_gate: called with ``(gate, attention_mask, call)`` after every interwoven pass (logging, recording, the
            routing term); ``gate`` still has autograd.
        passes: backbone passes in flight (pre-hook pushes, post-hook pops).
        interwoven: number of interwoven backbone passes so far (a guard that the hooks ran).
    """

    labels: torch.Tensor | None = None
    prompt_length: int | None = None
    anchor: AnchorPass | None = None
    frozen_capture: list[torch.Tensor] | None = None
    stacking: bool = True
    on_gate: Callable[[torch.Tensor, torch.Tensor | None, CallContext], None] | None = None
    passes: list[BackbonePass] = field(default_factory=list)
    interwoven: int = 0


_CALL: ContextVar[CallContext | None] = ContextVar("imsm_call", default=None)


class DualPass:
    """The dual pass on one transformers causal LM: the backbone hooks, the frozen view, stacking.

    Args:
        model: the causal LM, with the wrapped adapter's layers already injected.
        adapter_tuner: peft's tuner of the wrapped adapter (decides whether both views can share one batch).
        get_gate: returns the gate to use (the active adapter's).
        get_route_threshold: returns the active adapter's ``route_threshold`` (None: no hard routing).
        get_route_gates: returns ``(adapter name, gate)`` of every active adapter, in routing order (several: a LoRA
            library behind route gates, always hard-routed).

    Attributes:
        backbone: the hooked module (e.g. ``LlamaModel``).
        enabled: False while IMSM is switched off (``disable_adapter()``): the hooks do nothing.
        stacked_views: run both views as one doubled batch where possible (see :meth:`can_stack`); False always
            runs two passes (same results up to float rounding).
        supports_stacking: whether the wrapped adapter allows the doubled batch at all (plain LoRA only).
        adapter_tuner: the wrapped adapter's tuner (a newer IMSM model on the same model unloads its layers).
        removed: True after :meth:`remove` (``unload()``, or a newer IMSM model built on the same model).
        superseded: True when a newer IMSM model was built on the same model (see :func:`installed_dual_pass`).
    """

    def __init__(
        self,
        model: nn.Module,
        adapter_tuner: nn.Module,
        get_gate: Callable[[], IMSMGate],
        get_route_threshold: Callable[[], float | None] = lambda: None,
        get_route_gates: Callable[[], list[tuple[str, IMSMGate]]] | None = None,
    ) -> None:
        self.backbone = find_backbone(model)
        self.adapter_tuner = adapter_tuner
        self.enabled = True
        self.stacked_views = True
        self.removed = False
        self.superseded = False
        self.supports_stacking = supports_stacked_views(adapter_tuner, model)
        self._get_gate = get_gate
        self._get_route_threshold = get_route_threshold
        self._get_route_gates = get_route_gates or (lambda: [("default", get_gate())])
        self._hooked_lora_A: set[int] = set()
        self._positional_names = bound_parameter_names(self.backbone)
        self._cache_name = cache_parameter_name(self.backbone)
        self._hooks = [
            self.backbone.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            self.backbone.register_forward_hook(self._post_hook, with_kwargs=True),
        ]
        if self.supports_stacking:
            self.hook_lora_layers(model)

    def hook_lora_layers(self, model: nn.Module) -> None:
        """Put the row-zeroing hooks (stacking, one-view routing) on every ``lora_A`` of ``model`` not hooked yet
        (also those of adapters added later)."""
        for module in model.modules():
            if not isinstance(module, LoraLayer):
                continue
            for name, lora_A in module.lora_A.items():
                if id(lora_A) not in self._hooked_lora_A:
                    self._hooked_lora_A.add(id(lora_A))
                    self._hooks += [
                        lora_A.register_forward_hook(_zero_frozen_rows),
                        lora_A.register_forward_hook(functools.partial(_zero_unrouted_rows, name)),
                    ]

    def remove(self) -> None:
        """Remove every hook (``unload()``); later IMSM calls raise."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.removed = True

    @contextmanager
    def call(self, **fields: Any) -> Iterator[CallContext]:
        """Open one IMSM call in the current thread (nested calls get their own context)."""
        context = CallContext(**fields)
        token = _CALL.set(context)
        try:
            yield context
        finally:
            for step in reversed(context.passes):  # (passes left open by an error: reset what they set)
                if step.row_routes_token is not None:
                    _ROW_ROUTES.reset(step.row_routes_token)
                if step.frozen_view_token is not None:
                    _FROZEN_VIEW.reset(step.frozen_view_token)
            _CALL.reset(token)

    def frozen_states(self, model: nn.Module, **inputs: Any) -> torch.Tensor:
        """``[batch, seq, d]`` final hidden states of ``model(**inputs)`` (the hooked LM), frozen view, no grad."""
        with self.call(frozen_capture=[]) as call, torch.no_grad(), frozen_view():
            model(**inputs)
        return call.frozen_capture[-1]

    # ------------------------------------------------------------------------------------------------ hooks
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Before each backbone pass of an IMSM call: push a :class:`BackbonePass` made by one of three steps,
        :meth:`_stack_views` (one doubled batch), :meth:`_anchor_step` (frozen states given, see :class:`AnchorPass`)
        or :meth:`_run_frozen_view` (two passes: the frozen view now, the adapted view as the backbone's own run)."""
        call = _CALL.get()
        if call is None or _FROZEN_VIEW.get() or not self.enabled:
            return None
        kwargs = dict(kwargs)
        if args:
            kwargs.update(self._args_to_kwargs(module, args))
        cache_key = "past_key_values" if "past_key_values" in kwargs else "cache"
        first = kwargs.get("input_ids")
        if first is None:
            first = kwargs.get("inputs_embeds")
        batch_size, seq_len = first.shape[0], first.shape[1]
        if call.anchor is not None:  # rows [x; x]: the backbone runs on the second half (see AnchorPass)
            _map_batched(kwargs, batch_size, lambda value: value[batch_size // 2 :])
            batch_size //= 2
        cache = kwargs.get(cache_key)
        index = self._query_index(call, kwargs, cache, first, batch_size)
        hard_route = self._hard_routing(call)
        if is_imsm_cache(cache) and cache.imsm_routed:
            step = BackbonePass(cache=cache, hard_route=True)
            self._open_routed_step(step, cache.imsm_routes, seq_len)
            call.passes.append(step)
            return (), kwargs
        if hard_route and self.can_route(kwargs, cache, index):
            cache = self._open_cache(module, kwargs, cache_key, index, stacked=False, routed=True)[0]
            step = BackbonePass(index=index, cache=cache, hard_route=True)
            self._open_routed_prefill(module, step, kwargs, cache_key)
            call.passes.append(step)
            return (), kwargs
        stacked = call.stacking and call.anchor is None and self.can_stack(kwargs, cache, index)
        cache, stacked = self._open_cache(module, kwargs, cache_key, index, stacked)
        step = BackbonePass(index=index, cache=cache, hard_route=hard_route)
        if stacked:
            self._stack_views(step, kwargs, batch_size, seq_len)
        elif call.anchor is not None:
            self._anchor_step(module, call.anchor, step, kwargs, cache_key, (batch_size, seq_len))
        else:
            self._run_frozen_view(module, step, kwargs, cache_key)
        call.passes.append(step)
        return (), kwargs

    def _query_index(self, call: CallContext, kwargs: dict, cache: Any, first: torch.Tensor, batch_size: int):
        """Check the attention mask; the query tokens (a :class:`QueryIndex`) of the ``batch_size`` rows the backbone
        runs on, or None when a KV cache already holds the query summaries (decode steps)."""
        seq_len = first.shape[1]
        if cache is None or isinstance(cache, Cache):
            past_length = cache.get_seq_length() if cache is not None else 0
            inputs_name = "input_ids" if kwargs.get("input_ids") is not None else "inputs_embeds"
            inputs_shape = (batch_size, *first.shape[1:])  # (the half the backbone runs on, in an anchor pass)
            check_attention_mask(kwargs.get("attention_mask"), inputs_shape, past_length, inputs_name)
        if is_imsm_cache(cache) and cache.imsm_has_query:
            return None
        labels = call.labels
        if labels is not None and (labels.dim() != 2 or labels.shape != (batch_size, seq_len)):
            labels = None
        return build_query_index(
            batch_size,
            seq_len,
            first.device,
            attention_mask=kwargs.get("attention_mask"),
            labels=labels,
            position_ids=kwargs.get("position_ids"),
            prompt_length=call.prompt_length,
        )

    def _open_cache(
        self,
        module: nn.Module,
        kwargs: dict,
        cache_key: str,
        index: QueryIndex | None,
        stacked: bool,
        routed: bool = False,
    ) -> tuple[Cache | None, bool]:
        """The pass's IMSM KV cache (a new one where the backbone would make one), put in ``kwargs``; and whether
        both views run stacked (a cache decides that once, at prefill). ``routed``: the one-view routed layout."""
        cache = kwargs.get(cache_key)
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
            cache = as_imsm_cache(cache, stacked=stacked, routed=routed)
            stacked = cache.imsm_stacked
            kwargs[cache_key] = cache
        return cache, stacked

    def _stack_views(self, step: BackbonePass, kwargs: dict, batch_size: int, seq_len: int) -> None:
        """Both views in ONE pass: rows ``[frozen; adapted]``, the LoRA update zeroed on the frozen rows (see
        :func:`_zero_frozen_rows`). Only without autograd (generation / evaluation)."""
        if step.cache is not None:
            step.cache.imsm_half_rows = batch_size
        _map_batched(kwargs, batch_size, lambda value: torch.cat([value, value]))
        step.stacked_rows = batch_size
        step.stacked_tokens = batch_size * seq_len

    def _anchor_step(
        self, module: nn.Module, anchor: AnchorPass, step: BackbonePass, kwargs: dict, cache_key: str, shape: tuple
    ) -> None:
        """The anchor pass: take the given frozen states (and run a shared prefix once), or, where they do not fit
        this pass (``shape``: its ``(batch, seq)``), run the frozen view."""
        if anchor.adapted_without_grad:
            step.grad_enabled = torch.is_grad_enabled()
            torch.set_grad_enabled(False)  # restored by the post-hook (and by the caller's grad context on errors)
        given, anchor.h_frozen = anchor.h_frozen, None
        if given is not None and step.cache is None and given.shape[:2] == shape:
            step.h_frozen = given  # the caller already ran the frozen view on these exact inputs
            if self._can_share_prefix(module, kwargs, anchor.shared_prefix, shape[1]):
                step.prefix_hidden = self._run_shared_prefix(module, kwargs, anchor.shared_prefix)
        else:
            self._run_frozen_view(module, step, kwargs, cache_key)

    def _run_frozen_view(self, module: nn.Module, step: BackbonePass, kwargs: dict, cache_key: str) -> None:
        """The frozen view's backbone pass (no autograd, its own KV cache); the adapted view runs next, as usual."""
        frozen_kwargs = {k: v for k, v in kwargs.items() if k not in _HEAD_ONLY_KWARGS}
        if step.cache is not None:
            frozen_kwargs[cache_key] = step.cache.imsm_frozen
        with torch.no_grad(), frozen_view():
            out = module(**frozen_kwargs)
        step.h_frozen = last_hidden_state(out)

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        call = _CALL.get()
        if call is None or not self.enabled:
            return None
        if _FROZEN_VIEW.get() and not (call.passes and call.passes[-1].frozen_view_token is not None):
            if call.frozen_capture is not None and not call.passes:
                call.frozen_capture.append(last_hidden_state(output))
            return None
        if not call.passes:
            return None
        step = call.passes.pop()
        if step.row_routes_token is not None:
            _ROW_ROUTES.reset(step.row_routes_token)
        if step.frozen_view_token is not None:
            _FROZEN_VIEW.reset(step.frozen_view_token)
        if step.grad_enabled is not None:
            torch.set_grad_enabled(step.grad_enabled)
        if step.routes is not None or step.routed_prefill is not None:
            return self._finish_routed_pass(module, call, step, kwargs, output)
        hidden = last_hidden_state(output)
        if step.prefix_hidden is not None:  # the rows ran after their shared prefix: put it back in front
            prefix = step.prefix_hidden.expand(hidden.shape[0], -1, -1).to(hidden.dtype)
            hidden = torch.cat([prefix, hidden], dim=1)
        if step.stacked_rows is not None:
            h_frozen, h_adapted = hidden[: step.stacked_rows], hidden[step.stacked_rows :]
        else:
            h_frozen, h_adapted = step.h_frozen, hidden
        gate = self._get_gate()
        q_frozen = q_adapted = None
        if gate.reads_query:
            q_frozen, q_adapted = per_token_queries(
                h_frozen, h_adapted, step.index, step.cache, adapted=gate.mode == "query"
            )
        g = gate(h_frozen, h_adapted, q_frozen, q_adapted)
        if step.hard_route:  # (the two-view path of a hard-routed route gate: the same outputs as one view)
            g = (g > self._get_route_threshold()).float()
        call.interwoven += 1
        if call.on_gate is not None:
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                mask = mask[: h_adapted.shape[0], -h_adapted.shape[1] :]  # (stacked views: both halves equal)
            else:
                mask = None
            call.on_gate(g, mask, call)
        mixed = IMSMGate.interweave(h_frozen, h_adapted, g)
        if call.anchor is not None and step.prefix_hidden is not None:
            # The prefix's logits are the same in every row: the head runs on it once (a packed row).
            alike = gate.mode == "fixed" or (gate.mode == "token" and not (gate.training and gate.dropout.p > 0))
            call.anchor.packed_imsm = alike
            mixed = pack_rows(h_frozen, mixed, step.prefix_hidden.shape[1], imsm_rows_alike=alike)
        elif call.anchor is not None:
            mixed = torch.cat([h_frozen.to(mixed.dtype), mixed])
        return replace_last_hidden_state(output, mixed)

    # ------------------------------------------------------------------------------------------------ hard routing
    def _hard_routing(self, call: CallContext) -> bool:
        """Whether this pass rounds the route gate to one view per sequence: a route gate with a
        ``route_threshold``, without autograd (inference), outside the anchor term, no forced gate value."""
        if call.anchor is not None or torch.is_grad_enabled() or _SOFT_GATE.get():
            return False
        if self._get_route_threshold() is None:
            return False
        gate = self._get_gate()
        return gate.mode == "route" and gate.forced_value is None

    def can_route(self, kwargs: dict, cache: Cache | None, index: QueryIndex | None) -> bool:
        """Whether a hard-routed pass with these ``kwargs`` can run one view per row (see the module docstring):
        plain LoRA (whose update can be zeroed per row), one sequence per row, plain batch-first inputs, and no
        cache or an empty ``DynamicCache``."""
        if not self.supports_stacking or index is None or not index.one_per_row:
            return False
        if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
            return False
        for key in ("attention_mask", "position_ids"):
            value = kwargs.get(key)
            if value is not None and (not isinstance(value, torch.Tensor) or value.dim() != 2):
                return False
        return cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0)

    def _open_routed_prefill(self, module: nn.Module, step: BackbonePass, kwargs: dict, cache_key: str) -> None:
        """Prefill of one-view routing: the backbone runs the frozen view on every row (the routes are not known
        yet); the post-hook reruns the adapter-routed rows. Keeps what that rerun needs."""
        rerun = {k: v for k, v in kwargs.items() if k not in _HEAD_ONLY_KWARGS}
        if step.cache is not None:
            rerun[cache_key] = DynamicCache(config=module.config)  # (the rerun rows' own cache, copied over after)
        step.routed_prefill = {"kwargs": rerun, "cache_key": cache_key}
        step.frozen_view_token = _FROZEN_VIEW.set(True)

    def _open_routed_step(self, step: BackbonePass, routes: torch.Tensor, seq_len: int) -> None:
        """A pass after a one-view routed prefill: one pass of the batch, each row in its view."""
        step.routes = routes
        names = tuple(name for name, _ in self._get_route_gates())
        if bool((routes < 0).all()):
            step.frozen_view_token = _FROZEN_VIEW.set(True)  # (the base model alone: no adapter layer runs)
        elif len(names) > 1 or bool((routes < 0).any()):  # (else every row runs the one adapter: nothing to zero)
            step.row_routes_token = _ROW_ROUTES.set(RowRoutes(routes, names, routes.numel() * seq_len))

    def _finish_routed_pass(
        self, module: nn.Module, call: CallContext, step: BackbonePass, kwargs: dict, output: Any
    ) -> Any:
        """Post-hook of a one-view routed pass; at prefill, route every row and rerun the adapter-routed ones."""
        hidden = last_hidden_state(output)
        routes = step.routes
        if step.routed_prefill is not None:
            q_frozen, _ = per_token_queries(hidden, hidden, step.index, step.cache, adapted=False)
            gates = [gate for _, gate in self._get_route_gates()]
            routes = choose_routes(gates, q_frozen[:, 0], self._get_route_threshold())  # (one summary per row)
            if step.cache is not None:
                step.cache.imsm_routes = routes
            rows = (routes >= 0).nonzero().flatten()
            if rows.numel() > 0:  # (in place, without autograd: the frozen rows stay bit for bit the base model's)
                hidden[rows] = self._rerun_adapted_rows(module, step, rows, routes[rows]).to(hidden.dtype)
        call.interwoven += 1
        if call.on_gate is not None:
            g_hard = (routes < 0).float()[:, None, None].expand(*hidden.shape[:2], hidden.shape[-1])
            mask = kwargs.get("attention_mask")
            mask = mask[:, -hidden.shape[1] :] if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            call.on_gate(g_hard, mask, call)
        return output

    def _rerun_adapted_rows(
        self, module: nn.Module, step: BackbonePass, rows: torch.Tensor, routes: torch.Tensor
    ) -> torch.Tensor:
        """The adapted view's final hidden states of the prefill's rows ``rows`` (``[len(rows), seq, d]``), each row
        with the adapter of its route (``routes``, ``[len(rows)]``); their key/values are written over the frozen
        view's in the pass's cache."""
        rerun, cache_key = step.routed_prefill["kwargs"], step.routed_prefill["cache_key"]
        batch_size = step.index.segment.shape[0]
        sub = dict(rerun)
        _map_batched(sub, batch_size, lambda value: value[rows])
        names = tuple(name for name, _ in self._get_route_gates())
        seq_len = step.index.segment.shape[1]
        token = _CALL.set(None)  # a plain adapted-view pass: the backbone hooks stay out of it
        routes_token = _ROW_ROUTES.set(RowRoutes(routes, names, routes.numel() * seq_len) if len(names) > 1 else None)
        try:
            out = module(**sub)
        finally:
            _ROW_ROUTES.reset(routes_token)
            _CALL.reset(token)
        if step.cache is not None:
            copy_rows(step.cache, sub[cache_key], rows)
        return last_hidden_state(out)

    # ------------------------------------------------------------------------------------------------ shared prefix
    def _can_share_prefix(self, module: nn.Module, kwargs: dict, prefix: int, seq_len: int) -> bool:
        """Whether the adapted view can run ``prefix`` tokens once for all rows (see ``AnchorPass.shared_prefix``).

        Not under gradient checkpointing (recomputing a pass that fills a KV cache would fill it twice), and only
        for plain inputs: ``input_ids``, a 2-D attention mask, no explicit positions.
        """
        if not 0 < prefix < seq_len or self._cache_name is None:
            return False
        if kwargs.get("input_ids") is None or kwargs.get("position_ids") is not None:
            return False
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            return False
        if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
            return False
        checkpointing = torch.is_grad_enabled() and module.training
        return not (checkpointing and any(getattr(m, "gradient_checkpointing", False) for m in module.modules()))

    def _run_shared_prefix(self, module: nn.Module, kwargs: dict, prefix: int) -> torch.Tensor:
        """Run the adapted view on row 0's first ``prefix`` tokens with a KV cache, then point ``kwargs`` (in place)
        at the remaining tokens of every row, continuing from that cache repeated for each row. Returns the prefix's
        ``[1, prefix, d]`` final hidden states."""
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        rows = ids.shape[0]
        cache = DynamicCache(config=module.config)
        prefix_kwargs = {k: v for k, v in kwargs.items() if k not in _HEAD_ONLY_KWARGS and k not in _BATCHED_KWARGS}
        prefix_kwargs.update(input_ids=ids[:1, :prefix], use_cache=True)
        prefix_kwargs[self._cache_name] = cache
        if mask is not None:
            prefix_kwargs["attention_mask"] = mask[:1, :prefix]
        token = _CALL.set(None)  # a plain adapted-view pass: the hooks stay out of it
        try:
            out = module(**prefix_kwargs)
        finally:
            _CALL.reset(token)
        cache.batch_repeat_interleave(rows)
        kwargs["input_ids"] = ids[:, prefix:]
        kwargs[self._cache_name] = cache
        kwargs["use_cache"] = True
        return last_hidden_state(out)

    # ------------------------------------------------------------------------------------------------ stacking
    def can_stack(self, kwargs: dict, cache: Cache | None, index: QueryIndex | None) -> bool:
        """Whether both views can run as one doubled batch for a backbone call with these ``kwargs``."""
        if not (self.stacked_views and self.supports_stacking) or torch.is_grad_enabled():
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

    def _args_to_kwargs(self, module: nn.Module, args: tuple) -> dict:
        names = self._positional_names
        if len(args) > len(names):
            raise TypeError(f"Too many positional arguments for {type(module).__name__}.forward.")
        return dict(zip(names, args))


def installed_dual_pass(model: nn.Module) -> DualPass | None:
    """The :class:`DualPass` whose hooks are on ``model``'s backbone (an IMSM model built on ``model`` before and
    still in place), or None."""
    try:
        backbone = find_backbone(model)
    except ValueError:
        return None  # (not a causal LM: building the new DualPass raises the clear error)
    for hook in backbone._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, DualPass) and not owner.removed:
            return owner
    return None


def _map_batched(kwargs: dict, batch_size: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Apply ``fn`` (in place in ``kwargs``) to each backbone input with ``batch_size`` rows (``_BATCHED_KWARGS``)."""
    for key in _BATCHED_KWARGS:
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch_size:
            kwargs[key] = fn(value)


def _zero_frozen_rows(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    """Forward hook on each ``lora_A``: while both views run stacked, zero the frozen rows' LoRA activations.

    LoRA adds ``lora_B(lora_A(x)) * scaling`` to the base layer's output; with ``lora_A``'s output zeroed on the
    frozen rows (and no LoRA bias, see :func:`~peft_imsm.backbone.supports_stacked_views`) that update is exactly 0
    there, so those rows get the base layer's output bit for bit while the adapted rows get plain LoRA. peft's own
    mixed-adapter batches (``adapter_names=``) give the same result but index the batch with Python lists in every
    layer, which slows each decode step (``benchmarks/generation_speed.py`` measures it).

    The frozen rows are the first half of dim 0, also for layers that see the batch flattened to
    ``[batch * seq, ...]`` (e.g. OPT's MLP). Zeroed in place: stacking only runs without autograd.
    """
    call = _CALL.get()
    if call is None or not call.passes:
        return
    step = call.passes[-1]
    if step.stacked_rows is None:
        return
    rows = output.shape[0]
    if rows != 2 * step.stacked_rows and rows != 2 * step.stacked_tokens:
        raise RuntimeError(
            f"IMSM stacked views: a LoRA layer saw {rows} rows where the doubled batch has {2 * step.stacked_rows} "
            f"rows ({2 * step.stacked_tokens} tokens), so its frozen rows cannot be told apart (tokens routed to "
            "experts?). Set `model.base_model.stacked_views = False` to run the two views as separate passes."
        )
    output[: rows // 2].zero_()


def _zero_unrouted_rows(adapter_name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    """Forward hook on each ``lora_A`` of adapter ``adapter_name``: in a one-view routed pass (:class:`RowRoutes` set),
    zero its LoRA activations on every row not routed to that adapter (the frozen-routed rows, and in a LoRA library
    the rows of the other adapters), so those rows get exactly what their own view computes. Zeroed in place: routed
    passes run without autograd. Rows flattened to ``[rows * seq, ...]`` (e.g. OPT's MLP) are handled."""
    row_routes = _ROW_ROUTES.get()
    if row_routes is None:
        return
    routes = row_routes.routes
    index = row_routes.names.index(adapter_name) if adapter_name in row_routes.names else -2
    drop = routes.to(output.device) != index
    if output.shape[0] == row_routes.tokens and output.shape[0] != drop.numel():
        drop = drop.repeat_interleave(output.shape[0] // drop.numel())
    output.masked_fill_(drop.view(-1, *([1] * (output.dim() - 1))), 0.0)
