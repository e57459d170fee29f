"""The gate's figures: what ``record_gate`` collects, and the sums behind the Trainer's logged means.

* :func:`record_gate` (``IMSMModel.record_gate``): a per-thread list that receives the gate of every IMSM forward
  inside the block (a ``ContextVar``, so concurrent threads each see their own).
* :class:`TrainingStats`: device-tensor sums of the gate on the supervised tokens of training forwards and on the
  anchors, and of the anchor KL and task loss, read and reset by :meth:`TrainingStats.pop` (what
  ``IMSMModel.pop_training_stats`` returns, and ``IMSMLogCallback`` logs).

:meth:`TrainingStats.observe_gate` is the dual pass's ``on_gate`` callback (see ``CallContext.on_gate``): it runs
after every interwoven backbone pass and feeds both. The supervised tokens are
:func:`peft_imsm.losses.predicts_supervised`'s, the same as the routing term's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from .losses import predicts_supervised

_GATE_RECORDERS: ContextVar[tuple] = ContextVar("imsm_gate_recorders", default=())


@contextmanager
def record_gate(per_token: bool = False) -> Iterator[list[torch.Tensor]]:
    """Collect the gate of every IMSM forward inside the block, in this thread only (see ``IMSMModel.record_gate``).

    Yields a list that receives one float32 CPU tensor per forward (per step in ``generate()``): ``[batch]`` row
    means over the non-padding positions, or ``[batch, seq]`` per position with ``per_token=True``.
    """
    log: list[torch.Tensor] = []
    token = _GATE_RECORDERS.set((*_GATE_RECORDERS.get(), (log, per_token)))
    try:
        yield log
    finally:
        _GATE_RECORDERS.reset(token)


class TrainingStats:
    """Sums for the Trainer's logs since the last :meth:`pop`.

    The sums are device tensors (a training step never waits for the device to read them back), in float64 (float32
    on MPS, which has no float64).
    """

    def __init__(self) -> None:
        self._sums: dict[str, Any] = {}

    def observe_gate(
        self,
        gate: torch.Tensor,
        attention_mask: torch.Tensor | None,
        call: Any,
        labels: torch.Tensor | None = None,
        stat: str = "gate",
    ) -> None:
        """After each interwoven pass: feed :func:`record_gate` and, in training, the logged mean gate.

        Args:
            gate: ``[batch, seq, d]`` (or ``[batch, seq, 1]``) the gate of the pass.
            attention_mask: ``[batch, seq]`` of the pass, or None.
            call: the pass's ``CallContext`` (unused: the signature of ``CallContext.on_gate``).
            labels: ``[batch, seq]`` (training forwards only) select the supervised tokens: the gate at position
                ``t`` makes the logits that predict token ``t + 1``, so position ``t`` counts when
                ``labels[t + 1] != -100``.
            stat: ``"gate"`` (training forwards) or ``"anchor_gate"`` (the anchor term: every non-padding position).
        """
        gate = gate.detach()
        recorders = _GATE_RECORDERS.get()
        if not recorders and labels is None and stat != "anchor_gate":
            return  # (generation and evaluation outside record_gate: nothing to compute at this decode step)
        per_position = gate.mean(dim=-1)  # [batch, seq]
        for log, per_token in recorders:
            log.append(per_position.float().cpu() if per_token else _row_means(per_position, attention_mask))
        weights = None
        if labels is not None and labels.shape == per_position.shape:
            weights = predicts_supervised(labels).to(per_position.dtype)
        elif stat == "anchor_gate" and attention_mask is not None:
            weights = attention_mask.to(per_position.dtype)
        if weights is not None:
            self.add_gate(stat, per_position, weights)

    def add_gate(self, stat: str, per_position: torch.Tensor, weights: torch.Tensor) -> None:
        """Add gate values to the weighted mean ``{stat}_mean`` (``"gate"`` or ``"anchor_gate"``).

        Args:
            per_position: the gate, one value per position (any shape).
            weights: the positions' weights (the same shape), e.g. 1 on the tokens that count.
        """
        per_position = per_position.detach()
        self.add(f"{stat}_sum", (per_position * weights).sum())
        self.add(f"{stat}_count", weights.sum())

    def add(self, name: str, value: torch.Tensor) -> None:
        """Add a scalar tensor (detached) to the sum ``name``."""
        sum_dtype = torch.float32 if value.device.type == "mps" else torch.float64  # (MPS has no float64)
        self._sums[name] = self._sums.get(name, 0.0) + value.detach().to(sum_dtype)

    def add_anchored_forward(self, kl: torch.Tensor, task_loss: torch.Tensor) -> None:
        """One anchored training forward: its anchor KL (before weighting) and its task loss."""
        self.add("anchor_kl", kl)
        self.add("task_loss", task_loss)
        self._sums["anchor_forwards"] = self._sums.get("anchor_forwards", 0) + 1

    def pop(self) -> dict[str, float]:
        """The means since the last call (``gate_mean``, ``anchor_gate_mean``, ``anchor_kl``, ``task_loss``; keys
        without data left out), and reset the sums. Reads the sums back from the device."""
        stats, self._sums = self._sums, {}
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


def _row_means(per_position: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[batch, seq]`` gate -> ``[batch]`` float32 CPU means over the non-padding positions."""
    if attention_mask is None:
        return per_position.float().mean(dim=1).cpu()
    mask = attention_mask.to(per_position.dtype)
    return ((per_position * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).float().cpu()
