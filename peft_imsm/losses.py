"""IMSM's loss terms, in one place (a leaf module: it imports torch only).

``g`` is the gate: the mix is ``g * h_frozen + (1 - g) * h_adapted`` (:meth:`peft_imsm.gate.IMSMGate.interweave`),
so ``g = 1`` is the frozen view and ``g = 0`` the adapted one. ``ḡ_t`` is position ``t``'s gate averaged over its
last dimension.

* The anchor KL, :func:`anchor_kl`: ``sum_t m_t KL(p_frozen,t || p_imsm,t) / max(1, sum_t m_t)`` over the anchor
  tokens (``m``: the anchors' attention mask). :func:`anchor_kl_packed` is the same term when the anchors share a
  prefix and the anchor pass ran it once; its logits come from the packed row that :func:`pack_rows` builds (called
  by the dual pass's post-hook, :mod:`peft_imsm.dual_pass`).
* The routing term, :func:`gate_route_loss`: ``sum_t w_t (-log ḡ_t) / max(1, sum_t w_t)`` towards the frozen view
  (on anchors), ``sum_t w_t (-log(1 - ḡ_t)) / max(1, sum_t w_t)`` towards the adapted view (on the training batch),
  ``ḡ_t`` clamped to ``[1e-6, 1 - 1e-6]``. On the training batch the weights ``w`` are
  :func:`supervised_gates`: the positions that predict a supervised token (:func:`predicts_supervised`; the same
  positions make the logged ``gate_mean``, :class:`peft_imsm.gate_stats.TrainingStats`).
* :func:`micro_batch_share`: the factor that makes a per-micro-batch term count once under the Trainer's gradient
  accumulation (``num_items_in_batch``).

Where they are added to the loss:

* Training with the Trainer (``AnchorRegularizer`` in :mod:`peft_imsm.anchor_term`): on the forwards the anchor term
  is due (every ``AnchorConfig.every``-th), ``every * weight * anchor_kl * share`` (:func:`anchor_kl_packed` when the
  anchors share a prefix); with ``route_weight > 0``, on every training forward, ``route_weight * share *
  (gate_route_loss(supervised_gates(...), to_frozen=False) + anchor part)``, the anchor part (``to_frozen=True``)
  from the cached query summaries for the route gate (``AnchorRegularizer.anchor_route_loss``), else from the
  anchor pass's gates inside the anchor term (``every * route_weight * gate_route_loss(..., to_frozen=True) *
  share``).
* :func:`peft_imsm.train_gate` (:mod:`peft_imsm.gate_training`, on stored states, every token of a sampled batch
  weighted 1): ``task cross-entropy + route_weight * (gate_route_loss(target, False) + gate_route_loss(anchors,
  True)) + anchor_weight * anchor_kl``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def predicts_supervised(labels: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` bool: the positions whose logits predict a supervised token (``labels[t + 1] != -100``), the
    tokens the loss is made of.

    Args:
        labels: ``[batch, seq]`` token ids, ``-100`` where unsupervised.
    """
    weights = torch.zeros_like(labels, dtype=torch.bool)
    weights[:, :-1] = labels[:, 1:] != -100
    return weights


