"""Left padding of token-id rows into batch tensors: the layout IMSM's query rule and ``generate()`` expect."""

from __future__ import annotations

from collections.abc import Sequence

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
