"""The LoRA update of the adapted view, on vLLM's fused linear layers.

Both views run as one stacked batch of ``2n`` rows (``[frozen; adapted]``, see :mod:`imsm_vllm.llama`): every base
linear layer runs once over all rows, so the base weights are read once per step for both views and never copied.
:class:`FusedLoRA` then adds peft's LoRA update ``(x @ A^T) @ B^T * scaling`` to the adapted rows only (the last
``n``), per Hugging Face layer inside vLLM's fused one (``qkv_proj`` = q, k, v; ``gate_up_proj`` = gate, up).

The tensors come from ``imsm_adapter.safetensors`` (written by ``imsm-export``): ``imsm.lora.<hf module>.lora_A``
``[r, in]``, ``.lora_B`` ``[out, r]`` and ``.scaling`` ``[1]``, with ``<hf module>`` e.g.
``model.layers.3.self_attn.q_proj``. :func:`attach_lora` installs them on the model.
"""

from __future__ import annotations

import torch
from torch import nn

# vLLM's fused linear layer -> the Hugging Face layers inside it, in their output order.
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


class FusedLoRA(nn.Module):
    """LoRA on the parts of one fused linear layer (empty when none of them is adapted).

    ``A`` stacks the parts' ``lora_A`` (``[sum r, in]``, one matmul for all parts); each part keeps its ``lora_B``
    (``[out_part, r_part]``), its output columns and its scaling.
    """

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[tuple[int, int, int, int, float]] = []  # (col0, col1, r0, r1, scaling)
        self.register_buffer("A", None, persistent=False)
        self.num_parts = 0  # lora_B of part i is the buffer B{i}

    def set_parts(self, parts: list[tuple[int, int, torch.Tensor, torch.Tensor, float]], device, dtype) -> None:
        """``parts``: ``(col0, col1, lora_A, lora_B, scaling)`` of each adapted part of the fused layer."""
        rows, self.parts = 0, []
        for col0, col1, lora_a, lora_b, scaling in parts:
            r = lora_a.shape[0]
            self.parts.append((col0, col1, rows, rows + r, scaling))
            rows += r
            self.register_buffer(f"B{len(self.parts) - 1}", lora_b.to(device=device, dtype=dtype), persistent=False)
        self.num_parts = len(self.parts)
        self.A = torch.cat([p[2] for p in parts]).to(device=device, dtype=dtype) if parts else None

    def add_to(self, x: torch.Tensor, y: torch.Tensor, n: int) -> None:
        """``y[n:] += LoRA(x[n:])``, in place: ``x`` / ``y`` are the fused layer's input / output, rows
        ``[frozen (n); adapted (n)]``."""
        if self.A is None:
            return
        t = x[n:] @ self.A.T
        for i, (col0, col1, r0, r1, scaling) in enumerate(self.parts):
            y[n:, col0:col1] += (t[:, r0:r1] @ getattr(self, f"B{i}").T) * scaling


class LayerLoRA(nn.Module):
    """The four :class:`FusedLoRA` of one decoder layer."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = FusedLoRA()
        self.o = FusedLoRA()
        self.gate_up = FusedLoRA()
        self.down = FusedLoRA()

    def by_fused_name(self) -> dict[str, FusedLoRA]:
        return {"self_attn.qkv_proj": self.qkv, "self_attn.o_proj": self.o,
                "mlp.gate_up_proj": self.gate_up, "mlp.down_proj": self.down}  # fmt: skip


def attach_lora(
    layers: list[nn.Module],
    loras: list[LayerLoRA],
    tensors: dict[str, torch.Tensor],
    out_sizes: dict[str, tuple[int, ...]],
    device: torch.device,
    dtype: torch.dtype,
) -> set[str]:
    """Install the adapter's LoRA tensors (``imsm.lora.*`` of ``tensors``) on ``loras`` (one per decoder layer).

    Args:
        layers: the decoder layers (only their count is used, to check layer indices).
        out_sizes: output size of each part of each fused layer, e.g. ``{"self_attn.qkv_proj": (q, kv, kv)}``.

    Returns the names of the tensors used; raises ``ValueError`` for a tensor that fits no layer (an adapter exported
    for another base model) or a shape that does not match.
    """
    used: set[str] = set()
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("imsm.lora."):
            module, _, kind = key.removeprefix("imsm.lora.").rpartition(".")
            by_module.setdefault(module, {})[kind] = value
    for module in by_module:
        parts = module.split(".")
        if len(parts) < 4 or parts[-4] != "layers" or not parts[-3].isdigit() or int(parts[-3]) >= len(layers):
            raise ValueError(
                f"imsm_adapter.safetensors holds LoRA weights for `{module}`, which is not a decoder layer's linear "
                f"layer of this {len(layers)}-layer model: the adapter was exported for another base model. Export "
                "it again with imsm-export --base <the base it was trained on>."
            )
    for index, lora in enumerate(loras):
        for fused, hf_names in FUSED.items():
            sizes = out_sizes[fused]
            collected, col = [], 0
            for hf_name, size in zip(hf_names, sizes):
                module = f"model.layers.{index}.{hf_name}"
                found = by_module.get(module)
                if found is not None:
                    missing = {"lora_A", "lora_B", "scaling"} - set(found)
                    if missing:
                        raise ValueError(f"imsm_adapter.safetensors lacks {sorted(missing)} of `{module}`.")
                    lora_a, lora_b = found["lora_A"], found["lora_B"]
                    if lora_b.shape[0] != size or lora_b.shape[1] != lora_a.shape[0]:
                        raise ValueError(
                            f"The LoRA weights of `{module}` have shapes A {tuple(lora_a.shape)}, B "
                            f"{tuple(lora_b.shape)}, but this model's layer has {size} outputs: the adapter was "
                            "exported for another base model."
                        )
                    collected.append((col, col + size, lora_a, lora_b, float(found["scaling"].item())))
                    used.update(f"imsm.lora.{module}.{k}" for k in ("lora_A", "lora_B", "scaling"))
                col += size
            lora.by_fused_name()[fused].set_parts(collected, device, dtype)
    return used
