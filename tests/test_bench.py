"""imsm-bench end to end: the default run at reduced size, the custom-data run on the paper's sets, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers

from imsm_bench.cli import main, prepare_out_dir
from imsm_bench.skills import build_tokenizer

REDUCED = [
    "--pretrain-steps", "20", "--steps", "3", "--eval-examples", "4", "--train-examples", "32", "--no-progress",
    "--anchor-weights", "0.5,2",
]  # fmt: skip


def test_default_run_at_reduced_size(tmp_path, capsys):
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    assert main([*REDUCED, "--seeds", "2", "--cache-dir", str(cache), "--out", str(out), "--jobs", "2"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert (out / "results.png").stat().st_size > 10_000
    methods = results["methods"]
    expected = {
        "base model", "LoRA", "LoRA x0.5 (weight interpolation)", "LoRA + intruder reduction (peft)", "IMSM",
        "IMSM w/o query", "IMSM w/o gate",
        *(f"{kind} (w={w})" for w in ("0.5", "2") for kind in (
            "LoRA + anchor KL", "IMSM + self anchors [gate]", "IMSM + self anchors [gate+adapter]",
            "IMSM w/o gate + self anchors [adapter]", "IMSM route gate + self anchors [gate+adapter]",
            "IMSM route gate + data anchors [gate+adapter]", "LoRA + retrofit [gate]")),
    }  # fmt: skip
    assert set(methods) == expected
    tasks = [results["target"], *results["retention_tasks"]]
    assert len(tasks) == 5
    for name, row in methods.items():
        assert name in printed
        assert len(row["per_seed"]) == 2
        for task in tasks:
            assert 0.0 <= row["scores"][task]["mean"] <= 100.0 and row["scores"][task]["n"] == 2
    assert methods["IMSM"]["gate_target"] is not None and methods["LoRA"]["gate_target"] is None
    assert 0.0 < methods["IMSM"]["gate_target"]["mean"] < 1.0
    assert methods["IMSM w/o gate"]["gate_others"]["mean"] == pytest.approx(0.5)
    assert methods["IMSM w/o gate + self anchors [adapter] (w=2)"]["gate_target"]["mean"] == pytest.approx(0.5)
    assert methods["base model"]["scores"][tasks[1]]["std"] == 0.0
    assert methods["IMSM route gate + data anchors [gate+adapter] (w=2)"]["anchor_data"].startswith("16 train-split")
    assert "anchor_data" not in methods["IMSM route gate + self anchors [gate+adapter] (w=2)"]
    # Same seeds, same data: a second run, one method at a time in this process (--jobs 1) instead of two worker
    # processes, reproduces the figures exactly (the skills LM now comes from the cache).
    subset = [
        "LoRA",
        "IMSM",
        "LoRA + anchor KL (w=2)",
        "IMSM + self anchors [gate+adapter] (w=2)",
        "LoRA + retrofit [gate] (w=0.5)",
        "LoRA + retrofit [gate] (w=2)",
    ]
    again_out = tmp_path / "again"
    argv = [*REDUCED, "--seeds", "2", "--cache-dir", str(cache), "--out", str(again_out), "--jobs", "1"]
    assert main([*argv, "--methods", ",".join([*subset, "LoRA + data anchor KL (w=2)"])]) == 0
    again = json.loads((again_out / "results.json").read_text())["methods"]
    assert again["LoRA + data anchor KL (w=2)"]["scores"][tasks[0]]["n"] == 2  # (an optional row, named to run)
    for name in subset:
        for seed in (0, 1):
            assert again[name]["per_seed"][seed]["scores"] == methods[name]["per_seed"][seed]["scores"], (name, seed)


def _select_anchor_weight():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "select_anchor_weight.py"
    spec = importlib.util.spec_from_file_location("select_anchor_weight", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_validation_split_run_and_the_weight_picked_on_it(tmp_path, capsys):
    """--eval-split validation scores draws of the train split (no test example, no training example) and says so in
    results.json; select_anchor_weight.py picks, per family, the best retention among weights that keep the target."""
    out = tmp_path / "val"
    methods = (
        "LoRA,LoRA + anchor KL (w=0.5),LoRA + anchor KL (w=2),LoRA + retrofit [gate] (w=0.5),"
        "LoRA + retrofit [gate] (w=2),IMSM + self anchors [gate+adapter] (w=2)"
    )
    argv = [*REDUCED, "--seeds", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--jobs", "1",
            "--anchor-every", "2"]  # fmt: skip
    assert main([*argv, "--eval-split", "validation", "--methods", methods]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["eval_split"] == "validation"
    select = _select_anchor_weight()
    assert select.main([str(out / "results.json")]) == 0
    printed = capsys.readouterr().out
    picked = select.pick(results, margin=2.0)
    assert set(picked) == {"LoRA + anchor KL", "LoRA + retrofit [gate]", "IMSM + self anchors [gate+adapter]"}
    assert results["settings"]["finetune"]["anchor_every"] == 2
    floor = results["methods"]["LoRA"]["scores"][results["target"]]["mean"] - 2.0
    for family, choice in picked.items():
        assert f"{family}: w={choice['weight']:g}" in printed
        rows = {
            w: results["methods"][f"{family} (w={w:g})"]
            for w in (0.5, 2.0)
            if f"{family} (w={w:g})" in results["methods"]
        }
        kept = {w: r["retention"]["mean"] for w, r in rows.items() if r["scores"][results["target"]]["mean"] >= floor}
        if kept:
            assert choice["weight"] == max(sorted(kept), key=lambda w: kept[w])


def test_anchor_weight_rule_on_known_figures():
    select = _select_anchor_weight()

    def row(target, retention):
        return {"scores": {"t": {"mean": target}}, "retention": {"mean": retention}}

    results = {"target": "t", "methods": {
        "LoRA": row(90.0, 30.0),
        "KL (w=1)": row(89.0, 50.0), "KL (w=3)": row(88.5, 60.0), "KL (w=10)": row(80.0, 80.0),  # w=10 misses the target
        "G (w=1)": row(70.0, 50.0), "G (w=3)": row(75.0, 60.0),  # none keeps the target: the highest target
        "T (w=1)": row(95.0, 40.0), "T (w=3)": row(95.0, 40.0),  # a tie: the smaller weight
    }}  # fmt: skip
    picked = select.pick(results, margin=2.0)
    assert {f: (p["weight"], p["kept_target"]) for f, p in picked.items()} == {
        "KL": (3.0, True), "G": (3.0, False), "T": (1.0, True),
    }  # fmt: skip


def test_validation_sets_never_meet_the_test_sets_or_the_training_examples():
    from imsm_bench.skills import EVAL_TASKS, TARGET_TASK, make_examples, validation_sets

    train = make_examples(TARGET_TASK, 500, seed=0, split="train")
    sets = validation_sets(50, train)
    assert list(sets) == list(EVAL_TASKS) and sets == validation_sets(50, train)
    for task, rows in sets.items():
        assert len(rows) == 50
        if task != "recall":  # (recall has no split: its test set asks the same memorised facts)
            test = {r["input"] for r in make_examples(task, 500, seed=1, split="test")}
            assert not test & {r["input"] for r in rows}
    assert not {r["input"] for r in train} & {r["input"] for r in sets[TARGET_TASK]}


def test_existing_results_are_never_overwritten_silently(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(SystemExit, match="already holds results.*--overwrite"):
        prepare_out_dir(str(tmp_path), overwrite=False)
    prepare_out_dir(str(tmp_path), overwrite=True)
    assert (tmp_path / "results.json").read_text() == "{}"  # only replaced when the new results are written


def tiny_local_model(path) -> str:
    tok = build_tokenizer()
    tok.model_max_length = 4096
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_custom_run_on_the_papers_sets(tmp_path, benchmarks_dir, capsys):
    model = tiny_local_model(tmp_path / "model")
    out = tmp_path / "out"
    args = [
        "--model", model, "--train", str(benchmarks_dir / "mrpc" / "train.jsonl"), "--limit", "6",
        "--eval", f"mrpc={benchmarks_dir / 'mrpc' / 'test.jsonl'}", "--eval", f"gsm8k={benchmarks_dir / 'gsm8k' / 'test.jsonl'}",
        "--eval", f"webq={benchmarks_dir / 'webq' / 'test.jsonl'}", "--steps", "2", "--seeds", "1",
        "--max-new-tokens", "4", "--no-progress", "--out", str(out), "--methods", "LoRA,IMSM",
    ]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["target"] == "mrpc" and results["retention_tasks"] == ["gsm8k", "webq"]
    assert results["metric"] == {"mrpc": "accuracy", "gsm8k": "gsm8k_accuracy", "webq": "contains_accuracy"}
    assert set(results["methods"]) == {"base model", "LoRA", "IMSM"}
    assert "mrpc (target)" in capsys.readouterr().out


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "imsm_bench", *args], capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip


def test_bad_custom_input_gets_clear_errors(tmp_path):
    model = tiny_local_model(tmp_path / "model")
    good = tmp_path / "good.jsonl"
    good.write_text('{"input": "a?", "output": "b"}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a?", "output": "b"}\n\n{"input": "a?"\n')
    proc = run_cli("--model", model, "--train", str(bad), "--eval", f"x={good}", "--out", str(tmp_path / "o1"))
    assert proc.returncode != 0 and "bad.jsonl" in proc.stderr and "line 3" in proc.stderr
    proc = run_cli("--model", model, "--train", str(good), "--eval", f"x={good}", "--metric", "bleu",
                   "--out", str(tmp_path / "o2"))  # fmt: skip
    assert proc.returncode != 0 and "bleu" in proc.stderr and "exact_match" in proc.stderr
    proc = run_cli("--model", model, "--train", str(good), "--eval", f"mystery={good}", "--out", str(tmp_path / "o3"))
    assert proc.returncode != 0 and "--metric" in proc.stderr
    proc = run_cli("--model", "no-such-org/no-such-model", "--train", str(good), "--eval", f"x={good}",
                   "--metric", "exact_match", "--out", str(tmp_path / "o4"))  # fmt: skip
    assert proc.returncode != 0 and "--model ./NAME" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------------------------
# Data sizes, fine-tuning options, chat templates, second metrics, gates read during the evaluation
# ------------------------------------------------------------------------------------------------------------------
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_rows(path, n: int) -> str:
    path.write_text(
        "".join(json.dumps({"input": f"q{i}?", "output": "yes" if i % 2 else "no"}) + "\n" for i in range(n))
    )
    return str(path)


@pytest.mark.parametrize("size", [None, 0, 3, 10, 50])
def test_sample_rows_is_a_seeded_shuffled_sample(size):
    from imsm_bench.data import sample_rows

    rows = [{"input": str(i), "output": "x"} for i in range(10)]
    picked = sample_rows(rows, size, seed=0)
    assert len(picked) == (10 if size is None else min(size, 10))
    assert picked == sample_rows(rows, size, seed=0)
    assert len({r["input"] for r in picked}) == len(picked)  # without replacement
    assert picked == sample_rows(rows, None, seed=0)[: len(picked)]  # a smaller sample is a prefix of a larger one
    if size in (None, 10, 50):
        assert picked != rows and sorted(picked, key=lambda r: int(r["input"])) == rows  # shuffled, not the head
    with pytest.raises(ValueError, match=">= 0"):
        sample_rows(rows, -1, seed=0)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], {"r": 16, "lora_alpha": 16, "lora_dropout": 0.1, "lr": 3e-4, "batch_size": 8, "target_modules": "all-linear"}),
        (["--rank", "4", "--alpha", "8", "--dropout", "0.05", "--lr", "1e-3", "--batch-size", "2",
          "--target-modules", "q_proj, v_proj"],
         {"r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "lr": 1e-3, "batch_size": 2, "target_modules": ["q_proj", "v_proj"]}),
        (["--target-modules", "all-linear", "--steps", "7"], {"target_modules": "all-linear", "steps": 7}),
    ],
)  # fmt: skip
def test_finetuning_options_reach_the_settings(argv, expected):
    from imsm_bench.options import parse_args, settings_from

    settings = settings_from(parse_args(argv), r=16, lora_alpha=16, lora_dropout=0.1, lr=3e-4, batch_size=8)
    for name, value in expected.items():
        assert getattr(settings, name) == value


def test_bad_finetuning_option_is_refused():
    from imsm_bench.options import parse_args, settings_from

    with pytest.raises(SystemExit, match="r must be >= 1"):
        settings_from(parse_args(["--rank", "0"]))


def test_bad_jobs_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--jobs must be >= 1"):
        main(["--jobs", "0", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_default_jobs_is_one_per_core_on_the_cpu(monkeypatch):
    from imsm_bench import parallel

    monkeypatch.setattr(parallel.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: set(range(3)), raising=False)
    assert parallel.default_jobs() == 3
    assert parallel.default_jobs(max_jobs=2) == 2
    monkeypatch.setattr(parallel.torch.cuda, "is_available", lambda: True)
    assert parallel.default_jobs() == 1


def test_limit_is_an_eval_only_alias(capsys):
    from imsm_bench.options import parse_args

    args = parse_args(["--limit", "5"])
    assert args.eval_size == 5 and args.train_size is None
    assert "deprecated" in capsys.readouterr().err
    assert parse_args(["--limit", "5", "--eval-size", "9"]).eval_size == 9


@pytest.mark.parametrize("chat", [True, False])
def test_chat_template_prompts_for_training(chat):
    from imsm_bench.batching import encode_examples, prompt_ids

    tok = build_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    (ids, labels), = encode_examples(tok, [{"input": "add 1+2=", "output": "3"}], 64, chat=chat)  # fmt: skip
    prompt = "<|user|>add 1+2=\n<|assistant|>" if chat else "add 1+2="
    expected_prompt = tok(prompt, add_special_tokens=not chat)["input_ids"]
    assert prompt_ids(tok, "add 1+2=", chat) == expected_prompt
    assert ids == expected_prompt + tok("3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert labels == [-100] * len(expected_prompt) + ids[len(expected_prompt) :]


def tiny_imsm(seed: int = 0):
    from peft import LoraConfig, get_peft_model

    import peft_imsm  # noqa: F401

    tok = build_tokenizer()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    base = transformers.LlamaForCausalLM(config)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, peft_imsm.IMSMConfig(adapter_config=lora, gate_rank=4, gate_dropout=0.0))
    return model.eval(), tok


@pytest.mark.parametrize("stacked", [True, False])
def test_gates_read_during_generation_equal_a_separate_forward(stacked):
    from imsm_bench.pretrain import generate_answers

    model, tok = tiny_imsm()
    model.base_model.stacked_views = stacked
    prompts = ["add 12+7=", "reverse kobe=", "is 3>1?", "capital of Rulaia?", "<ab> ends:"]
    gates: list[float] = []
    answers = generate_answers(model, tok, prompts, batch_size=2, max_new_tokens=3, gates=gates)
    expected = []
    with torch.no_grad():
        for prompt in prompts:  # one prompt at a time, no padding: the reference mean over the prompt tokens
            with model.base_model.record_gate() as log:
                model(**tok(prompt, return_tensors="pt"), use_cache=False)
            expected.append(float(log[0][0]))
    assert gates == pytest.approx(expected, abs=1e-5)
    assert answers == generate_answers(model, tok, prompts, batch_size=1, max_new_tokens=3)


def test_custom_run_keeps_every_metric_and_uses_the_chat_template(tmp_path, monkeypatch):
    model_dir = tiny_local_model(tmp_path / "model")
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(model_dir)
    train = write_rows(tmp_path / "train.jsonl", 40)
    test = write_rows(tmp_path / "test.jsonl", 30)
    seen: list[list[str]] = []
    from imsm_bench import custom

    real_generate = custom.generate_answers

    def spy(model, tokenizer, prompts, *args, **kwargs):
        seen.append(list(prompts))
        return real_generate(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(custom, "generate_answers", spy)
    common = ["--model", model_dir, "--train", train, "--eval", f"mrpc={test}", "--steps", "1", "--seeds", "1",
              "--max-new-tokens", "2", "--no-progress", "--methods", "LoRA,IMSM", "--eval-size", "6",
              "--train-size", "12"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "chat")]) == 0
    results = json.loads((tmp_path / "chat" / "results.json").read_text())
    assert results["settings"]["chat_template"] is True
    assert results["settings"]["train_rows"] == 12 and results["settings"]["eval_rows"] == {"mrpc": 6}
    assert all(p.startswith("<|user|>") and p.endswith("<|assistant|>") for p in seen[0]) and len(seen[0]) == 6
    assert [p[len("<|user|>") : -len("\n<|assistant|>")] for p in seen[0]] != [f"q{i}?" for i in range(6)]  # sampled
    for row in results["methods"].values():
        assert set(row["metrics"]["mrpc"]) == {"accuracy", "binary_f1"}
        assert row["metrics"]["mrpc"]["accuracy"] == row["scores"]["mrpc"]
        assert set(row["per_seed"][0]["metrics"]["mrpc"]) == {"accuracy", "binary_f1"}
    assert results["methods"]["IMSM"]["gate_target"] is not None
    seen.clear()
    assert main([*common, "--no-chat-template", "--out", str(tmp_path / "raw")]) == 0
    assert json.loads((tmp_path / "raw" / "results.json").read_text())["settings"]["chat_template"] is False
    assert not any(p.startswith("<|user|>") for p in seen[0])


@pytest.mark.parametrize("seed", [0, 1])
def test_real_protocol_target_task_splits(seed):
    from imsm_bench.real import TAG_CATEGORIES, TAG_PROMPT, tag_examples

    train = tag_examples(500, "train", seed)
    test = tag_examples(32, "test", seed)
    assert train == tag_examples(500, "train", seed) and test == tag_examples(32, "test", seed)
    words = {word: label for label, ws in TAG_CATEGORIES.items() for word in ws}
    assert len(words) == sum(map(len, TAG_CATEGORIES.values()))  # no word in two categories
    for row in train + test:
        word = row["input"].removeprefix(TAG_PROMPT.format(word=""))
        assert row["output"] == words[word]
    assert {r["input"] for r in train}.isdisjoint({r["input"] for r in test})
    assert len({r["input"] for r in test}) == 32  # each test word once
    assert {r["output"] for r in test} == set(TAG_CATEGORIES)
    with pytest.raises(ValueError, match="split"):
        tag_examples(1, "dev", seed)


def test_teacher_forced_scores_are_exact_on_a_tiny_model():
    """Exact match by teacher forcing == greedy generation returning the answer; padding changes nothing."""
    from imsm_bench.real import exact_match_rate, greedy_answers, likelihood_kept, teacher_forced, token_agreement

    model, tok = tiny_imsm()
    prompts = [tok(p)["input_ids"] for p in ("add 1+2=", "reverse abcdef=", "x", "is 10>3?")]
    answers = greedy_answers(model, tok, prompts, max_new_tokens=5, batch_size=3)
    pairs = list(zip(prompts, answers, strict=True))
    gates: list[float] = []
    scored = teacher_forced(model, pairs, tok.pad_token_id, batch_size=3, gates=gates)
    assert exact_match_rate(scored) == 100.0 and token_agreement(scored) == 100.0 and len(gates) == 4
    one_by_one = [teacher_forced(model, [p], tok.pad_token_id)[0] for p in pairs]
    for a, b in zip(scored, one_by_one, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4) and (a.matches, a.length) == (b.matches, b.length)
    assert likelihood_kept(scored, one_by_one) == pytest.approx(100.0, abs=1e-2)
    shifted = [(p, [(a[0] + 1) % len(tok)] + a[1:]) for p, a in pairs]
    worse = teacher_forced(model, shifted, tok.pad_token_id)
    assert exact_match_rate(worse) == 0.0 and likelihood_kept(worse, scored) < 100.0


# ------------------------------------------------------------------------------------------------------------------
# The benchmark is a separate package: the library never imports it, and its own imports have no cycle
# ------------------------------------------------------------------------------------------------------------------
def test_the_library_imports_neither_the_benchmark_nor_matplotlib():
    code = "import peft_imsm, sys; print(sorted(m for m in sys.modules if m.startswith(('imsm_bench','matplotlib'))))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def _package_imports(package: str) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}`` from the source (ast), refusing imports inside functions."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    modules = {f"{package}.{path.stem}" for path in (root / package).glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in sorted((root / package).glob("*.py")):
        module = f"{package}.{path.stem}" if path.stem != "__init__" else package
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        graph[module] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                names = [f"{package}.{node.module}"] if node.module else [f"{package}.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package):
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith(package)]
            else:
                continue
            assert not names or id(node) in top, f"{module}, line {node.lineno}: import inside a function"
            graph[module].update(n for n in names if n in modules)
    return graph


def test_the_benchmark_imports_go_one_way():
    graph = _package_imports("imsm_bench")
    assert {"imsm_bench.options", "imsm_bench.engine", "imsm_bench.default", "imsm_bench.custom"} <= set(graph)
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module not in done:
            for imported in graph.get(module, ()):
                visit(imported, (*path, module))
            done.add(module)

    for module in graph:
        visit(module, ())


def test_hard_route_chooses_one_view_per_prompt():
    """``hard_route`` (the optional "(hard choice)" rows): ``route_threshold`` set, so every prompt's gate is exactly 0
    or 1, on the side the soft gate leaned to."""
    from helpers import adapter_config, batch, perturb_adapter, tiny_model
    from peft import get_peft_model

    from imsm_bench.runner import hard_route
    from peft_imsm import AnchorConfig, IMSMConfig

    config = IMSMConfig(adapter_config=adapter_config("lora", identity=False), gate_mode="route",
                        anchor=AnchorConfig(num_samples=4, sample_length=4), route_threshold=None)  # fmt: skip
    model = get_peft_model(tiny_model("llama"), config)
    perturb_adapter(model)
    gate = model.base_model.gate
    with torch.no_grad():  # a router that sends some prompts each way
        gate.W_R.weight.copy_(torch.randn(gate.W_R.weight.shape, generator=torch.Generator().manual_seed(0)))
    ids, mask = batch(batch_size=8)
    model.eval()
    with torch.no_grad(), model.base_model.record_gate() as soft:
        model(input_ids=ids, attention_mask=mask)
    hard_route(model)
    with torch.no_grad(), model.base_model.record_gate() as hard:
        model(input_ids=ids, attention_mask=mask)
    soft_g, hard_g = soft[0], hard[0]  # ([batch] mean gate of each prompt)
    assert set(hard_g.tolist()) == {0.0, 1.0}, hard_g
    assert torch.equal(hard_g, (soft_g > 0.5).float())
