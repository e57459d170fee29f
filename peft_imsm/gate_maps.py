"""See what the gate does: per-token gate values of an IMSM model on a list of prompts, and a picture of them.

The gate value at a position is the weight of the frozen view (the base model) in the state the output head turns
into the NEXT token's distribution, averaged over the hidden dimensions: near 1 the model leans on what it knew,
near 0 on the adapter.

:func:`gate_map` runs the prompts (optionally with a given or generated completion each, so that the answer's tokens
are shown too) through the model once, teacher-forced, with the same query rule as in training and generation (the
query is the prompt), and returns a :class:`GateMap`; :meth:`GateMap.plot` draws it (one row per prompt, tokens along
the axis, colour = weight of the frozen view) and saves a PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .backbone import model_device
from .extras import require
from .model import find_imsm_tuner
from .padding import left_pad, pad_token_id


@dataclass
class GateMap:
    """Per-token gate values of an IMSM model.

    Attributes:
        prompts: the prompts, one per row.
        tokens: per row, the text of each token (prompt tokens, then completion tokens), padding removed.
        token_ids: per row, the token ids.
        gate: per row, a ``[len(tokens)]`` float32 tensor: the gate (weight of the frozen view, mean over hidden
            dimensions) at each position, i.e. in the mix that predicts the token AFTER it.
        prompt_lengths: per row, how many of the tokens are the prompt (the rest is the completion).
        routes: for a hard-routed route gate (``route_threshold`` set), the route each prompt took: ``"__base__"`` or
            the adapter's name (a LoRA library names which adapter); else None.
    """

    prompts: list[str]
    tokens: list[list[str]]
    token_ids: list[list[int]]
    gate: list[torch.Tensor]
    prompt_lengths: list[int]
    routes: list[str] | None = None

    def prompt_mean(self, row: int) -> float:
        """Mean gate over the prompt tokens of ``row``."""
        return float(self.gate[row][: self.prompt_lengths[row]].mean())

    def completion_mean(self, row: int) -> float | None:
        """Mean gate at the positions that predict the completion's tokens (the last prompt token onwards)."""
        start = self.prompt_lengths[row] - 1
        values = self.gate[row][start:-1] if len(self.gate[row]) > self.prompt_lengths[row] else None
        return None if values is None or values.numel() == 0 else float(values.mean())

    def plot(
        self,
        path: str | None = None,
        title: str | None = None,
        row_labels: Sequence[str] | None = None,
        max_tokens: int = 48,
        cmap: str = "coolwarm",
    ) -> Any:
        """Draw the map: one row per prompt, its tokens along the x axis, colour = gate (weight of the frozen view).

        A black bar marks where the prompt ends (the cell before it is the gate that predicts the first answer
        token). Rows longer than ``max_tokens`` show their last ``max_tokens`` tokens. Saves a PNG at ``path`` when
        given. Returns the matplotlib figure. Needs matplotlib: ``pip install "peft-imsm[plot]"``.
        """
        matplotlib = require("matplotlib", "GateMap.plot")
        if path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        if not self.tokens:
            raise ValueError("This gate map has no rows to draw.")
        if row_labels is not None and len(row_labels) != len(self.tokens):
            raise ValueError(f"row_labels has {len(row_labels)} entries for {len(self.tokens)} rows.")
        shown = [max(0, len(t) - max_tokens) for t in self.tokens]  # tokens cut from the start of each row
        width = max(len(t) - s for t, s in zip(self.tokens, shown))
        values = np.full((len(self.tokens), width), np.nan)
        for r, (gate, skip) in enumerate(zip(self.gate, shown)):
            values[r, : len(gate) - skip] = gate[skip:].numpy()
        fig_w = min(30.0, 2.5 + 0.42 * width)
        fig_h = 1.2 + 0.48 * len(self.tokens)
        fig, ax = plt.subplots(figsize=(fig_w, fig_h))
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        for r, (tokens, skip) in enumerate(zip(self.tokens, shown)):
            for c, text in enumerate(tokens[skip:]):
                ax.text(c, r, _cell_text(text), ha="center", va="center", fontsize=7, color="black")
            boundary = self.prompt_lengths[r] - skip - 0.5
            if 0 <= boundary < width:
                ax.plot([boundary, boundary], [r - 0.5, r + 0.5], color="black", lw=2.5)
        labels = list(row_labels) if row_labels is not None else [_short(p) for p in self.prompts]
        if self.routes is not None:
            labels = [f"{label} -> {route}" for label, route in zip(labels, self.routes)]
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xticks([])
        ax.set_xlabel("tokens (left of the black bar: prompt; right: completion)", fontsize=8)
        bar = fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01)
        bar.set_label("gate: weight of the frozen view", fontsize=8)
        ax.set_title(title or "IMSM gate per token (1 = frozen model, 0 = adapter)", fontsize=10)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=130)
        return fig


