"""Which tokens are the query, and the query summary (the mean final hidden state over them).

Rule (the same in training and in generation, so that both give the same logits):

* A sequence is a row of the batch or, in padding-free packed batches (``position_ids`` given, no attention mask),
  each run of tokens whose ``position_ids`` restart at 0.
* With ``labels``: the query is the non-padding tokens of the sequence before its first supervised token (the first
  position after the sequence start whose label is not ``-100``): the prompt.
* Without ``labels``: the query is every non-padding input token of the sequence; in ``generate()`` it is the prompt
  (the tokens before ``prompt_length``), computed once at prefill and reused at every step.
* A sequence with no query token under these rules (every token supervised, plain language modelling) uses its first
  non-padding token as the query, exactly as a generation from a one-token prompt would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class QueryIndex:
    """Where the query tokens are.

    Attributes:
        segment: ``[batch, seq]`` long, the global id of the sequence each token belongs to.
        mask: ``[batch, seq]`` bool, True at query tokens.
        num_segments: number of distinct sequence ids.
        one_per_row: True when every row is a single sequence (no packing); then ``segment[b] == b``.
    """

    segment: torch.Tensor
    mask: torch.Tensor
    num_segments: int
    one_per_row: bool


def _segment_cumsum(x: torch.Tensor, start_of: torch.Tensor) -> torch.Tensor:
    """Inclusive cumulative sum of ``x`` ([batch, seq] long) restarting at each segment start."""
    inclusive = x.cumsum(dim=1)
    exclusive = inclusive - x
    return inclusive - exclusive.gather(1, start_of)


def check_attention_mask(
    attention_mask: torch.Tensor | None,
    inputs_shape: tuple[int, ...],
    past_length: int,
    inputs_name: str = "input_ids",
) -> None:
    """Refuse a 2D ``attention_mask`` that does not fit the inputs (it would fail later with a bare indexing error, or
    silently mark the wrong tokens as padding).

    Args:
        attention_mask: the backbone's mask; only a 2D ``[batch, past + seq]`` padding mask is checked.
        inputs_shape: shape of the backbone's ``input_ids`` (``[batch, seq]``) or ``inputs_embeds``.
        past_length: tokens already in the KV cache (0 without one). With cached tokens the mask covers them too, so
            it is longer than the inputs (``generate()``'s decoding steps, a user-given cache).
        inputs_name: what the inputs are called in the message.
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return
    batch_size, seq_len = inputs_shape[0], inputs_shape[1]
    rows, width = attention_mask.shape
    if rows == batch_size and (width == seq_len or (past_length > 0 and width >= seq_len)):
        return
    if past_length > 0:
        needed = f"[{batch_size}, {past_length} + {seq_len}] (one column per cached and per new token)"
    else:
        needed = f"[{batch_size}, {seq_len}] (one 1/0 entry per token of {inputs_name})"
    raise ValueError(
        f"attention_mask has shape {list(attention_mask.shape)} but {inputs_name} has shape {list(inputs_shape)}"
        + (f" after {past_length} cached tokens" if past_length > 0 else "")
        + f": the mask must be {needed}. Pass the attention_mask the tokenizer returned together with these "
        f"{inputs_name} (or no attention_mask when no row is padded)."
    )


def build_query_index(
    batch_size: int,
    seq_len: int,
    device: torch.device,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    prompt_length: int | None = None,
    ignore_index: int = -100,
) -> QueryIndex:
    """Find the query tokens of every sequence of a batch (see the module docstring for the rule).

    Args:
        batch_size, seq_len: shape of the input.
        attention_mask: ``[batch, seq]`` 2D padding mask (1 = token, 0 = padding), or None.
        labels: ``[batch, seq]`` unshifted labels with ``ignore_index`` at unsupervised positions, or None.
        position_ids: ``[batch, seq]`` or ``[1, seq]``; used to split packed sequences when there is no mask.
        prompt_length: in generation without a cache, the length of the (left-padded) prompt.
    """
    idx = torch.arange(seq_len, device=device).expand(batch_size, seq_len)
    if attention_mask is not None and attention_mask.dim() == 2:
        valid = attention_mask[:, -seq_len:].to(device=device).bool()
    else:
        valid = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)

    packed = attention_mask is None and position_ids is not None and position_ids.dim() == 2
    if packed:
        pos = position_ids.to(device).expand(batch_size, seq_len)
        is_start = (pos == 0) | (idx == 0)
    else:
        is_start = idx == 0
    start_of = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    local_segment = is_start.long().cumsum(dim=1) - 1
    segments_per_row = int(local_segment.max().item()) + 1 if packed else 1
    segment = local_segment + torch.arange(batch_size, device=device)[:, None] * segments_per_row

    if labels is not None:
        supervised = (labels.to(device) != ignore_index) & ~is_start & valid
        mask = (_segment_cumsum(supervised.long(), start_of) == 0) & valid
    else:
        mask = valid.clone()
        if prompt_length is not None:
            mask &= idx < prompt_length

    # Fallback: a sequence without query tokens uses its first non-padding token.
    num_segments = batch_size * segments_per_row
    counts = torch.zeros(num_segments, dtype=torch.long, device=device)
    counts.index_add_(0, segment.flatten(), mask.long().flatten())
    empty = counts[segment] == 0
    first_valid = valid & (_segment_cumsum(valid.long(), start_of) == 1)
    mask = mask | (empty & first_valid)
    return QueryIndex(segment=segment, mask=mask, num_segments=num_segments, one_per_row=segments_per_row == 1)


