"""``imsm-serve OUT_DIR``: serve a hard-routed route-gate IMSM export with vLLM's own multi-LoRA, at LoRA's cost.

A route gate with a ``route_threshold`` runs, per prompt, the base model alone (router value
``g = sigmoid(q_frozen @ W_R^T + b_R) > threshold``) or the base + LoRA alone. ``imsm-export`` writes such an adapter
as the base model's folder with a plain peft LoRA in ``OUT_DIR/lora`` and the router (``peft_imsm.export_route``;
names in :mod:`imsm_vllm.export_format`). This module serves it with three processes, whose lifetimes are tied (the
front stops both servers when it stops; Linux also stops them when the front is killed):

* the generation server: vLLM's OpenAI server on ``OUT_DIR`` with ``--enable-lora --lora-modules NAME=OUT_DIR/lora
  --max-lora-rank R --max-loras 2`` (:data:`MAX_LORAS`) and vLLM's defaults otherwise: prefix caching on, chunked
  prefill, one KV cache of the base model's size. Both routes are ordinary vLLM requests (the base model, or the
  LoRA by its name);
* the routing server: vLLM's pooling runner on the same folder (``--runner pooling --convert embed``, MEAN pooling
  without normalisation), whose embedding of a prompt is the mean of the base model's final (normed) hidden states
  over its tokens: ``q_frozen``, the router's input. (vLLM's generate runner returns no hidden states, and one vLLM
  instance runs one runner, hence a second server; it holds a second copy of the weights and a small KV cache, and
  runs one prefill per request, on one CPU thread unless ``--pooling-env`` says otherwise: :data:`ROUTING_ENV`);
* the front (:class:`RouteFront`, aiohttp), on the user's port: for ``/v1/chat/completions`` and ``/v1/completions``
  it tokenizes the prompt with the generation server's ``/tokenize`` (the same chat template and options as the
  request), sends those token ids to the routing server, computes ``g`` in float32 (:func:`router_value`) and
  forwards the request unchanged but for ``model``: the LoRA's name (``g <= threshold``, route ``adapted``) or the
  base's served name (route ``frozen``). Streaming responses pass through. The response's ``model`` field names the
  model that answered; the headers ``x-imsm-route`` (``frozen`` / ``adapted``), ``x-imsm-gate`` (``g``) and
  ``x-imsm-prompt-tokens`` say how it was routed, and the front logs one line per request. Every other path
  (``/v1/models``, ``/tokenize``, ``/metrics``, ...) goes to the generation server as it is; ``/health`` answers 200
  when both servers do.

Usage (in the vLLM environment; OUT_DIR first, then this command's options, then vLLM's, given to both servers)::

    imsm-serve OUT_DIR [--host 127.0.0.1] [--port 8000] [--served-model-name NAME] [--log-dir DIR]
        [--generate-args "..."] [--pooling-args "..."] [--pooling-kv-cache-gib 1] [vLLM options for both servers]

(``python -m imsm_vllm.router`` is the same command.) Imports neither ``peft_imsm`` nor vLLM: torch and safetensors
for the router, aiohttp for the front (all in vLLM's environment).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shlex
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import client
from .export_format import (
    CONFIG_SECTION,
    GATE_HEADER,
    LORA_FILES,
    MAX_LORA_RANKS,
    PROMPT_TOKENS_HEADER,
    ROUTE_CONFIG_FILE,
    ROUTE_CONFIG_KEYS,
    ROUTE_FORMAT_VERSION,
    ROUTE_HEADER,
    ROUTER_BIAS,
    ROUTER_WEIGHT,
    route_of,
)

GENERATE_PATHS = ("/v1/chat/completions", "/v1/completions")
# Options that imsm-serve gives the servers itself (a second value would contradict it).
OWN_OPTIONS = ("--model", "--host", "--port", "--served-model-name", "--enable-lora", "--lora-modules",
               "--max-lora-rank", "--max-loras", "--runner", "--convert", "--pooler-config")  # fmt: skip
# Two LoRA slots for the one LoRA: vLLM's CPU LoRA ops (vllm/lora/ops/torch_ops, vLLM 0.32) read a base-model token's
# "no LoRA" index -1 as the LAST slot, so with one slot (the default --max-loras 1) a base-model request batched with
# LoRA requests got the LoRA's update (vllm-project/vllm#48421). The second slot is never filled: its zeros add nothing.
MAX_LORAS = 2
# The routing server's environment unless --pooling-env says otherwise: one CPU thread. On a CPU both servers compute
# at once; two OpenMP teams on the same cores stall each other at every barrier (measured on 2 cores: 0.56x of vLLM's
# multi-LoRA throughput with the routing server on 2 threads, 0.91x on 1). Its work, one prefill per request, is
# small beside the generation server's. (On a GPU the setting only touches the CPU side.)
ROUTING_ENV = {"OMP_NUM_THREADS": "1"}
POOLER_CONFIG = {"pooling_type": "MEAN", "use_activation": False}
# TokenizeChatRequest's fields (vLLM 0.32): the chat request's settings that decide its prompt tokens.
CHAT_TOKENIZE_FIELDS = ("messages", "add_generation_prompt", "continue_final_message", "add_special_tokens",
                        "chat_template", "chat_template_kwargs", "media_io_kwargs", "mm_processor_kwargs", "tools")  # fmt: skip
# Request headers passed on to the servers (the API key, the request id); hop-by-hop headers are not.
FORWARDED_HEADERS = ("authorization", "x-request-id", "content-type")
# Idle connections to the servers are closed after this many seconds, before vLLM's server closes them
# (VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s): a request sent on a connection the server is closing fails with "Server
# disconnected". A request that still meets a closed connection is sent once more on a new one.
KEEPALIVE_S = 2.0


class RouteError(ValueError):
    """A folder or setting that ``imsm-serve`` cannot serve (the message says why and what to do)."""


@dataclass
class RouteExport:
    """A route-format folder, checked (:func:`load_route`)."""

    folder: Path
    threshold: float
    lora_name: str
    lora_dir: Path
    max_lora_rank: int
    hidden_size: int
    W_R: Any  # torch.Tensor [1, d] float32
    b_R: Any  # torch.Tensor [1] float32


def load_route(out_dir: str | os.PathLike) -> RouteExport:
    """Read and check the route export in ``out_dir`` (``imsm_route.json``, the router, the LoRA folder)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(out_dir)
    again = "Export the adapter again with imsm-export (of this peft-imsm release)."
    if not folder.is_dir():
        raise RouteError(f"OUT_DIR {str(folder)!r} is not a folder. Pass the folder that imsm-export wrote.")
    path = folder / ROUTE_CONFIG_FILE
    if not path.is_file():
        raise RouteError(_not_route_export(folder))
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RouteError(f"{path} cannot be read as JSON ({type(exc).__name__}: {exc}). {again}") from None
    missing = [key for key in ROUTE_CONFIG_KEYS if not isinstance(config, dict) or key not in config]
    if missing:
        raise RouteError(f"{path} lacks {', '.join(missing)}. {again}")
    if config["format_version"] != ROUTE_FORMAT_VERSION:
        raise RouteError(
            f"{path} has format_version {config['format_version']!r}; this imsm-serve reads version "
            f"{ROUTE_FORMAT_VERSION}. {again}"
        )
    threshold = config["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 < threshold < 1.0:
        raise RouteError(f"{path} has threshold {threshold!r}; it must be a number strictly between 0 and 1. {again}")
    if config["max_lora_rank"] not in MAX_LORA_RANKS:
        raise RouteError(
            f"{path} has max_lora_rank {config['max_lora_rank']!r}, which vLLM's --max-lora-rank does not accept "
            f"({', '.join(map(str, MAX_LORA_RANKS))}). {again}"
        )
    lora_dir = folder / config["lora_dir"]
    absent = [name for name in LORA_FILES if not (lora_dir / name).is_file()]
    if absent:
        raise RouteError(f"The LoRA folder {lora_dir} lacks {', '.join(absent)}. {again}")
    router_path = folder / config["router_file"]
    try:
        tensors = load_file(str(router_path))
    except (OSError, SafetensorError) as exc:
        raise RouteError(
            f"The router file {router_path} cannot be read ({type(exc).__name__}: {exc}). {again}"
        ) from None
    d = config["hidden_size"]
    for key, shape in ((ROUTER_WEIGHT, (1, d)), (ROUTER_BIAS, (1,))):
        value = tensors.get(key)
        if value is None or tuple(value.shape) != shape or value.dtype != torch.float32:
            got = "missing" if value is None else f"{value.dtype} of shape {tuple(value.shape)}"
            raise RouteError(
                f"The router file {router_path}: {key} is {got}; hidden size {d} needs float32 of shape {shape}. "
                f"{again}"
            )
        if not torch.isfinite(value).all():
            raise RouteError(f"The router file {router_path}: {key} holds NaN or infinite values. {again}")
    return RouteExport(folder=folder, threshold=float(threshold), lora_name=str(config["lora_name"]), lora_dir=lora_dir,
                       max_lora_rank=int(config["max_lora_rank"]), hidden_size=int(d), W_R=tensors[ROUTER_WEIGHT],
                       b_R=tensors[ROUTER_BIAS])  # fmt: skip


def _not_route_export(folder: Path) -> str:
    try:
        plugin = CONFIG_SECTION in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        plugin = False
    if plugin:
        return (
            f"{folder} is an imsm-export folder for the imsm_vllm plugin (its config.json has an imsm section), not a "
            f"route export ({ROUTE_CONFIG_FILE}): serve it with `python -m vllm.entrypoints.openai.api_server "
            f"--model {folder}` (docs/serving.md). imsm-serve serves a route gate exported with a route_threshold."
        )
    return (
        f"{folder} holds no {ROUTE_CONFIG_FILE}: it is not a route export. Export a route-gate IMSM adapter (gate_mode"
        "='route' with a route_threshold) with `imsm-export ADAPTER_DIR OUT_DIR` and pass OUT_DIR."
    )


def router_value(q: Any, W_R: Any, b_R: Any) -> float:
    """``g = sigmoid(q @ W_R^T + b_R)`` in float32 for one ``[d]`` summary ``q`` (as ``IMSMGate`` computes it)."""
    import torch
    import torch.nn.functional as F

    return float(torch.sigmoid(F.linear(q.float()[None], W_R.float(), b_R.float()))[0, 0])


def decode_embedding(data: str, hidden_size: int) -> Any:
    """The ``[d]`` float32 tensor of a base64 float32 little-endian embedding from vLLM's ``/v1/embeddings``."""
    import numpy as np
    import torch

    values = np.frombuffer(base64.b64decode(data), dtype="<f4")
    if values.size != hidden_size:
        raise RouteError(f"The routing server returned {values.size} values, not the hidden size {hidden_size}.")
    return torch.from_numpy(values.astype(np.float32))


def check_vllm_args(args: list[str], where: str) -> None:
    """Refuse vLLM options that ``imsm-serve`` sets itself (:data:`OWN_OPTIONS`)."""
    for arg in args:
        name = arg.split("=", 1)[0]
        if name in OWN_OPTIONS:
            raise RouteError(
                f"{where} holds {name}, which imsm-serve sets itself ({', '.join(OWN_OPTIONS)}: the model is OUT_DIR, "
                "the LoRA and the pooling runner come from the export, --host / --port / --served-model-name are "
                "imsm-serve's own options for the front). Leave it out."
            )


def parse_env(items: list[str], option: str) -> dict[str, str]:
    """``{NAME: VALUE}`` of ``NAME=VALUE`` items."""
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise RouteError(f"{option} {item!r} is not NAME=VALUE. Pass e.g. {option} OMP_NUM_THREADS=1.")
        env[name] = value
    return env


def generation_command(route: RouteExport, port: int, served_name: str, common: list[str],
                       extra: list[str]) -> list[str]:  # fmt: skip
    """The generation server: the base model with the LoRA (vLLM's multi-LoRA, :data:`MAX_LORAS` slots), vLLM's
    defaults otherwise."""
    return [*client.vllm_command(sys.executable, route.folder), "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", served_name, "--enable-lora", "--lora-modules",
            f"{route.lora_name}={route.lora_dir}", "--max-lora-rank", str(route.max_lora_rank), "--max-loras",
            str(MAX_LORAS), *common, *extra]  # fmt: skip


def pooling_command(route: RouteExport, port: int, served_name: str, common: list[str],
                    extra: list[str]) -> list[str]:  # fmt: skip
    """The routing server: the base model on vLLM's pooling runner, MEAN pooling, no normalisation."""
    return [*client.vllm_command(sys.executable, route.folder), "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", served_name, "--runner", "pooling", "--convert", "embed", "--pooler-config",
            json.dumps(POOLER_CONFIG), *common, *extra]  # fmt: skip


def _error(status: int, message: str) -> Any:
    from aiohttp import web

    body = {"error": {"message": message, "type": "BadRequestError" if status < 500 else "InternalServerError",
                      "code": status}}  # fmt: skip
    return web.json_response(body, status=status)


class Upstream(Exception):
    """An answer of a server that the front returns to the client as it is (an error of ``/tokenize``, ...)."""

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        super().__init__(status)
        self.status, self.body, self.content_type = status, body, content_type


class RouteFront:
    """The OpenAI-compatible front: routes each generation request (see the module docstring)."""

    def __init__(self, route: RouteExport, served_name: str, generate_url: str, pooling_url: str) -> None:
        self.route, self.served_name = route, served_name
        self.generate_url, self.pooling_url = generate_url, pooling_url
        self.session = None
        self.routed = {"frozen": 0, "adapted": 0}

    def app(self) -> Any:
        from aiohttp import web

        app = web.Application(client_max_size=64 * 1024**2)
        for path in GENERATE_PATHS:
            app.router.add_post(path, self.generate)
        app.router.add_get("/health", self.health)
        app.router.add_route("*", "/{tail:.*}", self.proxy)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, app: Any) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S)
        self.session = aiohttp.ClientSession(timeout=timeout, connector=connector)

    async def _close(self, app: Any) -> None:
        await self.session.close()

    async def _post(self, url: str, body: dict, headers: dict) -> Any:
        """``session.post``'s response (to be closed: ``async with``), the request sent once more on a new connection when the server
        closed the kept-alive one before answering (:data:`KEEPALIVE_S`)."""
        import aiohttp

        try:
            return await self.session.post(url, json=body, headers=headers)
        except aiohttp.ServerDisconnectedError:
            return await self.session.post(url, json=body, headers=headers)

    async def _post_json(self, url: str, body: dict, headers: dict) -> dict:
        response = await self._post(url, body, headers)
        async with response:
            data = await response.read()
            if response.status != 200:
                raise Upstream(response.status, data, response.content_type)
            return json.loads(data)

    async def prompt_ids(self, body: dict, chat: bool, headers: dict) -> list[int]:
        """The prompt's token ids as the generation server will see them (its ``/tokenize``)."""
        if chat:
            request = {key: body[key] for key in CHAT_TOKENIZE_FIELDS if key in body}
            request["model"] = self.served_name
            return (await self._post_json(f"{self.generate_url}/tokenize", request, headers))["tokens"]
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # (a batch of one prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        if isinstance(prompt, str):
            request = {"model": self.served_name, "prompt": prompt,
                       "add_special_tokens": body.get("add_special_tokens", True)}  # fmt: skip
            return (await self._post_json(f"{self.generate_url}/tokenize", request, headers))["tokens"]
        raise RouteError(
            "imsm-serve routes one prompt per request: `prompt` must be a string or a list of token ids (got "
            f"{type(prompt).__name__}{' of ' + str(len(prompt)) + ' prompts' if isinstance(prompt, list) else ''}). "
            "Send each prompt as its own request (each is routed by its own prompt)."
        )

    async def gate(self, ids: list[int], headers: dict) -> float:
        """``g`` of the prompt ``ids``: the routing server's mean final hidden state, through the router."""
        request = {"model": self.served_name, "input": ids, "use_activation": False, "encoding_format": "base64",
                   "embed_dtype": "float32", "endianness": "little", "add_special_tokens": False}  # fmt: skip
        data = await self._post_json(f"{self.pooling_url}/v1/embeddings", request, headers)
        q = decode_embedding(data["data"][0]["embedding"], self.route.hidden_size)
        return router_value(q, self.route.W_R, self.route.b_R)

    async def generate(self, request: Any) -> Any:
        """A chat or completion request: routed, then forwarded to the generation server."""
        import aiohttp
        from aiohttp import web

        start = time.perf_counter()
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(400, f"The request body is not JSON ({type(exc).__name__}: {exc}).")
        if not isinstance(body, dict):
            return _error(400, f"The request body is a JSON {type(body).__name__}, not an object.")
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
        try:
            ids = await self.prompt_ids(body, request.path == GENERATE_PATHS[0], headers)
            tokenized = time.perf_counter()
            g = await self.gate(ids, headers)
            timing = (tokenized - start, time.perf_counter() - tokenized)  # (tokenize, routing pass + router)
        except aiohttp.ClientError as exc:
            self._log(request, "-", None, None, 502, start)
            return _error(502, f"imsm-serve could not route the request: a vLLM server failed ({exc!r}).")
        except Upstream as up:
            self._log(request, "-", None, None, up.status, start)
            return web.Response(status=up.status, body=up.body, content_type=up.content_type)
        except RouteError as exc:
            self._log(request, "-", None, None, 400, start)
            return _error(400, str(exc))
        route = route_of(g, self.route.threshold)
        self.routed[route] += 1
        body["model"] = self.route.lora_name if route == "adapted" else self.served_name
        route_headers = {ROUTE_HEADER: route, GATE_HEADER: repr(g), PROMPT_TOKENS_HEADER: str(len(ids))}
        try:
            up = await self._post(f"{self.generate_url}{request.path_qs}", body, headers)
        except aiohttp.ClientError as exc:
            self._log(request, route, g, len(ids), 502, start, timing)
            return _error(502, f"imsm-serve routed the request ({route}) but the generation server failed ({exc!r}).")
        async with up:
            if body.get("stream"):
                response = web.StreamResponse(status=up.status, headers=route_headers)
                response.content_type = up.content_type
                await response.prepare(request)
                async for chunk in up.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            else:
                data = await up.read()
                response = web.Response(status=up.status, body=data, headers=route_headers,
                                        content_type=up.content_type)  # fmt: skip
        self._log(request, route, g, len(ids), up.status, start, timing)
        return response

    async def health(self, request: Any) -> Any:
        from aiohttp import web

        for url in (self.generate_url, self.pooling_url):
            try:
                async with self.session.get(f"{url}/health") as up:
                    if up.status != 200:
                        return web.Response(status=503, text=f"{url}/health: {up.status}")
            except OSError as exc:
                return web.Response(status=503, text=f"{url}/health: {type(exc).__name__}")
        return web.Response(status=200)

    async def proxy(self, request: Any) -> Any:
        """Any other path: to the generation server, as it is."""
        from aiohttp import web

        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
        async with self.session.request(request.method, f"{self.generate_url}{request.path_qs}",
                                        data=await request.read(), headers=headers) as up:  # fmt: skip
            data = await up.read()
            return web.Response(status=up.status, body=data, content_type=up.content_type)

    def _log(self, request: Any, route: str, g: float | None, tokens: int | None, status: int, start: float,
             timing: tuple[float, float] | None = None) -> None:  # fmt: skip
        """One line per request: its route, ``g``, prompt length, status, seconds in all, and of them the seconds of
        the tokenization and of the routing pass (pooling server + router)."""
        gate = "-" if g is None else f"{g:.6f}"
        parts = "" if timing is None else f" tokenize_seconds={timing[0]:.4f} routing_seconds={timing[1]:.4f}"
        print(f"imsm-serve: {request.method} {request.path} route={route} g={gate} prompt_tokens={tokens or '-'} "
              f"status={status} seconds={time.perf_counter() - start:.3f}{parts}", flush=True)  # fmt: skip


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="imsm-serve",
        allow_abbrev=False,
        description="Serve a route-gate IMSM export (imsm-export of a route gate with a route_threshold) with vLLM's "
        "own multi-LoRA: each request runs the base model or the LoRA, as its prompt's router value says. Options "
        "this command does not know are vLLM's and go to both of its vLLM servers.",
    )
    parser.add_argument("out_dir", help="the folder imsm-export wrote (it holds imsm_route.json)")
    parser.add_argument("--host", default="127.0.0.1", help="the front's address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="the front's port (default 8000)")
    parser.add_argument("--served-model-name", default=None, help="the base's model name (default: OUT_DIR as given)")
    parser.add_argument("--generate-args", default="", help="vLLM options for the generation server only (a string)")
    parser.add_argument("--pooling-args", default="", help="vLLM options for the routing (pooling) server only")
    parser.add_argument(
        "--pooling-kv-cache-gib", type=int, default=1,
        help="VLLM_CPU_KVCACHE_SPACE (whole GiB) of the routing server (CPU builds; it holds each prompt only while it "
        "pools it)",
    )  # fmt: skip
    parser.add_argument(
        "--generate-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the generation server only (repeatable)",
    )
    parser.add_argument(
        "--pooling-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the routing server only (repeatable; default OMP_NUM_THREADS=1), e.g. "
        "VLLM_CPU_OMP_THREADS_BIND=15 to give it a core of its own on a CPU",
    )
    parser.add_argument("--log-dir", default=None, help="where the two servers' logs go (default: a new temp folder)")
    parser.add_argument("--startup-timeout", type=float, default=900.0, help="seconds for each server to start")
    return parser.parse_known_args(argv)


class _Stop(Exception):
    """SIGTERM / SIGINT while the servers start."""


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop(signum)


def main(argv: list[str] | None = None) -> int:
    args, common = parse_args(argv)
    try:
        generate_extra, pooling_extra = shlex.split(args.generate_args), shlex.split(args.pooling_args)
        for given, where in ((common, "The vLLM options"), (generate_extra, "--generate-args"),
                             (pooling_extra, "--pooling-args")):  # fmt: skip
            check_vllm_args(given, where)
        envs = {
            "generation": parse_env(args.generate_env, "--generate-env"),
            "routing": {
                **ROUTING_ENV,
                "VLLM_CPU_KVCACHE_SPACE": str(args.pooling_kv_cache_gib),
                **parse_env(args.pooling_env, "--pooling-env"),
            },
        }
        route = load_route(args.out_dir)
    except (RouteError, ValueError) as exc:
        print(f"imsm-serve: error: {exc}", file=sys.stderr)
        return 2
    served_name = args.served_model_name or str(args.out_dir)
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="imsm-serve-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    ports = {"generation": client.free_port(), "routing": client.free_port()}
    commands = {
        "generation": generation_command(route, ports["generation"], served_name, common, generate_extra),
        "routing": pooling_command(route, ports["routing"], served_name, common, pooling_extra),
    }
    procs: dict[str, Any] = {}
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        for name, cmd in commands.items():
            log = log_dir / f"{name}-server.log"
            procs[name] = client.launch_server(cmd, log, envs[name], die_with_parent=True)
            print(f"imsm-serve: {name} server pid {procs[name].pid} on port {ports[name]}, log {log}:\n  "
                  f"{shlex.join(cmd)}", flush=True)  # fmt: skip
        for name, proc in procs.items():
            client.wait_until_healthy(proc, ports[name], args.startup_timeout, what=f"imsm-serve's {name} server")
        front = RouteFront(route, served_name, f"http://127.0.0.1:{ports['generation']}",
                           f"http://127.0.0.1:{ports['routing']}")  # fmt: skip
        return asyncio.run(_serve(front, procs, args.host, args.port))
    except (RuntimeError, TimeoutError) as exc:
        print(f"imsm-serve: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except (_Stop, KeyboardInterrupt):
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for proc in procs.values():
            client.stop_server(proc)
        print("imsm-serve: stopped both vLLM servers", flush=True)


async def _serve(front: RouteFront, procs: dict[str, Any], host: str, port: int) -> int:
    """Run the front until SIGTERM / SIGINT (0), or until a vLLM server exits (1, with its log's tail)."""
    from aiohttp import web

    runner = web.AppRunner(front.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"imsm-serve: ready on http://{host}:{port} (threshold {front.route.threshold:g}: g > threshold runs the "
          f"base model {front.served_name!r}, else the LoRA {front.route.lora_name!r})", flush=True)  # fmt: skip
    code = 0
    try:
        while not stop.is_set():
            dead = [name for name, proc in procs.items() if proc.poll() is not None]
            if dead:
                proc = procs[dead[0]]
                print(f"imsm-serve: error: the {dead[0]} server exited with code {proc.returncode}; the end of "
                      f"{proc.imsm_log_path}:\n{client._tail(proc.imsm_log_path)}", file=sys.stderr, flush=True)  # fmt: skip
                code = 1
                break
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
    finally:
        await runner.cleanup()
    print(f"imsm-serve: routed {front.routed['frozen']} request(s) to the base model, {front.routed['adapted']} to "
          "the LoRA", flush=True)  # fmt: skip
    return code


if __name__ == "__main__":
    raise SystemExit(main())
