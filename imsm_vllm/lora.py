"""The LoRA update of the adapted view, on vLLM's fused linear layers.

Both views run as one stacked batch of ``2n`` rows (``[frozen; adapted]``, see :mod:`imsm_vllm.llama`): every base
linear layer runs once over all rows, so the base weights are read once per step for both views and never copied.
:class:`FusedLoRA` then adds peft's LoRA update ``(x @ A^T) @ B^T * scaling`` to the adapted rows only (the last
``n``) of each Hugging Face layer inside vLLM's fused one (``qkv_proj`` = q, k, v; ``gate_up_proj`` = gate, up), in
two matmuls per fused layer (the parts' ``A`` stacked, their ``B * scaling`` block-diagonal).

The tensors come from ``imsm_adapter.safetensors`` (written by ``imsm-export``; the names are
:mod:`imsm_vllm.export_format`'s): ``imsm.lora.<hf module>.lora_A`` ``[r, in]``, ``.lora_B`` ``[out, r]`` and
``.scaling`` ``[1]``, with ``<hf module>`` e.g. ``model.layers.3.self_attn.q_proj``. :func:`attach_lora` installs them on the model. :func:`check_base_biases` maps
the base checkpoint's biases onto the same fused layers and refuses those the built model lacks.
"""

from __future__ import annotations

import torch
from torch import nn

from .export_format import ADAPTER_FILE, LORA_PARTS, lora_key, split_lora_key

# vLLM's fused linear layer -> the Hugging Face layers inside it, in their output order.
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


# The Hugging Face layer's last name -> its fused layer's ("q_proj" -> "qkv_proj").
_FUSED_NAME = {hf.split(".")[-1]: fused.split(".")[-1] for fused, parts in FUSED.items() for hf in parts}


def check_base_biases(hf_biases: list[str], params: set[str]) -> None:
    """Refuse a base checkpoint whose biases the built model lacks.

    vLLM's Llama loader skips a checkpoint's bias that the built layer does not have, without a word (its rule for
    GPTQ's extra biases), and the model then serves wrong answers.

    Args:
        hf_biases: the Hugging Face names of the base checkpoint's bias tensors
            (``model.layers.0.self_attn.q_proj.bias``).
        params: the names of the built model's parameters (vLLM's, ``model.layers.0.self_attn.qkv_proj.bias``).

    Raises:
        ValueError: naming the biases that no parameter of the built model takes (its fused layer's name for them).
    """
    missing = []
    for name in hf_biases:
        parts = name.split(".")
        if len(parts) >= 2:
            parts[-2] = _FUSED_NAME.get(parts[-2], parts[-2])
        if ".".join(parts) not in params:
            missing.append(name)
    if missing:
        raise ValueError(
            f"The base checkpoint has {len(missing)} bias tensor(s) that imsm_vllm's Llama layers do not have "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): serving without them would give wrong "
            "answers. This base architecture's biases are not implemented; serve the adapter with peft_imsm's "
            "generate()."
        )


class FusedLoRA(nn.Module):
    """LoRA on the parts of one fused linear layer (empty when none of them is adapted), as two matmuls per step.

    ``A`` stacks the parts' ``lora_A`` (``[sum r, in]``); ``B`` is block-diagonal, ``[out, sum r]``: each part's
    ``lora_B * scaling`` in its output rows and its own ``r`` columns, zeros elsewhere (a part that is not adapted
    gets zeros, which add nothing). So ``y[n:] += (x[n:] @ A^T) @ B^T`` is peft's update of every part at once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("A", None, persistent=False)
        self.register_buffer("B", None, persistent=False)

    def set_parts(
        self, parts: list[tuple[int, int, torch.Tensor, torch.Tensor, float]], out_size: int, device, dtype
    ) -> None:
        """``parts``: ``(col0, col1, lora_A, lora_B, scaling)`` of each adapted part of the fused layer, whose output
        size is ``out_size``."""
        if not parts:
            self.A = self.B = None
            return
        rank = sum(lora_a.shape[0] for _, _, lora_a, _, _ in parts)
        B = torch.zeros(out_size, rank, dtype=torch.float32)
        r0 = 0
        for col0, col1, lora_a, lora_b, scaling in parts:
            r1 = r0 + lora_a.shape[0]
            B[col0:col1, r0:r1] = lora_b.float() * scaling
            r0 = r1
        self.A = torch.cat([p[2] for p in parts]).to(device=device, dtype=dtype)
        self.B = B.to(device=device, dtype=dtype)

    def add_to(self, x: torch.Tensor, y: torch.Tensor, n: int) -> None:
        """``y[n:] += LoRA(x[n:])``, in place: ``x`` / ``y`` are the fused layer's input / output, rows
        ``[frozen (n); adapted (n)]``."""
        if self.A is not None:
            y[n:].addmm_(x[n:] @ self.A.T, self.B.T)


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
    """Install the adapter's LoRA tensors (the ``lora_key`` entries of ``tensors``) on ``loras`` (one per decoder
    layer).

    Args:
        layers: the decoder layers (only their count is used, to check layer indices).
        out_sizes: output size of each part of each fused layer, e.g. ``{"self_attn.qkv_proj": (q, kv, kv)}``.

    Returns the names of the tensors used; raises ``ValueError`` for a tensor that fits no layer (an adapter exported
    for another base model) or a shape that does not match.
    """
    used: set[str] = set()
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        parsed = split_lora_key(key)
        if parsed is not None:
            by_module.setdefault(parsed[0], {})[parsed[1]] = value
    for module in by_module:
        parts = module.split(".")
        if len(parts) < 4 or parts[-4] != "layers" or not parts[-3].isdigit() or int(parts[-3]) >= len(layers):
            raise ValueError(
                f"{ADAPTER_FILE} holds LoRA weights for `{module}`, which is not a decoder layer's linear "
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
                    missing = set(LORA_PARTS) - set(found)
                    if missing:
                        raise ValueError(f"{ADAPTER_FILE} lacks {sorted(missing)} of `{module}`.")
                    lora_a, lora_b = found["lora_A"], found["lora_B"]
                    if lora_b.shape[0] != size or lora_b.shape[1] != lora_a.shape[0]:
                        raise ValueError(
                            f"The LoRA weights of `{module}` have shapes A {tuple(lora_a.shape)}, B "
                            f"{tuple(lora_b.shape)}, but this model's layer has {size} outputs: the adapter was "
                            "exported for another base model."
                        )
                    collected.append((col, col + size, lora_a, lora_b, float(found["scaling"].item())))
                    used.update(lora_key(module, part) for part in LORA_PARTS)
                col += size
            lora.by_fused_name()[fused].set_parts(collected, col, device, dtype)
    return used