def query_summary(hidden: torch.Tensor, index: QueryIndex) -> torch.Tensor:
    """Mean of ``hidden`` over the query tokens of each sequence, in float32.

    Args:
        hidden: ``[batch, seq, d]`` final hidden states of one view.
        index: from :func:`build_query_index`.

    Returns:
        ``[num_segments, d]`` float32 query summaries (``[batch, d]`` when ``index.one_per_row``).
    """
    d = hidden.shape[-1]
    weights = index.mask.to(torch.float32)
    sums = torch.zeros(index.num_segments, d, dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, index.segment.flatten(), (hidden.float() * weights[..., None]).flatten(0, 1))
    counts = torch.zeros(index.num_segments, dtype=torch.float32, device=hidden.device)
    counts.index_add_(0, index.segment.flatten(), weights.flatten())
    return sums / counts.clamp(min=1.0)[:, None]


def per_token(summary: torch.Tensor, index: QueryIndex) -> torch.Tensor:
    """Spread ``[num_segments, d]`` summaries to ``[batch, seq, d]`` (each token gets its sequence's summary)."""
    if index.one_per_row:
        return summary[:, None, :].expand(index.segment.shape[0], index.segment.shape[1], summary.shape[-1])
    return summary[index.segment]


def per_token_queries(
    h_frozen: torch.Tensor, h_adapted: torch.Tensor, index: QueryIndex | None, cache: Any, adapted: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each view's query summary at every token (``[batch, seq, d]`` each), the query gate's inputs.

    Args:
        h_frozen, h_adapted: ``[batch, seq, d]`` the two views' final hidden states of a backbone pass.
        index: the pass's query tokens; None at a decode step, whose summaries the KV cache keeps.
        cache: the pass's two-view KV cache (see :mod:`peft_imsm.cache`) or None. With ``index``, the new
            summaries are kept on it (computed once, at prefill); without, they are read from it.
        adapted: also the adapted view's summary; False (the route gate, which reads the frozen one only) gives
            None for it and computes nothing for that view.
    """
    rows, seq = h_adapted.shape[:2]
    if index is None:
        summaries = (cache.imsm_query_frozen, cache.imsm_query_adapted if adapted else None)
        return tuple(None if q is None else q[:, None, :].expand(rows, seq, q.shape[-1]) for q in summaries)
    summary_frozen = query_summary(h_frozen, index)
    summary_adapted = query_summary(h_adapted, index) if adapted else None
    if cache is not None:
        cache.imsm_query_frozen = summary_frozen.detach()
        cache.imsm_query_adapted = None if summary_adapted is None else summary_adapted.detach()
    return per_token(summary_frozen, index), None if summary_adapted is None else per_token(summary_adapted, index)
