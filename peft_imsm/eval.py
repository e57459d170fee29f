"""``imsm-eval``: lm-evaluation-harness's ``lm_eval`` command with IMSM registered (docs/evaluation.md).

::

    imsm-eval --model hf --model_args pretrained=BASE,peft=IMSM_ADAPTER --tasks TASKS [any lm_eval flag]
    python -m peft_imsm.eval ...   # the same

:func:`main` runs the harness's own CLI (``lm_eval.__main__.cli_evaluate``): every flag, task, YAML config and output
file is the harness's. It adds two things, both in this process only. ``import peft_imsm`` registers IMSM with peft, so
the harness's ``PeftModel.from_pretrained`` loads IMSM adapters. And :func:`install` makes the harness's ``hf`` model
(``HFLM``) score IMSM adapters whose gate reads the query (``gate_mode="query"`` or ``"route"``) as IMSM defines it.
``--help`` prints :data:`HELP` (what imsm-eval adds) before the harness's help.

Why that is needed: for a loglikelihood request the harness calls the model on context + continuation, right-padded,
with no labels and no attention mask. IMSM without labels takes every input token as the query, so the gate at a
context position would see the continuation being scored (and the padding of shorter rows): non-causal, silently wrong
scores that also change with the batch. With an IMSM query or route gate, ``HFLM._loglikelihood_tokens`` is replaced by
:func:`loglikelihood_tokens`, which passes an attention mask and labels that mark the continuation (``-100`` on the
context), so the query is the context: what ``generate()`` takes as the prompt. Every other model (the base model, a
LoRA adapter, IMSM with the ``"token"`` or ``"fixed"`` gate, which do not read the query) keeps the harness's own code.
``generate_until`` needs nothing: the harness left-pads the prompts and passes their attention mask to ``generate()``.

From Python, call :func:`install` before ``lm_eval.simple_evaluate(model="hf", ...)``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import sys
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F

from .model import find_imsm_tuner

_LOG = logging.getLogger(__name__)
_SIZING_BATCH: ContextVar[bool] = ContextVar("imsm_eval_sizing_batch", default=False)
INSTALL_HINT = 'pip install "peft-imsm[eval]"'
TESTED_LM_EVAL = "0.4.13"
HELP = """\
imsm-eval: lm-evaluation-harness (lm-eval) with IMSM registered. Every lm-eval command, flag,
task and output file below works unchanged ("lm-eval" in it reads "imsm-eval"). What imsm-eval
adds, in its own process only:
  * IMSM adapters load in the harness's hf model:
      --model hf --model_args pretrained=BASE,peft=IMSM_ADAPTER
  * adapters whose gate reads the query (gate_mode="query", the default, or "route") are scored
    with the context as the query, as generate() takes the prompt: loglikelihood requests
    (multiple choice, perplexity) get an attention mask and labels -100 on the context, so the
    gate never sees the continuation it scores. An lm-eval code path that cannot say where the
    context ends raises an error instead of returning wrong scores. The base model, LoRA and
    IMSM with the "token" or "fixed" gate keep the harness's own scoring.
example:
  imsm-eval --model hf --tasks hellaswag --batch_size 8 --output_path results \\
      --model_args pretrained=HuggingFaceTB/SmolLM2-135M-Instruct,peft=smollm2-imsm
"imsm-eval run --help" lists every flag of an evaluation; docs/evaluation.md has the details.

