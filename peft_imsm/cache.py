"""Two KV caches in one: how IMSM keeps ``generate()`` fast.

IMSM runs every step through two views of one model (adapter off, adapter on). Each view needs its own KV cache,
and the per-row query summaries computed at prefill must follow the rows through whatever ``generate()`` does to
its cache: beam reordering, batch expansion for ``num_return_sequences``, row selection, cropping for assisted
decoding, reset.

``generate()`` (and the model's own forward) create a transformers ``Cache`` and keep a reference to it. Rather than
replacing that object, IMSM upgrades it in place: its class becomes a subclass of its own class mixed with
:class:`IMSMCacheMixin` (so ``isinstance(cache, DynamicCache)`` and every ``Cache`` method still hold), it keeps
the adapted view's key/values as before, and it carries the frozen view's cache and the query summaries along.

A hard-routed route gate (``IMSMConfig.route_threshold``) needs no second cache: each row runs one view, so the
cache holds each row's key/values of the view it was routed to, and carries the routes (``imsm_routes``) instead.
"""

from __future__ import annotations

import copy
import functools

import torch
from transformers.cache_utils import Cache


class IMSMCacheMixin:
    """Mixed into a transformers ``Cache`` class; see the module docstring.

    Three layouts:

    * two caches (any cache class): this object holds the adapted view's key/values and ``imsm_frozen`` holds the
      frozen view's;
    * stacked (``DynamicCache`` with LoRA, used by generation when both views run as one doubled batch): this object
      holds ``2 * rows`` rows, the frozen view's rows first, then the adapted view's; ``imsm_frozen`` is None and
      every row operation is applied to both halves;
    * routed (a hard-routed route gate, ``DynamicCache`` only): this object holds ``rows`` rows, each one the
      key/values of the one view its row was routed to; ``imsm_routes`` says which.

    Attributes:
        imsm_frozen: the frozen view's cache in the two-cache layout, else None.
        imsm_half_rows: in the stacked layout, the number of rows of each view.
        imsm_query_frozen: ``[batch, d]`` float32 query summary of the frozen view, set at prefill.
        imsm_query_adapted: ``[batch, d]`` float32 query summary of the adapted view, set at prefill (None for the
            route gate).
        imsm_routes: in the routed layout, ``[batch]`` bool, True where the row runs the frozen view (set at
            prefill), else None.
    """

    imsm_frozen: Cache | None
    imsm_half_rows: int | None
    imsm_query_frozen: torch.Tensor | None
    imsm_query_adapted: torch.Tensor | None
    imsm_routes: torch.Tensor | None

    def _imsm_rows(self, fn) -> None:
        if self.imsm_routes is not None:
            self.imsm_routes = fn(self.imsm_routes)
        if self.imsm_query_frozen is not None:
            self.imsm_query_frozen = fn(self.imsm_query_frozen)
        if self.imsm_query_adapted is not None:  # (None for the route gate, which reads the frozen summary only)
            self.imsm_query_adapted = fn(self.imsm_query_adapted)

    @property
    def imsm_stacked(self) -> bool:
        return self.imsm_frozen is None and not self.imsm_routed

    @property
    def imsm_routed(self) -> bool:
        """Whether this is the routed layout (one view per row, see the class docstring)."""
        return self.imsm_half_rows == ROUTED

    def _both_halves(self, rows: torch.Tensor) -> torch.Tensor:
        rows = torch.as_tensor(rows)
        return torch.cat([rows, rows + self.imsm_half_rows])

    def reset(self) -> None:
        super().reset()
        if self.imsm_frozen is not None:
            self.imsm_frozen.reset()
        self.imsm_query_frozen = None
        self.imsm_query_adapted = None
        self.imsm_routes = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.imsm_stacked:
            super().reorder_cache(self._both_halves(beam_idx))
            self.imsm_half_rows = int(beam_idx.numel())
        else:
            super().reorder_cache(beam_idx)
            if self.imsm_frozen is not None:
                self.imsm_frozen.reorder_cache(beam_idx)
        self._imsm_rows(lambda q: q.index_select(0, beam_idx.to(q.device)))

    def crop(self, tokens_to_remove: int) -> None:
        # The query summaries describe the prompt, which cropping of generated tokens never reaches.
        super().crop(tokens_to_remove)
        if self.imsm_frozen is not None:
            self.imsm_frozen.crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        # In the stacked layout [frozen rows; adapted rows], repeating each row keeps the frozen half first.
        super().batch_repeat_interleave(repeats)
        if self.imsm_stacked:
            self.imsm_half_rows = None if self.imsm_half_rows is None else self.imsm_half_rows * repeats
        elif self.imsm_frozen is not None:
            self.imsm_frozen.batch_repeat_interleave(repeats)
        self._imsm_rows(lambda q: q.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.imsm_stacked:
            super().batch_select_indices(self._both_halves(indices))
            self.imsm_half_rows = int(torch.as_tensor(indices).numel())
        else:
            super().batch_select_indices(indices)
            if self.imsm_frozen is not None:
                self.imsm_frozen.batch_select_indices(indices)
        self._imsm_rows(lambda q: q[indices.to(q.device)])

    def offload(self, *args, **kwargs):
        super().offload(*args, **kwargs)
        if self.imsm_frozen is not None:
            self.imsm_frozen.offload(*args, **kwargs)

    def prefetch(self, *args, **kwargs):
        super().prefetch(*args, **kwargs)
        if self.imsm_frozen is not None:
            self.imsm_frozen.prefetch(*args, **kwargs)

    @property
    def imsm_has_query(self) -> bool:
        return self.imsm_query_frozen is not None


ROUTED = -1
"""``imsm_half_rows`` of the routed layout (no halves: one view per row)."""


@functools.cache
def _imsm_cache_class(base: type) -> type:
    return type(f"IMSM{base.__name__}", (IMSMCacheMixin, base), {"__module__": __name__})


def is_imsm_cache(cache: object) -> bool:
    """True if ``cache`` already carries both IMSM views."""
    return isinstance(cache, IMSMCacheMixin)


def as_imsm_cache(cache: Cache, stacked: bool = False, routed: bool = False) -> Cache:
    """Upgrade an EMPTY transformers cache in place to carry the frozen view too, and return it.

    In the two-cache layout the frozen view's cache is a deep copy of the empty cache (same class, same per-layer
    layout: sliding windows, static lengths); in the stacked layout (``stacked=True``) the cache will hold both
    views' rows; in the routed layout (``routed=True``) one view per row. A cache that already holds tokens but no frozen view cannot be upgraded: its frozen half would be
    missing, so this raises.
    """
    if is_imsm_cache(cache):
        return cache
    if not isinstance(cache, Cache):
        raise TypeError(
            f"IMSM needs a transformers `Cache` object as `cache`/`past_key_values`, got {type(cache).__name__}. "
            "Pass `cache=None` (or nothing) and let the model create one, or a fresh `DynamicCache()`."
        )
    if cache.get_seq_length() != 0:
        raise ValueError(
            f"This {type(cache).__name__} already holds {cache.get_seq_length()} tokens that were computed without "
            "IMSM's frozen view, so IMSM cannot continue from it. Pass the cache returned by an IMSM model's "
            "forward/generate, or start from an empty cache."
        )
    frozen = None if stacked or routed else copy.deepcopy(cache)
    cache.__class__ = _imsm_cache_class(type(cache))
    cache.imsm_frozen = frozen
    cache.imsm_half_rows = ROUTED if routed else None
    cache.imsm_query_frozen = None
    cache.imsm_query_adapted = None
    cache.imsm_routes = None
    return cache


def copy_rows(dst: Cache, src: Cache, rows: torch.Tensor) -> None:
    """Write the key/values of ``src`` (a ``DynamicCache`` of ``len(rows)`` rows) into the rows ``rows`` of ``dst``
    (a ``DynamicCache`` over the same tokens), layer by layer, in place."""
    for dst_layer, src_layer in zip(dst.layers, src.layers, strict=True):
        dst_layer.keys[rows] = src_layer.keys.to(dst_layer.keys.dtype)
        dst_layer.values[rows] = src_layer.values.to(dst_layer.values.dtype)