def anchor_kl(frozen_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``KL(p_frozen || p)`` per token, averaged over the tokens where ``mask`` is 1 (a float32 scalar).

    Args:
        frozen_logits, logits: ``[batch, seq, vocab]``.
        mask: ``[batch, seq]``.
    """
    log_p = F.log_softmax(logits.float(), dim=-1)
    log_q = F.log_softmax(frozen_logits.float(), dim=-1)
    per_token = (log_q.exp() * (log_q - log_p)).sum(dim=-1)
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp(min=1)


def pack_rows(h_frozen: torch.Tensor, mixed: torch.Tensor, prefix: int, imsm_rows_alike: bool) -> torch.Tensor:
    """The anchor pass's output when its rows share their first ``prefix`` tokens: ``[1, F + M, d]``, the frozen
    half (``h_frozen``, ``[rows, seq, d]``) packed as ``[prefix of row 0, rest of row 0, rest of row 1, ...]``
    (``F = prefix + rows * (seq - prefix)`` tokens), then IMSM's half (``mixed``, ``[rows, seq, d]``), packed the same
    way when ``imsm_rows_alike`` (``M = F``), else every row in full (``M = rows * seq``). The head is position-wise,
    so its logits keep this layout, which :func:`anchor_kl_packed` reads."""

    def packed(h: torch.Tensor) -> torch.Tensor:
        return torch.cat([h[0, :prefix], h[:, prefix:].reshape(-1, h.shape[-1])])

    imsm = packed(mixed) if imsm_rows_alike else mixed.reshape(-1, mixed.shape[-1])
    return torch.cat([packed(h_frozen).to(mixed.dtype), imsm]).unsqueeze(0)


def anchor_kl_packed(logits: torch.Tensor, mask: torch.Tensor, prefix: int, imsm_packed: bool) -> torch.Tensor:
    """:func:`anchor_kl` of an anchor pass whose rows share their first ``prefix`` tokens, from the head's logits of
    the packed row (:func:`pack_rows`): the frozen half ``[prefix, rest of each row]``
    (``F = prefix + rows * (seq - prefix)`` tokens), then IMSM's half, packed the same way (``imsm_packed``) or every
    row in full. Equal to :func:`anchor_kl` of the unpacked rows up to float rounding: a packed prefix token counts
    once per row.

    Args:
        logits: ``[F + M, vocab]`` (the frozen half is detached here).
        mask: ``[rows, seq]``, the anchors' attention mask (all ones over the prefix).
        prefix: the shared prefix's length.
        imsm_packed: whether IMSM's half is packed (``M = F``) or full (``M = rows * seq``).
    """
    rows, seq = mask.shape
    packed = prefix + rows * (seq - prefix)
    log_q = F.log_softmax(logits[:packed].detach().float(), dim=-1)
    log_p = F.log_softmax(logits[packed:].float(), dim=-1)
    weights = mask.to(log_q.dtype)
    if imsm_packed:
        weights = torch.cat([weights[:, :prefix].sum(dim=0), weights[:, prefix:].reshape(-1)])
    else:
        vocab = log_q.shape[-1]
        log_q = torch.cat([log_q[:prefix].expand(rows, prefix, vocab), log_q[prefix:].view(rows, -1, vocab)], dim=1)
        log_p = log_p.view(rows, seq, vocab)
    per_token = (log_q.exp() * (log_q - log_p)).sum(dim=-1)
    return (per_token * weights).sum() / weights.sum().clamp(min=1)


def gate_route_loss(gates: list[tuple[torch.Tensor, torch.Tensor | None]], to_frozen: bool) -> torch.Tensor:
    """The routing term's part of one call: ``-log g`` (``to_frozen``: towards the frozen view) or ``-log(1 - g)``
    (towards the adapted view) of each token's mean gate, averaged over the weighted tokens (a float32 scalar).

    Args:
        gates: per interwoven pass, ``(gate, weights)``: the gate ``[batch, seq, d]`` (or ``[batch, seq, 1]``) with
            autograd, and ``[batch, seq]`` token weights (None: every token counts).
        to_frozen: the direction (True on anchors, False on the training batch).
    """
    total = count = 0.0
    for gate, weights in gates:
        per_token = gate.float().mean(dim=-1).clamp(1e-6, 1 - 1e-6)
        nll = -(per_token.log() if to_frozen else (1 - per_token).log())
        weights = torch.ones_like(nll) if weights is None else weights.to(nll.dtype)
        total = total + (nll * weights).sum()
        count = count + weights.sum()
    return total / torch.as_tensor(count).clamp(min=1)


def supervised_gates(gates: list, labels: torch.Tensor | None) -> list:
    """The training batch's gates weighted by the positions that predict a supervised token (``labels[t + 1] !=
    -100``; the attention mask where labels do not fit): the input of :func:`gate_route_loss` towards the adapted
    view.

    Args:
        gates: per interwoven pass, ``(gate, attention_mask)``: the gate ``[batch, seq, d]`` and the pass's
            ``[batch, seq]`` attention mask (or None).
        labels: ``[batch, seq]`` the forward's labels (``-100`` where unsupervised), or None.
    """
    weighted = []
    for gate, mask in gates:
        weights = mask
        if labels is not None and labels.shape == gate.shape[:2]:
            weights = predicts_supervised(labels)
        weighted.append((gate, weights))
    return weighted


def micro_batch_share(labels: torch.Tensor | None, num_items_in_batch: Any, device: torch.device) -> Any:
    """This micro-batch's share of the supervised tokens of the Trainer's accumulated batch (1 without
    ``num_items_in_batch``), so that a per-micro-batch term is carried once by the accumulated total.

    Args:
        labels: ``[batch, seq]`` the micro-batch's labels (``-100`` where unsupervised), or None.
        num_items_in_batch: the Trainer's supervised-token count across the accumulated micro-batches, or None.
        device: where the (scalar) share is computed.
    """
    if num_items_in_batch is None or labels is None:
        return 1.0
    supervised = (labels[..., 1:] != -100).sum()
    return supervised.to(device).float() / torch.as_tensor(num_items_in_batch, device=device).float()