lm-eval's help:
"""


def uses_query(model: Any) -> bool:
    """Whether ``model`` is an IMSM model whose active gate reads the query summary (``gate_mode="query"`` or
    ``"route"``)."""
    tuner = find_imsm_tuner(model, required=False)
    return tuner is not None and tuner.gate.reads_query


def loglikelihood_tokens(
    lm: Any,
    requests: Sequence[tuple[Any, list[int], list[int]]],
    disable_tqdm: bool = False,
    override_bs: int | None = None,
) -> list[tuple[float, bool]]:
    """``HFLM._loglikelihood_tokens`` for an IMSM model whose gate reads the query: ``(log p(continuation), is it the
    greedy continuation)`` per ``(cache key, context tokens, continuation tokens)`` request, in the requests' order.

    The inputs are the harness's (context + continuation minus its last token, truncated from the left to the model's
    length), right-padded with an attention mask, with labels ``-100`` on the context: IMSM's query is the context.
    Requests with the same input and the same context (multiple-choice answers of one token) share one row.
    """
    from tqdm import tqdm

    if lm.backend != "causal":
        raise ValueError(
            f"The harness loaded this IMSM model with backend={lm.backend!r}, but IMSM adapts causal LMs only: pass "
            "--model_args backend=causal (or leave backend out) with a causal LM as pretrained."
        )
    rows: dict[tuple[tuple[int, ...], int], list[int]] = {}  # (input tokens, context length in them) -> requests
    for i, (_, context, continuation) in enumerate(requests):
        if not context or not continuation or len(continuation) > lm.max_length:
            raise ValueError(
                f"Request {i} has {len(context)} context and {len(continuation)} continuation tokens: both must be "
                f"non-empty and the continuation at most the model's length ({lm.max_length} tokens). Shorten the "
                "task's answers, or pass a longer max_length in --model_args if the model supports one."
            )
        tokens = (context + continuation)[-(lm.max_length + 1) :][:-1]
        if len(context) + len(continuation) > lm.max_length + 1:
            _LOG.warning("Request %d is longer than the model (%d tokens): its context is truncated from the left.",
                         i, lm.max_length)  # fmt: skip
        rows.setdefault((tuple(tokens), len(tokens) - len(continuation) + 1), []).append(i)
    if not rows:
        return []
    keys = sorted(rows, key=lambda key: -len(key[0]))  # longest first: least padding, out of memory at once
    if lm.batch_size != "auto":
        batch_size = int(lm.batch_size)
    elif override_bs is not None:
        batch_size = override_bs
    else:  # the harness's probe, on the longest input
        batch_size = lm._detect_batch_size([requests[rows[keys[0]][0]]], 0)
    batch_size = max(1, batch_size)
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    progress = tqdm(total=len(requests), disable=disable_tqdm or lm.rank != 0, desc="Running loglikelihood requests")
    for start in range(0, len(keys), batch_size):
        chunk = keys[start : start + batch_size]
        width = len(chunk[0][0])
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, -100)
        for row, (tokens, context_length) in enumerate(chunk):
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
            attention_mask[row, : len(tokens)] = 1
            labels[row, context_length : len(tokens)] = input_ids[row, context_length : len(tokens)]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        batch = {name: tensor.to(lm.device) for name, tensor in batch.items()}
        mixed = lm.mixed_precision_dtype
        with torch.no_grad(), torch.autocast(device_type=lm.device.type, dtype=mixed, enabled=mixed is not None):
            logits = lm.model(**batch).logits
        log_probs = F.log_softmax(logits, dim=-1, dtype=lm.softmax_dtype)
        for row, key in enumerate(chunk):
            end = len(key[0])
            for i in rows[key]:
                request_key, _, continuation = requests[i]
                scored = log_probs[row, end - len(continuation) : end]  # position t predicts token t + 1
                target = torch.tensor(continuation, dtype=torch.long, device=scored.device)
                answer = (float(scored.gather(-1, target[:, None]).sum()), bool((scored.argmax(-1) == target).all()))
                results[i] = answer
                if request_key is not None:  # (loglikelihood_rolling's windows have none)
                    lm.cache_hook.add_partial("loglikelihood", request_key, answer)
                progress.update(1)
    progress.close()
    return results  # type: ignore[return-value]


def install() -> None:
    """Make lm-eval's ``HFLM`` score IMSM models whose gate reads the query with :func:`loglikelihood_tokens`
    (idempotent).

    Also guards ``HFLM._model_call``: any other harness code path that would call such a model on token sequences
    without saying where the context ends raises instead of returning scores (the batch-size probe is let through).
    """
    from lm_eval.models.huggingface import HFLM

    needed = ("_loglikelihood_tokens", "_model_call", "_detect_batch_size")
    missing = [name for name in needed if not callable(getattr(HFLM, name, None))]
    if missing:
        from lm_eval import __version__

        raise RuntimeError(
            f"lm-eval {__version__} has no HFLM.{', HFLM.'.join(missing)}, which imsm-eval wraps to score IMSM "
            f"adapters correctly. imsm-eval is tested with lm-eval {TESTED_LM_EVAL}: pip install "
            f'"lm-eval=={TESTED_LM_EVAL}"'
        )
    if getattr(HFLM._loglikelihood_tokens, "_imsm_installed", False):
        return
    original_scoring, original_call, original_sizing = (getattr(HFLM, name) for name in needed)

    @functools.wraps(original_scoring)
    def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
        if uses_query(self.model):
            return loglikelihood_tokens(self, requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        return original_scoring(self, requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    @functools.wraps(original_call)
    def _model_call(self, inps, *args, **kwargs):
        if uses_query(self.model) and not _SIZING_BATCH.get():
            mode = find_imsm_tuner(self.model).gate.mode
            raise RuntimeError(
                f"{type(self).__name__}._model_call was asked to score {list(inps.shape)} tokens with an IMSM model "
                f"whose gate reads the query (gate_mode={mode!r}; the 'query' and 'route' gates both read it), "
                "without labels marking where the context ends: "
                "IMSM would take the scored tokens as part of the query, and the scores would be wrong. This lm-eval "
                "code path is not supported for such adapters; peft_imsm.eval scores loglikelihood requests of the "
                "'hf' model itself. Please report the task and the lm-eval version."
            )
        return original_call(self, inps, *args, **kwargs)

    @functools.wraps(original_sizing)
    def _detect_batch_size(self, *args, **kwargs):
        token = _SIZING_BATCH.set(True)  # (a throwaway forward on a batch of ones, to find what fits in memory)
        try:
            return original_sizing(self, *args, **kwargs)
        finally:
            _SIZING_BATCH.reset(token)

    _loglikelihood_tokens._imsm_installed = True  # type: ignore[attr-defined]
    HFLM._loglikelihood_tokens = _loglikelihood_tokens
    HFLM._model_call = _model_call
    HFLM._detect_batch_size = _detect_batch_size


def main(argv: Sequence[str] | None = None) -> None:
    """Run lm-evaluation-harness's CLI (``lm_eval ...``) with IMSM registered; with ``-h`` / ``--help``, :data:`HELP`
    first. ``argv``: the arguments, without the program name (default: ``sys.argv[1:]``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:  # (argparse prints the help wherever the flag is)
        sys.stdout.write(HELP)
        sys.stdout.flush()
    if importlib.util.find_spec("lm_eval") is None:
        raise SystemExit(
            "error: imsm-eval runs lm-evaluation-harness, which is not installed in this Python environment "
            f"({sys.executable}). Install it with: {INSTALL_HINT}"
        )
    from lm_eval.__main__ import cli_evaluate

    install()
    saved = sys.argv
    sys.argv = ["imsm-eval", *args]  # (the harness's parser reads sys.argv)
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
