"""Prompt/answer examples to training batches, shared by the skills LM's pretraining and the benchmark's fine-tuning.

Each example is ``prompt tokens (with whatever the tokenizer adds, e.g. bos) + answer tokens + eos``; only the answer
and the eos are supervised (labels ``-100`` on the prompt); batches are left-padded.
"""

from __future__ import annotations

from typing import Any

import torch

from peft_imsm.padding import left_pad


def encode_examples(
    tokenizer: Any, rows: list[dict], max_length: int, chat: bool = False
) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` per example: prompt tokens, then answer + eos; labels -100 on the prompt.

    ``chat``: the prompt goes into the tokenizer's chat template (user turn + generation prompt, see
    :func:`prompt_ids`); the answer then ends with the eos token, the end of the assistant's turn for chat models
    whose eos is the end-of-turn token.
    """
    encoded = []
    for row in rows:
        prompt = prompt_ids(tokenizer, row["input"], chat)
        answer = tokenizer(_answer_text(row["output"]), add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        ids = (prompt + answer)[:max_length]
        labels = ([-100] * len(prompt) + answer)[:max_length]
        if any(label != -100 for label in labels[1:]):
            encoded.append((ids, labels))
    if not encoded:
        raise ValueError("No training example left after tokenization (are the prompts longer than max_length?).")
    return encoded


def format_prompt(tokenizer: Any, text: str, chat: bool) -> str:
    """``text`` as the model sees it: the chat template's user turn + generation prompt when ``chat``, else as is."""
    if not chat:
        return text
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def prompt_ids(tokenizer: Any, text: str, chat: bool) -> list[int]:
    """Token ids of a prompt; a chat-formatted prompt already holds its special tokens (none are added again)."""
    return tokenizer(format_prompt(tokenizer, text, chat), add_special_tokens=not chat)["input_ids"]


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template (instruct models)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _answer_text(output: Any) -> str:
    return output[0] if isinstance(output, list) else str(output)


def collate(
    batch: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Left-pad a list of ``(input_ids, labels)`` into ``[batch, width]`` tensors."""
    ids, mask = left_pad([row_ids for row_ids, _ in batch], pad_id, device)
    labels, _ = left_pad([row_labels for _, row_labels in batch], -100, device)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
