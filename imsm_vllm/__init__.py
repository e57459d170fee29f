"""vLLM plugin that serves IMSM adapters ("Interweaving Memories of a Siamese LLM") exported by ``imsm-export``.

``pip install`` of this project puts :func:`register` in vLLM's ``vllm.general_plugins`` entry-point group, so
``vllm serve OUT_DIR`` (a folder written by ``imsm-export``, whose ``config.json`` names ``IMSMLlamaForCausalLM``)
finds the model without any flag. This package never imports ``peft_imsm``: the serving environment may pin other
transformers / torch versions than the training one (``docs/serving.md``).

Modules:

* ``llama``: :class:`~imsm_vllm.llama.IMSMLlamaForCausalLM`, the dual pass inside vLLM for the Llama family (both
  views in one engine step over shared weights, each view with its own paged KV cache, the gate before the head).
* ``lora``: the LoRA update of the adapted view's rows (read from ``imsm_adapter.safetensors``).
* ``gate``: the gate (``fixed`` / ``token`` / ``query`` / ``route``) and the query summary read from vLLM's paged
  cache.
* ``prompt_lengths``: tags vLLM's attention metadata with each request's prompt length (query and route gates).
* ``export_format``: the exported folders' names (files, tensor keys, versions), shared with ``peft_imsm.export``.
* ``router``: ``imsm-serve``, the hard-routed route gate on vLLM's own multi-LoRA (a base + LoRA server, a pooling
  server for the routing pass, and an OpenAI-compatible front that routes each request).
* ``client``: start ``vllm serve`` in another environment and send it requests (tests, benchmarks).
"""

from __future__ import annotations

from .export_format import ARCHITECTURE


def register() -> None:
    """Register ``IMSMLlamaForCausalLM`` with vLLM's model registry (lazily: the model module is imported only when a
    served folder names it). vLLM calls this in every process it starts; registering twice is harmless."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "imsm_vllm.llama:IMSMLlamaForCausalLM")
