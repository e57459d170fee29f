"""The anchor term, IMSM's regulariser: ``weight * every * KL(p_frozen || p_imsm)`` on an anchor batch, added to the
loss of the training forwards it is due on (as peft's AdaLoRA adds its orthogonality penalty to ``outputs.loss``).

:class:`AnchorRegularizer` (``IMSMModel.anchor_term``) owns everything of it but the formulas, which are in
:mod:`peft_imsm.losses` (:func:`~peft_imsm.losses.anchor_kl` and its packed form, the routing term
:func:`~peft_imsm.losses.gate_route_loss` with its weights :func:`~peft_imsm.losses.supervised_gates`, the
accumulation factor :func:`~peft_imsm.losses.micro_batch_share`):

* the anchor set (:mod:`peft_imsm.anchors`: sampled from the frozen view on first use, or given with
  :meth:`~AnchorRegularizer.set_anchors`);
* ``draws`` (anchor batches drawn so far) and ``forwards`` (training forwards with the term due so far, whether
  ``AnchorConfig.every`` ran it or skipped it);
* the frozen view's final hidden states of every anchor, computed once (:meth:`~AnchorRegularizer.frozen_states`),
  and their query summaries (:meth:`~AnchorRegularizer.frozen_queries`, what the route gate reads);
* the routing term (``AnchorConfig.route_weight > 0``), added on every training forward: towards the adapted view on
  the batch's supervised tokens, towards the frozen view on every anchor (from the cached summaries, no model pass);
* the term itself (:meth:`~AnchorRegularizer.term`), one model pass through the dual pass as an
  :class:`~peft_imsm.dual_pass.AnchorPass` (the batch ``[anchors; anchors]``, the frozen half given);
* its state for save/load (:meth:`~AnchorRegularizer.state_dict` / :meth:`~AnchorRegularizer.load_state_dict`,
  called by ``IMSMModel``'s save/load hooks): the two counters, saved with the adapter under the keys
  ``base_model.imsm_anchor_draws`` / ``base_model.imsm_training_forwards``, so that a resumed run draws exactly the
  anchor batches, and anchors exactly the forwards, of the uninterrupted run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .anchors import AnchorConfig, AnchorSet, check_anchor_length, sample_self_anchors
from .backbone import model_device, position_limit
from .config import IMSMConfig
from .dual_pass import AnchorPass, DualPass, frozen_view
from .gate import IMSMGate
from .gate_stats import TrainingStats
from .losses import anchor_kl, anchor_kl_packed, gate_route_loss, micro_batch_share, supervised_gates
from .query import build_query_index, query_summary

# Key under which the number of anchor batches drawn so far is saved with the adapter (exact resumes).
DRAWS_KEY = "base_model.imsm_anchor_draws"
# Key of the number of training forwards that had the anchor term due (saved when AnchorConfig.every > 1).
FORWARDS_KEY = "base_model.imsm_training_forwards"
STATE_KEYS = (DRAWS_KEY, FORWARDS_KEY)


class AnchorRegularizer:
    """The anchor term of one IMSM model (see the module docstring).

    Args:
        model: the transformers causal LM (with the wrapped adapter injected and the dual pass installed).
        dual_pass: the model's :class:`~peft_imsm.dual_pass.DualPass`.
        get_config: returns the active adapter's :class:`~peft_imsm.IMSMConfig` (its ``anchor`` section and
            ``freeze_adapter`` are read at every use).
        get_gate: returns the active adapter's gate (the routing term's anchor part reads it directly).
        stats: where the anchor gate, the anchor KL and the task loss are summed for the Trainer's logs.

    Attributes:
        draws: anchor batches drawn so far; draw ``k`` takes :meth:`AnchorSet.rows` ``(k, batch_size)``. Saved with
            the adapter; set it to replay or skip anchor batches.
        forwards: training forwards with the term due so far (the term runs on every ``every``-th).
    """

    def __init__(
        self,
        model: nn.Module,
        dual_pass: DualPass,
        get_config: Callable[[], IMSMConfig],
        get_gate: Callable[[], IMSMGate],
        stats: TrainingStats,
    ) -> None:
        self._model = model
        self._dual_pass = dual_pass
        self._get_config = get_config
        self._get_gate = get_gate
        self._stats = stats
        self._anchors: AnchorSet | None = None
        self._frozen_hidden: torch.Tensor | None = None  # [num_anchors, length, d], of self._anchors
        self._frozen_queries: tuple | None = None  # (queries [num_anchors, d], mask), of self._anchors
        self.draws = 0
        self.forwards = 0

    @property
    def config(self) -> AnchorConfig | None:
        """The active adapter's anchor section (None: no anchor term)."""
        return self._get_config().anchor

    def add_to_loss(
        self, loss: torch.Tensor, labels: torch.Tensor | None, num_items_in_batch: Any, gates: list | None = None
    ) -> torch.Tensor:
        """``loss`` of a training forward, plus the term when it is due (every ``every``-th such forward), plus the
        routing term when ``gates`` are given: ``route_weight * (-log(1 - g))`` on the batch's supervised tokens and,
        for the route gate, ``route_weight * (-log g)`` on every anchor, on every forward (from the cached query
        summaries, :meth:`anchor_route_loss`: no model pass; so the router's optimiser sees both directions at every
        step, whatever ``every`` is). The query and token gates get their anchor side from :meth:`term`.

        Args:
            loss: the forward's (scalar) task loss.
            labels: ``[batch, seq]`` the forward's labels (``-100`` where unsupervised), or None.
            num_items_in_batch: the Trainer's supervised-token count across accumulated micro-batches, or None.
            gates: the forward's gates, collected with :func:`collecting` (when :attr:`routes`), or None.
        """
        config = self.config
        if config is None:
            return loss
        if gates:
            route = gate_route_loss(supervised_gates(gates, labels), to_frozen=False)
            if self._routes_from_queries:
                route = route + self.anchor_route_loss()
            loss = loss + config.route_weight * route * micro_batch_share(labels, num_items_in_batch, route.device)
        forward_number, self.forwards = self.forwards, self.forwards + 1
        if forward_number % config.every != 0:
            return loss
        if config.weight == 0 and not (self.routes and not self._routes_from_queries):
            return loss  # (no KL, and no routing term that needs the anchor pass's gates: nothing to run)
        return loss + self.term(labels, num_items_in_batch, loss)

    @property
    def routes(self) -> bool:
        """Whether the routing term is on (``AnchorConfig.route_weight > 0``): training forwards then collect their
        gates (:func:`collecting`) for :meth:`add_to_loss`."""
        config = self.config
        return config is not None and (config.route_weight or 0.0) > 0

    @property
    def _routes_from_queries(self) -> bool:
        """Whether the routing term's anchor part comes from the cached query summaries on every forward (the route
        gate, which reads the frozen view only) rather than from the anchor pass's gates (query and token gates)."""
        return self.routes and self._get_gate().mode == "route"

    # ------------------------------------------------------------------------------------------------ anchors
    def set_anchors(self, anchors: AnchorSet) -> None:
        """Use these anchors (checked against the model's position limit) from the next anchored forward on."""
        check_anchor_length(anchors.length, position_limit(self._model), self.config)
        self._anchors = anchors
        self._frozen_hidden = None
        self._frozen_queries = None

    def anchor_set(self) -> AnchorSet:
        """The anchors, sampled from the frozen view on first use when ``source="self"``."""
        if self._anchors is None:
            config = self.config
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
            check_anchor_length(start + config.sample_length, position_limit(self._model), config)
            with frozen_view():
                self.set_anchors(sample_self_anchors(self._model, config, model_device(self._model)))
        return self._anchors

    def frozen_states(self) -> torch.Tensor:
        """``[num_anchors, length, d]`` the frozen view's final hidden states of every anchor, computed on first use
        (in batches of ``AnchorConfig.batch_size``, as the term batches them) and kept until the anchors change: the
        frozen view does not change during training. Computed in eval mode: a KL target kept for the whole run must
        not be one draw of the base model's dropout. Anchors are used at their full padded width, so each row is
        always computed with the same padding."""
        anchors = self.anchor_set()
        if self._frozen_hidden is None:
            device = model_device(self._model)
            batch_size = self.config.batch_size
            parts = []
            was_training = self._model.training
            self._model.eval()
            try:
                for start in range(0, len(anchors), batch_size):
                    ids = anchors.input_ids[start : start + batch_size].to(device)
                    mask = anchors.attention_mask[start : start + batch_size].to(device)
                    parts.append(
                        self._dual_pass.frozen_states(self._model, input_ids=ids, attention_mask=mask, use_cache=False)
                    )
            finally:
                self._model.train(was_training)
            self._frozen_hidden = torch.cat(parts)
        return self._frozen_hidden

    def frozen_queries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[num_anchors, d]`` float32 query summaries of the frozen view of every anchor (the mean of
        :meth:`frozen_states` over its tokens, as the dual pass computes it for an anchor pass) and the anchors'
        ``[num_anchors, length]`` attention mask, both on the model's device, kept with the frozen states."""
        if self._frozen_queries is None:
            hidden = self.frozen_states()
            mask = self.anchor_set().attention_mask.to(hidden.device)
            index = build_query_index(hidden.shape[0], hidden.shape[1], hidden.device, attention_mask=mask)
            self._frozen_queries = (query_summary(hidden, index), mask)
        return self._frozen_queries

    def anchor_route_loss(self) -> torch.Tensor:
        """The route gate's part of the routing term on the anchors (a scalar with autograd through the gate):
        ``-log g`` of every anchor's gate, averaged over the anchor tokens. Reads the cached query summaries
        (:meth:`frozen_queries`): valid for a gate that reads only the frozen view's query summary. With
        ``weight=0`` (no anchor pass, which would log it) the anchor gate is logged from here."""
        gate = self._get_gate()
        queries, mask = self.frozen_queries()
        shape = (queries.shape[0], 1, queries.shape[1])
        g = gate(queries.view(shape), queries.view(shape), q_frozen=queries.view(shape))
        per_token = g[..., :1].expand(-1, mask.shape[1], -1)  # [anchors, length, 1]: one value per anchor
        if self.config.weight == 0:
            self._stats.add_gate("anchor_gate", per_token[..., 0], mask)
        return gate_route_loss([(per_token, mask)], to_frozen=True)

    # ------------------------------------------------------------------------------------------------ the term
    def term(self, labels: torch.Tensor | None, num_items_in_batch: Any, task_loss: torch.Tensor) -> torch.Tensor:
        """``weight * every * KL(p_frozen || p_imsm)`` (a scalar) on the next anchor batch (draw number ``draws``,
        then counted), scaled for gradient accumulation.

        With ``num_items_in_batch`` (the Trainer's token-normalised loss across accumulated micro-batches), the term
        is weighted by this micro-batch's share of the supervised tokens (from ``labels``, ``[batch, seq]``), so the
        accumulated total carries it once. The frozen view's states of the anchors are computed once
        (:meth:`frozen_states`); per term only the adapted view runs, without autograd in gate-only mode
        (``train_adapter=False``, or a frozen adapter, ``freeze_adapter=True``: only the gate and the frozen head are
        differentiated). ``task_loss`` is only logged. With ``route_weight > 0`` and a query or token gate the term
        also has the routing term's anchor part (the gate towards the frozen view on this batch's anchors; the route
        gate gets it on every forward from :meth:`add_to_loss`).
        """
        config = self.config
        anchors = self.anchor_set()
        device = model_device(self._model)
        rows = anchors.rows(self.draws, config.batch_size)
        self.draws += 1
        ids, mask = anchors.input_ids[rows].to(device), anchors.attention_mask[rows].to(device)
        # One model pass on rows [anchors; anchors]: the backbone runs the adapted view on the second half, the first
        # half gets the frozen view's cached final hidden states, and the model's own head turns them into the KL
        # target (the frozen logits) next to IMSM's logits.
        anchor = AnchorPass(
            h_frozen=self.frozen_states()[rows].to(device),
            adapted_without_grad=not config.train_adapter or self._get_config().freeze_adapter,
            # Anchors that share a prefix (self anchors from a chat template's user turn) run it once per batch.
            shared_prefix=anchors.prefix_worth_sharing(len(rows)),
        )
        on_gate = functools.partial(self._stats.observe_gate, stat="anchor_gate")
        gates = [] if self.routes and not self._routes_from_queries else None
        if gates is not None:
            on_gate = collecting(on_gate, gates)
        with self._dual_pass.call(anchor=anchor, on_gate=on_gate), torch.enable_grad():
            both = self._model(
                input_ids=torch.cat([ids, ids]), attention_mask=torch.cat([mask, mask]), use_cache=False
            )
        if anchor.packed_imsm is not None:  # the shared prefix ran once, through the head too: one packed row
            kl = anchor_kl_packed(both.logits[0], mask, anchor.shared_prefix, anchor.packed_imsm)
        else:
            kl = anchor_kl(both.logits[: len(rows)].detach(), both.logits[len(rows) :], mask)
        self._stats.add_anchored_forward(kl, task_loss)
        term = config.weight * kl
        if gates is not None:
            term = term + config.route_weight * gate_route_loss(gates, to_frozen=True)
        return config.every * term * micro_batch_share(labels, num_items_in_batch, kl.device)

    # ------------------------------------------------------------------------------------------------ save / load
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The counters to save with the adapter (int64 scalars under :data:`STATE_KEYS`): ``draws`` once one was
        drawn, ``forwards`` too when ``every > 1``; empty without an anchor section."""
        config = self.config
        if config is None or not self.draws:
            return {}
        state = {DRAWS_KEY: torch.tensor(self.draws, dtype=torch.int64)}
        if config.every > 1:
            state[FORWARDS_KEY] = torch.tensor(self.forwards, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Resume the counters from a saved adapter (a state without ``draws`` leaves them as they are). Saved with
        ``every == 1`` (no ``forwards``), the term ran on every forward: the next one is due after the draws."""
        draws = state.get(DRAWS_KEY)
        if draws is None:
            return
        forwards = state.get(FORWARDS_KEY)
        self.draws = int(draws)
        every = self.config.every if self.config is not None else 1
        self.forwards = int(forwards) if forwards is not None else int(draws) * every


def collecting(on_gate: Callable, into: list) -> Callable:
    """An ``on_gate`` callback (see ``CallContext.on_gate``) that calls ``on_gate`` and also keeps each pass's
    ``(gate, attention_mask)``, with autograd, in ``into`` (the routing term's input)."""

    def on_gate_and_keep(gate: torch.Tensor, attention_mask: torch.Tensor | None, call: Any) -> None:
        on_gate(gate, attention_mask, call)
        into.append((gate, attention_mask))

    return on_gate_and_keep
