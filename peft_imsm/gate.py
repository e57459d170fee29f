"""The IMSM gate: a plain torch module that mixes two memories of every token.

It knows nothing of peft or of generation: it takes the two views' final hidden states (and, in ``"query"`` mode,
the two views' query summaries) and returns the per-token, per-dimension gate ``g`` with which the interwoven memory
is ``h = g * h_base + (1 - g) * h_tuned``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

GateMode = Literal["query", "token", "fixed"]
GATE_MODES: tuple[str, ...] = ("query", "token", "fixed")


class IMSMGate(nn.Module):
    """Query-aware gate of IMSM (Song et al., AAAI 2025).

    ``g[t] = sigmoid(dropout(dropout(concat(q_base, h_base[t], h_tuned[t], q_tuned) @ W_A) @ W_B))``

    Args:
        hidden_size: ``d``, the size of the final hidden states.
        rank: ``r``, the inner size of the low-rank gate projection.
        mode: ``"query"`` (the paper's gate, input ``4d``), ``"token"`` (the paper's "w/o query" ablation, input
            ``concat(h_base[t], h_tuned[t])`` of size ``2d``) or ``"fixed"`` (the "w/o gate" ablation: ``g = 0.5``,
            no parameters).
        dropout: dropout probability applied after each projection, as in the authors' code.

    The gate always computes in float32 (its weights are kept in float32 and autocast is disabled inside), whatever
    the dtype of the model it is attached to.
    """

    def __init__(self, hidden_size: int, rank: int = 8, mode: GateMode = "query", dropout: float = 0.1) -> None:
        super().__init__()
        if mode not in GATE_MODES:
            raise ValueError(f"Unknown gate mode {mode!r}; choose one of {GATE_MODES}.")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"The gate rank must be an integer >= 1, got {rank!r}.")
        self.hidden_size = hidden_size
        self.rank = rank
        self.mode = mode
        #: When set to a float in [0, 1], the gate returns this constant instead of its learned value (for analysis
        #: and tests: 1.0 gives the frozen view, 0.0 the adapted view).
        self.forced_value: float | None = None
        if mode == "fixed":
            self.W_A = None
            self.W_B = None
        else:
            in_features = (4 if mode == "query" else 2) * hidden_size
            self.W_A = nn.Linear(in_features, rank, bias=False, dtype=torch.float32)
            self.W_B = nn.Linear(rank, hidden_size, bias=False, dtype=torch.float32)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        h_base: torch.Tensor,
        h_tuned: torch.Tensor,
        q_base: torch.Tensor | None = None,
        q_tuned: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute the gate.

        Args:
            h_base: ``[batch, seq, d]`` final hidden states of the frozen view.
            h_tuned: ``[batch, seq, d]`` final hidden states of the adapted view.
            q_base: ``[batch, seq, d]`` query summary of the frozen view for each position (needed in query mode).
            q_tuned: ``[batch, seq, d]`` query summary of the adapted view for each position (needed in query mode).

        Returns:
            ``[batch, seq, d]`` float32 gate values in ``[0, 1]``; the weight of the frozen view.
        """
        if self.forced_value is not None:
            return torch.full(h_tuned.shape, float(self.forced_value), dtype=torch.float32, device=h_tuned.device)
        if self.mode == "fixed":
            return torch.full(h_tuned.shape, 0.5, dtype=torch.float32, device=h_tuned.device)
        if self.mode == "query":
            if q_base is None or q_tuned is None:
                raise ValueError("The query-mode gate needs the query summaries q_base and q_tuned.")
            parts = (q_base, h_base, h_tuned, q_tuned)
        else:
            parts = (h_base, h_tuned)
        with torch.autocast(device_type=h_tuned.device.type, enabled=False):
            x = torch.cat([p.float() for p in parts], dim=-1)
            x = self.dropout(F.linear(x, self.W_A.weight.float()))
            x = self.dropout(F.linear(x, self.W_B.weight.float()))
            return torch.sigmoid(x)

    @staticmethod
    def interweave(h_base: torch.Tensor, h_tuned: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """``g * h_base + (1 - g) * h_tuned``, computed in float32 and cast back to ``h_tuned``'s dtype.

        ``torch.lerp`` is exact at both ends: ``g = 0`` returns ``h_tuned`` and ``g = 1`` returns ``h_base``, and
        equal views give that view back whatever the gate.
        """
        return torch.lerp(h_tuned.float(), h_base.float(), gate).to(h_tuned.dtype)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, rank={self.rank}, mode={self.mode!r}"
