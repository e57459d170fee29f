"""``imsm-bench``, the forgetting benchmark of peft-imsm: does IMSM learn a task like LoRA and forget less?

A separate package, installed with peft-imsm; the library (``peft_imsm``) never imports it. Public here:
:func:`load_skills_lm` (the skills LM the default run fine-tunes, with its tokenizer) and the world it was
pretrained on (:data:`TARGET_TASK`, :func:`make_examples`; the rest of that world is in :mod:`imsm_bench.skills`).

Modules, from the command line down (imports go one way, no cycles):

* ``cli`` (``imsm-bench``, ``python -m imsm_bench``): ``main``, ``--out``; dispatches to one protocol;
* ``options``: the command line (every flag and default) and what it turns into (settings, weights, methods);
* the protocols, one module each: ``default`` (the shipped skills LM), ``custom`` (``--model`` with your
  ``--train``/``--eval`` JSONL sets), ``real`` (``--protocol real``: a real instruct model, teacher-forced scores);
* ``engine``: the run loop shared by the protocols (every method and seed, then mean ± std);
* ``runner`` (methods, fine-tuning, the retrofit rows), ``parallel`` (``--jobs``: forked one-thread workers);
* ``loading`` (``--model``: loading, chat templates) and ``gguf`` (GGUF files converted once);
* ``pretrain`` (the skills LM: shipped in ``skills_lm/``, or built; greedy evaluation) and ``skills`` (its world:
  tokenizer and tasks); ``batching`` (examples to training batches);
* ``data`` (JSON Lines sets), ``metrics`` (the paper's metrics), ``report`` (table, results.json, results.png).
"""

from __future__ import annotations

from typing import Any

from .pretrain import load_or_build_skills_model
from .skills import TARGET_TASK, make_examples

__all__ = ["load_skills_lm", "TARGET_TASK", "make_examples"]


def load_skills_lm(progress: bool = False) -> tuple[Any, Any]:
    """The skills LM that ships with the benchmark, and its tokenizer: ``(model, tokenizer)``.

    A small Llama (about 1.06M parameters, float32, on the CPU, in eval mode) pretrained on the skills of
    :mod:`imsm_bench.skills` (recall, add, reverse, compare); :data:`TARGET_TASK` is not one of them. Its character
    tokenizer pads on the left and has no chat template. The shipped weights are used where they match this
    version's skills world; otherwise the model is built once (``progress``: show the pretraining's bar) and cached
    under ``$PEFT_IMSM_CACHE`` (default ``~/.cache/peft_imsm``).
    """
    return load_or_build_skills_model(progress=progress)
