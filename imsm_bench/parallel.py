"""Independent benchmark runs (one method, one seed) in worker processes, one torch thread each.

``imsm-bench --jobs N`` trains and scores N (method, seed) runs at once. Each run seeds everything it draws
(``build_model`` calls ``torch.manual_seed(seed)``; anchors and batches have their own seeded generators), and every
worker computes on ONE thread, like the sequential run, so the figures are the same for any ``N`` (tested). One
thread per process also keeps another busy process from stalling OpenMP threads that wait on each other.

Workers are forked: they inherit the loaded model, the data and the scoring function (a closure), so nothing is
pickled but each run's results. Forking needs a CPU-only parent (CUDA cannot be forked) and a POSIX system; where
either is missing, :func:`default_jobs` is 1 and :func:`map_runs` refuses more.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

_RUN: Callable[..., Any] | None = None  # the run function of the current map_runs call, inherited by forked workers


def can_fork() -> bool:
    """Whether runs can go to forked workers here (POSIX fork available and no CUDA context in this process)."""
    return "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized()


def default_jobs(max_jobs: int = 4) -> int:
    """One worker per CPU core available to this process, at most ``max_jobs``; 1 where runs cannot be forked or a
    GPU is present (runs on one GPU gain nothing from sharing it)."""
    if not can_fork() or torch.cuda.is_available():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(max_jobs, cores))


def _call(args: tuple[Any, ...]) -> Any:
    torch.set_num_threads(1)
    assert _RUN is not None
    return _RUN(*args)


def map_runs(run: Callable[..., Any], items: Sequence[tuple[Any, ...]], jobs: int) -> Iterator[Any]:
    """``run(*item)`` for every item, in order. ``jobs > 1``: in that many forked worker processes (one torch thread
    each), results yielded in the order of ``items`` as they complete."""
    global _RUN
    if jobs <= 1 or len(items) <= 1:
        for item in items:
            yield run(*item)
        return
    if not can_fork():
        raise SystemExit(
            "error: --jobs > 1 runs methods in forked worker processes, which this process cannot do "
            f"({'CUDA is already initialised' if torch.cuda.is_initialized() else 'no fork on ' + sys.platform}); "
            "use --jobs 1."
        )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the parent's tokenizer threads do not survive a fork
    _RUN = run
    try:
        with multiprocessing.get_context("fork").Pool(min(jobs, len(items))) as pool:
            yield from pool.imap(_call, items, chunksize=1)
    finally:
        _RUN = None
