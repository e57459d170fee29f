"""The folders ``imsm-export`` writes, defined once: the names that ``peft_imsm.export`` / ``peft_imsm.export_route``
write and that ``imsm_vllm`` (the plugin, ``imsm-serve``) reads.

Constants and string helpers only: no torch, vLLM or peft, so that both environments import it (the training one and
vLLM's, where this project is installed without its dependencies). Two formats:

* The plugin format (every gate mode except a hard-routed route gate): ``config.json`` names
  :data:`ARCHITECTURE` and holds a :data:`CONFIG_SECTION` section (:data:`FORMAT_VERSION`, the gate, the wrapped
  LoRA); :data:`ADAPTER_FILE` holds per adapted layer :func:`lora_key` ``(module, part)`` for each part of
  :data:`LORA_PARTS`, and the gate's :data:`GATE_TENSORS`. vLLM runs it through ``imsm_vllm.llama``.
* The route format (``gate_mode="route"`` with a ``route_threshold``, :func:`is_route_export`): the base model's own
  folder (``config.json`` unchanged), a plain peft LoRA folder :data:`LORA_DIR`, the router :data:`ROUTER_FILE`
  (:data:`ROUTER_WEIGHT` ``[1, d]``, :data:`ROUTER_BIAS` ``[1]``, float32) and :data:`ROUTE_CONFIG_FILE` (the keys of
  :data:`ROUTE_CONFIG_KEYS`). Served by ``imsm-serve`` (``imsm_vllm.router``) on vLLM's own multi-LoRA: a prompt
  whose router value ``g`` is above the threshold runs the base model, any other the LoRA (:func:`route_of`).
"""

from __future__ import annotations

import struct

# ------------------------------------------------------------------------------------------------ the plugin format
FORMAT_VERSION = 1
"""Version of the plugin format (``config.json``'s ``imsm.format_version``)."""
ARCHITECTURE = "IMSMLlamaForCausalLM"
"""The architecture name that ``config.json`` gives the plugin's model."""
CONFIG_SECTION = "imsm"
"""The section of ``config.json`` with the export's settings."""
ADAPTER_FILE = "imsm_adapter.safetensors"
"""The plugin format's LoRA and gate tensors (float32)."""
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
"""Base architectures that can be exported (the Llama layer layout: fused qkv, SwiGLU MLP, RMSNorm, rotary), with
their ``model_type``."""
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The decoder layers' linear layers that a LoRA may adapt, by their Hugging Face names."""
TENSOR_PREFIX = "imsm."
"""Every key of :data:`ADAPTER_FILE` starts with it (vLLM's loader reads every ``*.safetensors`` file of the folder:
the plugin takes these keys out of the base weights)."""
LORA_PREFIX = TENSOR_PREFIX + "lora."
LORA_PARTS = ("lora_A", "lora_B", "scaling")
"""Per adapted layer: ``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]``, ``scaling`` ``[1]`` (peft's own scaling)."""
GATE_TENSORS = {
    "fixed": (),
    "token": ("imsm.gate.W_A", "imsm.gate.W_B"),
    "query": ("imsm.gate.W_A", "imsm.gate.W_B"),
    "route": ("imsm.gate.W_R", "imsm.gate.b_R"),
}
"""The gate's effective weights in :data:`ADAPTER_FILE`, per gate mode."""
GATE_MODES = tuple(GATE_TENSORS)


def lora_key(module: str, part: str) -> str:
    """The key of ``part`` (one of :data:`LORA_PARTS`) of the Hugging Face ``module`` (``model.layers.3.mlp.up_proj``)
    in :data:`ADAPTER_FILE`."""
    return f"{LORA_PREFIX}{module}.{part}"


def split_lora_key(key: str) -> tuple[str, str] | None:
    """``(module, part)`` of a :func:`lora_key`; None for a key that is not one."""
    if not key.startswith(LORA_PREFIX):
        return None
    module, _, part = key.removeprefix(LORA_PREFIX).rpartition(".")
    return module, part


# ------------------------------------------------------------------------------------------------- the route format
ROUTE_FORMAT_VERSION = 1
"""Version of the route format (:data:`ROUTE_CONFIG_FILE`'s ``format_version``)."""
ROUTE_CONFIG_FILE = "imsm_route.json"
ROUTER_FILE = "router/imsm_router.safetensors"
"""The router's tensors, in a subfolder: vLLM's loader reads every ``*.safetensors`` file at the top of a model folder
as the base model's weights (and refuses one whose names the model lacks)."""
ROUTER_WEIGHT = "W_R"
ROUTER_BIAS = "b_R"
LORA_DIR = "lora"
"""The plain peft LoRA folder (``adapter_config.json``, ``adapter_model.safetensors``) inside the export."""
LORA_FILES = ("adapter_config.json", "adapter_model.safetensors")
LORA_NAME = "imsm-adapted"
"""The name the LoRA is served under (``--lora-modules LORA_NAME=OUT/lora``) unless the export names another."""
ROUTE_CONFIG_KEYS = ("format_version", "threshold", "lora_name", "lora_dir", "router_file", "max_lora_rank",
                     "hidden_size", "base_architecture")  # fmt: skip
"""The keys of :data:`ROUTE_CONFIG_FILE` that ``imsm-serve`` reads (the export adds ``base_model`` and ``adapter``,
where it came from)."""
ROUTES = ("frozen", "adapted")
ROUTE_HEADER = "x-imsm-route"
"""Response header of ``imsm-serve``: the route the request took (one of :data:`ROUTES`)."""
GATE_HEADER = "x-imsm-gate"
"""Response header of ``imsm-serve``: the request's router value ``g``."""
PROMPT_TOKENS_HEADER = "x-imsm-prompt-tokens"
"""Response header of ``imsm-serve``: how many prompt tokens the router read."""
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM's ``--max-lora-rank`` accepts (vLLM 0.32)."""
ROUTE_THRESHOLD = 0.5
"""The route gate's threshold when the saved adapter config names none (adapters saved before the setting existed)."""


def is_route_export(gate_mode: str | None, route_threshold: float | str | None) -> bool:
    """Whether an IMSM adapter exports to the route format: a route gate that picks one view per prompt (a
    ``route_threshold``). A soft-mixing route gate (``route_threshold=None``) needs both views at every token: the
    plugin format."""
    return gate_mode == "route" and route_threshold is not None


def route_of(g: float, threshold: float) -> str:
    """The route of a prompt whose (float32) router value is ``g``: ``"frozen"`` (the base model alone) where
    ``g > threshold``, else ``"adapted"`` (base + LoRA), as ``peft_imsm``'s hard-routed generation decides: torch
    compares a float32 tensor with a Python number in float32, so the threshold is rounded to float32 here too."""
    threshold32 = struct.unpack("<f", struct.pack("<f", threshold))[0]
    return ROUTES[0] if g > threshold32 else ROUTES[1]


def max_lora_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` value vLLM accepts that serves a LoRA of rank ``rank``."""
    for value in MAX_LORA_RANKS:
        if value >= rank:
            return value
    raise ValueError(
        f"The LoRA has rank {rank}; vLLM serves ranks up to {MAX_LORA_RANKS[-1]} (--max-lora-rank). Train the "
        "adapter with a smaller r to serve it with vLLM."
    )
