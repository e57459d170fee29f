"""Cost of a linear layer on 2 rows versus 1 row: what IMSM's doubled batch pays at batch-1 decoding.

IMSM runs the frozen and the adapted view of a LoRA model as one doubled batch, so at batch 1 every weight matrix
multiplies 2 rows where plain LoRA multiplies 1. Where decoding is bound by reading the weights the second row is
nearly free; this script measures what it costs on the machine at hand, for the weights of the 8-layer model of
``generation_speed.py`` (too large for the CPU caches, as in a real decode step).

    python benchmarks/matmul_rows.py [--dtypes float32,bfloat16] [--device cpu|cuda] [--batches 1,8]

For each batch size n it prints the time of the sweep on 2n rows (IMSM's doubled batch) over that on n rows (LoRA).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from bench_model import linear_shapes  # benchmarks/bench_model.py


def sweep_ms(weights: list[torch.Tensor], rows: int, repeats: int) -> float:
    inputs = {w.shape[1]: torch.randn(rows, 1, w.shape[1], dtype=w.dtype, device=w.device) for w in weights}
    times = []
    for _ in range(repeats):
        if weights[0].device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for w in weights:
            F.linear(inputs[w.shape[1]], w)
        if weights[0].device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes n: n rows vs 2n rows")
    args = parser.parse_args()
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            parser.error(f"--dtypes: {name!r} is not a torch dtype")
        weights = [torch.randn(o, i, dtype=dtype, device=args.device) for o, i in linear_shapes()]
        sweep_ms(weights, 1, 3)  # warm-up
        for n in [int(b) for b in args.batches.split(",")]:
            single, double = [], []
            for _ in range(3):  # interleaved, so noise hits both
                single.append(sweep_ms(weights, n, args.repeats))
                double.append(sweep_ms(weights, 2 * n, args.repeats))
            t1, t2 = statistics.median(single), statistics.median(double)
            print(f"{name:>9} on {args.device}: {n:>2} rows {t1:6.2f} ms | {2 * n:>2} rows {t2:6.2f} ms | ratio "
                  f"{t2 / t1:.2f}x (threads={torch.get_num_threads()})")  # fmt: skip


if __name__ == "__main__":
    main()
