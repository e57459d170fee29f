"""Batches for a model: left padding of token-id rows, the pad id a tokenizer pads with, the device inputs go to.

A leaf module (torch only), so every part of the library and the benchmark builds its batches the same way:
:func:`left_pad` (the layout IMSM's query rule and ``generate()`` expect), :func:`pad_token_id` (the tokenizer's pad
token, else its eos token, else 0) and :func:`model_device` (where the output head, and so the logits, live).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def left_pad(
    rows: Sequence[Sequence[int]], fill: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[len(rows), width]`` long tensors: the rows right-aligned after ``fill`` values, and the attention mask
    (1 on the rows' own entries, 0 on the padding); ``width`` is the longest row's length."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), fill, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r) :] = torch.as_tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its eos token (decoder-only models often have no pad
    token), else 0; also 0 without a tokenizer. Padded positions are masked out, so any id works there."""
    if tokenizer is None:
        return 0
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    return int(pad or 0)
