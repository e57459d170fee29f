"""The IMSM gate: a plain torch module that mixes two memories of every token.

It knows nothing of peft or of generation: it takes the two views' final hidden states (and, in ``"query"`` mode,
the two views' query summaries; in ``"route"`` mode only the frozen view's query summary) and returns the per-token,
per-dimension gate ``g`` with which the interwoven memory is ``h = g * h_frozen + (1 - g) * h_adapted``.

The two views are named ``frozen`` (wrapped adapter off) and ``adapted`` (adapter on) throughout the package; the
paper (and ``IMSM-METHOD.md``) writes them ``h_base`` and ``h_tuned``.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

GateMode = Literal["query", "token", "fixed", "route"]
GATE_MODES: tuple[str, ...] = ("query", "token", "fixed", "route")
QUERY_MODES: tuple[str, ...] = ("query", "route")
"""The gate modes that read the query summary (computed at prefill, kept on the KV cache for the decode steps)."""
MAX_LR_SCALE = 1e6
"""The largest ``lr_scale`` (``IMSMConfig.gate_lr_scale``). The gate keeps ``W / lr_scale`` and multiplies its output
by ``lr_scale`` in float32 (largest value 3.4e38: above it both are inf or 0 and every gate is NaN); 1e6 keeps
both far inside float32's range, and an Adam step 1e6 times the learning rate is already far beyond what a gate
needs (the route gate's default is 100)."""


def check_lr_scale(value: object, name: str) -> None:
    """Refuse a gate ``lr_scale`` that is not a finite number in ``(0, MAX_LR_SCALE]`` (``name``: how the message
    calls it)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be None or a finite number > 0 (1: the paper's gate), got {value!r}.")
    if value > MAX_LR_SCALE:
        raise ValueError(
            f"{name} must be at most {MAX_LR_SCALE:g}, got {value!r}. The gate keeps its output projection (the "
            f"route gate's W_R, b_R) divided by {name} and multiplies its output by it, in float32, whose range ends "
            f"at 3.4e38 (beyond it every gate is NaN); and at {MAX_LR_SCALE:g} an Adam step already moves the gate "
            f"{MAX_LR_SCALE:g} times as far as the learning rate says. Use e.g. 100 (the route gate's default) or 1 "
            "(the paper's gate)."
        )


class IMSMGate(nn.Module):
    """Query-aware gate of IMSM (Song et al., AAAI 2025).

    ``g[t] = sigmoid(dropout(dropout(concat(q_frozen, h_frozen[t], h_adapted[t], q_adapted) @ W_A) @ W_B))``

    Args:
        hidden_size: ``d``, the size of the final hidden states.
        rank: ``r``, the inner size of the low-rank gate projection.
        mode: ``"query"`` (the paper's gate, input ``4d``), ``"token"`` (the paper's "w/o query" ablation, input
            ``concat(h_frozen[t], h_adapted[t])`` of size ``2d``), ``"fixed"`` (the "w/o gate" ablation: ``g = 0.5``,
            no parameters) or ``"route"``: one value per query, ``g = sigmoid(q_frozen @ W_R + b_R)``, a logistic
            router over the frozen view's query summary (which the adapter does not move), zero-initialised
            (``g = 0.5``), without dropout; ``rank``, ``scalar`` and ``dropout`` do not apply. It is trained by the
            routing term (``AnchorConfig.route_weight``) to send general queries to the frozen view.
        dropout: dropout probability applied after each projection, as in the authors' code.
        scalar: one gate value per token (``W_B: r x 1``, broadcast over the ``d`` dimensions), so ``h`` is a convex
            mix of the two views' states, instead of the paper's one value per dimension (``W_B: r x d``).
        lr_scale: ``k``: ``W_B`` (the router ``W_R``, ``b_R``) is stored divided by ``k`` and its output multiplied
            by ``k``. The gate is the same function at initialisation, and an Adam-type optimizer moves it ``k`` times
            faster (as a ``k`` times larger learning rate would). 1 (the default) is the paper's gate.
            :meth:`projections` and :meth:`router` give the effective weights.

    The gate always computes in float32 (its weights are kept in float32 and autocast is disabled inside), whatever
    the dtype of the model it is attached to.
    """

    def __init__(
        self,
        hidden_size: int,
        rank: int = 8,
        mode: GateMode = "query",
        dropout: float = 0.1,
        scalar: bool = False,
        lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if mode not in GATE_MODES:
            raise ValueError(f"Unknown gate mode {mode!r}; choose one of {GATE_MODES}.")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"The gate rank must be an integer >= 1, got {rank!r}.")
        check_lr_scale(lr_scale, "lr_scale")
        self.hidden_size = hidden_size
        self.rank = rank
        self.mode = mode
        self.scalar = scalar
        self.lr_scale = float(lr_scale)
        #: When set to a float in [0, 1], the gate returns this constant instead of its learned value (for analysis
        #: and tests: 1.0 gives the frozen view, 0.0 the adapted view).
        self.forced_value: float | None = None
        self.W_A = self.W_B = self.W_R = None
        if mode == "route":
            self.W_R = nn.Linear(hidden_size, 1, bias=True, dtype=torch.float32)
            with torch.no_grad():
                self.W_R.weight.zero_()
                self.W_R.bias.zero_()
        elif mode != "fixed":
            in_features = (4 if mode == "query" else 2) * hidden_size
            self.W_A = nn.Linear(in_features, rank, bias=False, dtype=torch.float32)
            self.W_B = nn.Linear(rank, 1 if scalar else hidden_size, bias=False, dtype=torch.float32)
            if self.lr_scale != 1.0:
                with torch.no_grad():
                    self.W_B.weight.div_(self.lr_scale)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        h_frozen: torch.Tensor,
        h_adapted: torch.Tensor,
        q_frozen: torch.Tensor | None = None,
        q_adapted: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute the gate.

        Args:
            h_frozen: ``[batch, seq, d]`` final hidden states of the frozen view.
            h_adapted: ``[batch, seq, d]`` final hidden states of the adapted view.
            q_frozen: ``[batch, seq, d]`` query summary of the frozen view for each position (needed in the query
                and route modes).
            q_adapted: ``[batch, seq, d]`` query summary of the adapted view for each position (needed in query mode).

        Returns:
            ``[batch, seq, d]`` float32 gate values in ``[0, 1]``; the weight of the frozen view.
        """
        if self.forced_value is not None:
            return torch.full(h_adapted.shape, float(self.forced_value), dtype=torch.float32, device=h_adapted.device)
        if self.mode == "fixed":
            return torch.full(h_adapted.shape, 0.5, dtype=torch.float32, device=h_adapted.device)
        if self.mode == "route":
            if q_frozen is None:
                raise ValueError("The route-mode gate needs the frozen view's query summary q_frozen.")
            with torch.autocast(device_type=h_adapted.device.type, enabled=False):
                logit = F.linear(q_frozen.float(), self.W_R.weight.float(), self.W_R.bias.float()) * self.lr_scale
                return torch.sigmoid(logit).expand(*h_adapted.shape[:-1], self.hidden_size)
        if self.mode == "query":
            if q_frozen is None or q_adapted is None:
                raise ValueError("The query-mode gate needs the query summaries q_frozen and q_adapted.")
            parts = (q_frozen, h_frozen, h_adapted, q_adapted)
        else:
            parts = (h_frozen, h_adapted)
        with torch.autocast(device_type=h_adapted.device.type, enabled=False):
            x = torch.cat([p.float() for p in parts], dim=-1)
            x = self.dropout(F.linear(x, self.W_A.weight.float()))
            x = self.dropout(F.linear(x, self.W_B.weight.float()) * self.lr_scale)
            return torch.sigmoid(x).expand(*h_adapted.shape[:-1], self.hidden_size)

    def projections(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The effective ``(W_A, W_B)`` weights (``[r, in]``, ``[d or 1, r]``, float32, detached; ``W_B`` times
        ``lr_scale``): ``g = sigmoid(x @ W_A.T @ W_B.T)`` without dropout. None for the fixed gate."""
        if self.W_A is None:
            return None
        return self.W_A.weight.detach().float(), self.W_B.weight.detach().float() * self.lr_scale

    def router(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The route mode's effective ``(W_R, b_R)`` (``[1, d]``, ``[1]``, float32, detached; times ``lr_scale``):
        ``g = sigmoid(q_frozen @ W_R.T + b_R)``. None for the other modes."""
        if self.W_R is None:
            return None
        return self.W_R.weight.detach().float() * self.lr_scale, self.W_R.bias.detach().float() * self.lr_scale

    @property
    def reads_query(self) -> bool:
        """Whether the gate reads the query summaries (the query and route modes)."""
        return self.mode in QUERY_MODES

    @staticmethod
    def interweave(h_frozen: torch.Tensor, h_adapted: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """``g * h_frozen + (1 - g) * h_adapted``, computed in float32 and cast back to ``h_adapted``'s dtype.

        ``torch.lerp`` is exact at both ends: ``g = 0`` returns ``h_adapted`` and ``g = 1`` returns ``h_frozen``, and
        equal views give that view back whatever the gate.
        """
        return torch.lerp(h_adapted.float(), h_frozen.float(), gate).to(h_adapted.dtype)

    def extra_repr(self) -> str:
        scale = f", lr_scale={self.lr_scale:g}" if self.lr_scale != 1.0 else ""
        return f"hidden_size={self.hidden_size}, rank={self.rank}, mode={self.mode!r}, scalar={self.scalar}{scale}"


def choose_routes(gates: list[IMSMGate], q_frozen: torch.Tensor, threshold: float) -> torch.Tensor:
    """The one view each query runs under hard routing (``IMSMConfig.route_threshold``).

    Args:
        gates: the route gates of the active adapters (one, or several for a LoRA library), in routing order.
        q_frozen: ``[n, d]`` the frozen view's query summaries.
        threshold: ``route_threshold``.

    Returns:
        ``[n]`` long: -1 where every gate's router value ``g`` (the frozen view's weight against its adapter) is above
        ``threshold`` (the frozen view answers), else the index of the gate with the smallest ``g`` (the adapter its
        router leans to most). With one gate: -1 where ``g > threshold``, else 0.
    """
    values = []
    for gate in gates:
        W_R, b_R = gate.router()
        with torch.autocast(device_type=q_frozen.device.type, enabled=False):
            values.append(torch.sigmoid(F.linear(q_frozen.float(), W_R.to(q_frozen.device), b_R.to(q_frozen.device))))
    g = torch.cat(values, dim=-1)  # [n, K]
    frozen = (g > threshold).all(dim=-1)
    return torch.where(frozen, torch.full_like(frozen, -1, dtype=torch.long), g.argmin(dim=-1))
