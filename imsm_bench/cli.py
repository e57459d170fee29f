"""``imsm-bench`` (also ``python -m imsm_bench``): parse the command line, run one protocol, report.

:func:`main` checks the options (:mod:`.options`), prepares ``--out`` (:func:`prepare_out_dir`), runs the protocol
(:mod:`.default` without ``--model``, :mod:`.custom` with your ``--train`` / ``--eval`` sets, :mod:`.real` for
``--protocol real``; each on the shared run loop of :mod:`.engine`), prints the table and writes ``results.json``
and ``results.png`` (:mod:`.report`). ``--protocol library`` has options of its own (:mod:`.library`, parsed there):
:func:`main_library` runs it and writes ``results.json``.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from . import report
from .custom import run_custom
from .default import run_default
from .library import library_requested, library_tables, parse_library_args, run_library
from .options import parse_args
from .parallel import default_jobs
from .real import run_real


def prepare_out_dir(path: str, overwrite: bool) -> None:
    """Create the ``--out`` folder; refuse a file, and a folder with results unless ``overwrite``."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise SystemExit(f"error: --out {path!r} is a file; give a folder.")
    existing = [n for n in ("results.json", "results.png") if os.path.exists(os.path.join(path, n))]
    if existing and not overwrite:
        raise SystemExit(
            f"error: {path!r} already holds results ({', '.join(existing)}); nothing was overwritten. Pass another "
            "--out folder, or --overwrite to replace them."
        )
    os.makedirs(path, exist_ok=True)


def main(argv: list[str] | None = None) -> int:
    """The ``imsm-bench`` command: parse, run the protocol, print the table, write results.json and results.png."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if library_requested(argv):
        return main_library(argv)
    args = parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        raise SystemExit(f"error: --jobs must be >= 1 (got {args.jobs}).")
    try:
        report.require_plotting()  # before the run, not after it
    except ImportError as err:
        raise SystemExit(f"error: {err}") from None
    prepare_out_dir(args.out, args.overwrite)
    if args.seeds < 1:
        raise SystemExit("error: --seeds must be >= 1.")
    start = time.perf_counter()
    custom = args.model and args.protocol != "real"
    if args.jobs is None:
        args.jobs = 1 if custom else default_jobs()
    if custom:
        results = run_custom(args)
    else:
        # The default run and the real-model protocol train and score on ONE thread per run (--jobs runs several at
        # once): float sums depend on the thread count, so this makes their figures the same on every machine and
        # for every --jobs, and another busy process cannot slow two OpenMP threads that wait on each other several-fold.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if args.protocol == "real":
                if not args.model:
                    raise SystemExit("error: --protocol real needs --model (an HF folder, hub id or GGUF file).")
                results = run_real(args)
            else:
                results = run_default(args)
        finally:
            torch.set_num_threads(threads)
    results["wall_seconds"] = time.perf_counter() - start
    text = report.table(results)
    print(f"\n{results['title']}  ({args.seeds} seed(s), metric: {results['metric']})\n")
    print(text)
    for name, row in results["methods"].items():
        if row.get("lora_train_seconds") and row.get("train_seconds"):
            retro, lora = row["train_seconds"]["mean"], row["lora_train_seconds"]["mean"]
            print(f"\n{name}: retrofit {retro:.2f} s vs the LoRA's training {lora:.2f} s ({retro / lora:.2f}x)")
    json_path = report.write_json(results, args.out)
    png_path = report.plot(results, args.out)
    print(f"\nwrote {json_path} and {png_path} in {results['wall_seconds']:.0f} s")
    return 0


def main_library(argv: list[str]) -> int:
    """``imsm-bench --protocol library``: its own options, one torch thread per run (as the real protocol), the
    tables printed and ``results.json`` written (the LoRAs it trains are saved in ``--out``/adapters)."""
    args = parse_library_args(argv)
    prepare_out_dir(args.out, args.overwrite)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = run_library(args)
    finally:
        torch.set_num_threads(threads)
    results["wall_seconds"] = time.perf_counter() - start
    print(f"\n{results['title']}  ({args.seeds} seed(s))\n")
    print(library_tables(results))
    json_path = report.write_json(results, args.out)
    print(f"\nwrote {json_path} in {results['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
