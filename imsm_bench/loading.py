"""The user's model for ``--model`` (the custom and the real-model protocols): loading, GGUF conversion, prompts.

:func:`load_model` resolves ``--model`` (a local Hugging Face folder, a hub id, or a GGUF file converted once by
:mod:`.gguf`) and loads it with :func:`load_causal_lm`; :func:`use_chat_template` decides whether prompts go through
the tokenizer's chat template (``--no-chat-template``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .batching import has_chat_template
from .gguf import resolve_model_path


def load_causal_lm(name_or_path: str, device: str | None = None, dtype: str = "auto") -> tuple[Any, Any]:
    """Load a user's model and tokenizer, with an actionable error when the hub is unreachable.

    The tokenizer pads on the left (the layout generation and IMSM's query rule expect) and, without a pad token,
    pads with its eos token; the model goes to the GPU when there is one, in eval mode."""
    local = os.path.isdir(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype)
    except OSError as exc:
        where = "local folder" if local else "hub id"
        raise SystemExit(
            f"error: could not load the model {name_or_path!r} ({where}): {exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}\n"
            "If this machine cannot reach the Hugging Face hub, download the model elsewhere (e.g. "
            "`huggingface-cli download ORG/NAME --local-dir ./NAME`), copy the folder here and pass "
            "`--model ./NAME`."
        ) from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    model.eval()
    return model, tokenizer


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """``--model`` as a model + tokenizer; a GGUF file is converted once (cached under ``--cache-dir``)."""
    try:
        path = resolve_model_path(args.model, cache_root=args.cache_dir, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None
    return load_causal_lm(path, dtype=args.dtype)


def use_chat_template(args: argparse.Namespace, tokenizer: Any) -> bool:
    """Chat-template prompts unless ``--no-chat-template`` or the tokenizer has none (said on stderr either way)."""
    chat = has_chat_template(tokenizer) and not args.no_chat_template
    if not args.no_progress:
        why = "--no-chat-template" if args.no_chat_template else "the tokenizer has none"
        print(f"imsm-bench: prompts {'use the chat template' if chat else f'are raw ({why})'}", file=sys.stderr)
    return chat
