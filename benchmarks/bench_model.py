"""The ~60M-parameter Llama every script in ``benchmarks/`` measures (built from a config; random weights)."""

from __future__ import annotations

CONFIG: dict = dict(
    vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=8, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip


def linear_shapes() -> list[tuple[int, int]]:
    """``(out, in)`` of every linear layer of the decoder layers (q, k, v, o, gate, up, down per layer)."""
    d, ff = CONFIG["hidden_size"], CONFIG["intermediate_size"]
    return ([(d, d)] * 4 + [(ff, d), (ff, d), (d, ff)]) * CONFIG["num_hidden_layers"]