def _cell_text(text: str) -> str:
    text = text.replace("\n", "\\n").replace("\t", "\\t")
    if text == " ":
        return "␣"
    return text if len(text) <= 6 else text[:5] + "…"


def _short(prompt: str, limit: int = 28) -> str:
    prompt = prompt.replace("\n", " ")
    return prompt if len(prompt) <= limit else prompt[: limit - 1] + "…"


@torch.no_grad()
def gate_map(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    completions: Sequence[str] | None = None,
    max_new_tokens: int = 0,
    batch_size: int = 16,
) -> GateMap:
    """Per-token gate values of an IMSM model for ``prompts`` (and their completions).

    Args:
        model: an IMSM ``PeftModel`` (or anything :func:`peft_imsm.find_imsm_tuner` accepts).
        tokenizer: its tokenizer.
        prompts: the prompts, one row each.
        completions: optional text to append to each prompt (e.g. the gold answers): its tokens are shown too,
            with the gate that predicted each of them.
        max_new_tokens: instead of ``completions``, generate (greedy) up to this many tokens per prompt and show
            them; 0 shows the prompts alone.
        batch_size: prompts per forward.

    The query is the prompt, as in ``generate()``: the values on generated tokens are the ones generation used.
    """
    tuner = find_imsm_tuner(model)
    prompts = list(prompts)
    if not prompts:
        raise ValueError("gate_map() needs at least one prompt.")
    if completions is not None and max_new_tokens:
        raise ValueError("Pass either completions or max_new_tokens to gate_map(), not both.")
    if completions is not None and len(completions) != len(prompts):
        raise ValueError(f"{len(completions)} completions for {len(prompts)} prompts; give one completion per prompt.")
    pad_id = pad_token_id(tokenizer)
    device = model_device(model)
    rows: list[tuple[list[int], int]] = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt)["input_ids"]
        if not ids:
            raise ValueError(f"Prompt {i} tokenizes to nothing; every row needs at least one prompt token.")
        rows.append((ids, len(ids)))
    if completions is not None:
        rows = [
            (ids + tokenizer(c, add_special_tokens=False)["input_ids"], n) for (ids, n), c in zip(rows, completions)
        ]
    elif max_new_tokens:
        rows = _generate(model, rows, max_new_tokens, batch_size, pad_id, tokenizer.eos_token_id, device)

    was_training = model.training
    model.eval()
    gates: list[torch.Tensor] = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            input_ids, mask = left_pad([ids for ids, _ in chunk], pad_id)
            width = input_ids.shape[1]
            labels = torch.full_like(input_ids, -100)
            for r, (ids, n) in enumerate(chunk):
                labels[r, width - len(ids) + n :] = torch.tensor(ids[n:], dtype=torch.long)
            inputs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
            if (labels != -100).any():
                inputs["labels"] = labels.to(device)  # the query is the prompt: the tokens before the first label
            with tuner.record_gate(per_token=True) as log:
                model(**inputs, use_cache=False)
            if len(log) != 1:
                raise RuntimeError(f"Expected one gate record per forward, got {len(log)}.")
            per_position = log[0].float().cpu()
            for r, (ids, _) in enumerate(chunk):
                gates.append(per_position[r, width - len(ids) :].clone())
    finally:
        model.train(was_training)
    routes = None
    if tuner.gate.mode == "route" and tuner.peft_config[tuner._active_name].route_threshold is not None:
        routes = []
        for start in range(0, len(rows), batch_size):
            input_ids, mask = left_pad([ids[:n] for ids, n in rows[start : start + batch_size]], pad_id)
            routes += tuner.route(input_ids.to(device), mask.to(device))
    token_ids = [ids for ids, _ in rows]
    tokens = [[tokenizer.decode([t]) for t in ids] for ids in token_ids]
    return GateMap(prompts, tokens, token_ids, gates, [n for _, n in rows], routes)


def _generate(model, rows, max_new_tokens, batch_size, pad_id, eos_id, device) -> list[tuple[list[int], int]]:
    out_rows = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            input_ids, mask = left_pad([ids for ids, _ in chunk], pad_id)
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id,
            )  # fmt: skip
            for r, (ids, n) in enumerate(chunk):
                new = out[r, input_ids.shape[1] :].tolist()
                if eos_id is not None and eos_id in new:
                    new = new[: new.index(eos_id) + 1]
                out_rows.append((ids + new, n))
    finally:
        model.train(was_training)
    return out_rows
