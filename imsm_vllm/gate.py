"""IMSM's gate inside vLLM, and the query summary read from vLLM's own paged KV cache.

:class:`Gate` is ``peft_imsm.gate.IMSMGate`` at inference (no dropout), computed in float32:
``g = sigmoid(concat(...) @ W_A^T @ W_B^T)`` with ``concat(q_frozen, h_frozen, h_adapted, q_adapted)`` (``query``)
or ``concat(h_frozen, h_adapted)`` (``token``), ``g = sigmoid(q_frozen @ W_R^T + b_R)`` (``route``), ``g = 0.5``
(``fixed``); the mix is
``lerp(h_adapted, h_frozen, g) = g * h_frozen + (1 - g) * h_adapted``, as in ``IMSMGate.interweave``.

:class:`QuerySummary` gives every token its request's query summary (mean final hidden state of one view over the
request's prompt tokens) without any per-request state outside vLLM: extra vLLM ``Attention`` layers (so the paged
cache, chunked prefill, preemption and continuous batching all apply) whose VALUES are the view's final hidden states
and whose KEYS mark prompt tokens (score 0) against generated ones (score -1e4, weight exactly 0 after softmax),
queried with a constant query. Softmax then gives equal weights to the prompt tokens a token can see: at the last
prompt token (which samples the first generated token) and at every generated token that is the whole prompt, i.e.
exactly the summary ``peft_imsm`` computes at prefill and keeps. (At earlier prompt positions it is the mean of the
prompt so far; vLLM samples nothing there, but prompt logprobs in query mode use it.) The layers copy the decoder
layers' KV-cache shape (``num_kv_heads`` x ``head_dim``, same query heads) so vLLM puts them in the same cache group;
``ceil(d / (num_kv_heads * head_dim))`` of them per view hold the ``d`` values of a token. Which tokens are prompt
tokens comes from :mod:`imsm_vllm.prompt_lengths`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .export_format import ADAPTER_FILE, GATE_MODES, GATE_TENSORS

QUERY_VIEWS = {"query": ("frozen", "adapted"), "route": ("frozen",)}
"""The views whose query summary each gate mode reads."""
_GENERATED_KEY = -1.0e4  # the score of a generated token: exp(-1e4) is exactly 0 in float32 and bfloat16


class Gate(nn.Module):
    """The gate of an exported IMSM adapter (weights set by :meth:`load`, float32)."""

    def __init__(self, mode: str, hidden_size: int, rank: int, scalar: bool) -> None:
        super().__init__()
        if mode not in GATE_MODES:
            raise ValueError(f"Unknown IMSM gate_mode {mode!r} in config.json; expected one of {GATE_MODES}.")
        self.mode, self.hidden_size, self.rank, self.scalar = mode, hidden_size, rank, scalar
        self.register_buffer("W_A", None, persistent=False)
        self.register_buffer("W_B", None, persistent=False)
        self.register_buffer("W_R", None, persistent=False)
        self.register_buffer("b_R", None, persistent=False)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{key: shape}`` of this gate's tensors in the adapter file (the keys of ``GATE_TENSORS[mode]``)."""
        if self.mode == "fixed":
            shapes = ()
        elif self.mode == "route":
            shapes = ((1, self.hidden_size), (1,))
        else:
            width = (4 if self.mode == "query" else 2) * self.hidden_size
            shapes = ((self.rank, width), (1 if self.scalar else self.hidden_size, self.rank))
        return dict(zip(GATE_TENSORS[self.mode], shapes, strict=True))

    def load(self, tensors: dict[str, torch.Tensor], device: torch.device) -> set[str]:
        """Take the gate's tensors (``GATE_TENSORS[mode]``) from ``tensors``; returns the names used."""
        for key, shape in self.expected_shapes().items():
            value = tensors.get(key)
            if value is None or tuple(value.shape) != shape:
                got = "missing" if value is None else f"shape {tuple(value.shape)}"
                raise ValueError(
                    f"{ADAPTER_FILE}: {key} is {got}, but gate_mode={self.mode!r}, gate_rank={self.rank}, "
                    f"gate_scalar={self.scalar} on hidden size {self.hidden_size} needs {shape}. The folder's "
                    "config.json and adapter file do not belong together: run imsm-export again."
                )
            setattr(self, key.rsplit(".", 1)[1], value.to(device=device, dtype=torch.float32))
        return set(self.expected_shapes())

    def forward(self, h_frozen: torch.Tensor, h_adapted: torch.Tensor, q_frozen: torch.Tensor | None = None,
                q_adapted: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """The interwoven state ``[n, d]`` (dtype of ``h_adapted``) from the two views' ``[n, d]`` states."""
        if self.mode == "fixed":
            g = torch.full(h_adapted.shape, 0.5, dtype=torch.float32, device=h_adapted.device)
        elif self.mode == "route":
            g = torch.sigmoid(F.linear(q_frozen.float(), self.W_R, self.b_R)).expand(*h_adapted.shape[:-1], -1)
        else:
            parts = (q_frozen, h_frozen, h_adapted, q_adapted) if self.mode == "query" else (h_frozen, h_adapted)
            x = torch.cat([p.float() for p in parts], dim=-1)
            x = F.linear(F.linear(x, self.W_A), self.W_B)
            g = torch.sigmoid(x).expand(*h_adapted.shape[:-1], self.hidden_size)
        return torch.lerp(h_adapted.float(), h_frozen.float(), g).to(h_adapted.dtype)


class QuerySummary(nn.Module):
    """Per view, the attention layers that average its final hidden states over each request's prompt tokens."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, cache_config,
                 prefix: str, views: tuple[str, ...] = ("frozen", "adapted")) -> None:  # fmt: skip
        super().__init__()
        from vllm.model_executor.layers.attention import Attention

        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = (
            hidden_size,
            num_heads,
            num_kv_heads,
            head_dim,
        )
        self.chunk = num_kv_heads * head_dim
        self.num_chunks = math.ceil(hidden_size / self.chunk)
        self.group = num_heads // num_kv_heads
        self.views = nn.ModuleDict()
        for view in views:
            self.views[view] = nn.ModuleList(
                Attention(num_heads, head_dim, 1.0, num_kv_heads=num_kv_heads, cache_config=cache_config,
                          prefix=f"{prefix}.{view}.{i}")
                for i in range(self.num_chunks)
            )  # fmt: skip
        self.first_layer_name = f"{prefix}.frozen.0"

    def forward(self, h: torch.Tensor, view: str, is_prompt: torch.Tensor | None) -> torch.Tensor:
        """``[n, d]`` float summaries of the ``[n, d]`` final hidden states ``h`` of ``view``."""
        n = h.shape[0]
        query = h.new_zeros(n, self.num_heads, self.head_dim)
        query[..., 0] = 1.0
        key = h.new_zeros(n, self.num_kv_heads, self.head_dim)
        if is_prompt is not None:
            key[..., 0] = torch.where(is_prompt, 0.0, _GENERATED_KEY).to(h.dtype)[:, None]
        padded = F.pad(h, (0, self.num_chunks * self.chunk - self.hidden_size)) if self.hidden_size % self.chunk else h
        heads = torch.arange(0, self.num_heads, self.group, device=h.device)  # one query head per KV head
        outs = []
        for i, layer in enumerate(self.views[view]):
            value = padded[:, i * self.chunk : (i + 1) * self.chunk].contiguous()
            out = layer(query, key, value).view(n, self.num_heads, self.head_dim)
            outs.append(out.index_select(1, heads).reshape(n, self.chunk))
        return torch.cat(outs, dim=-1)[:, : self.hidden_size]
