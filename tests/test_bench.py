"""imsm-bench end to end: the default run at reduced size, the custom-data run on the paper's sets, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers

from peft_imsm.bench.cli import main, prepare_out_dir
from peft_imsm.bench.skills import build_tokenizer

REDUCED = [
    "--pretrain-steps", "20", "--steps", "3", "--eval-examples", "4", "--train-examples", "32", "--no-progress",
    "--anchor-weights", "0.5,2",
]  # fmt: skip


def test_default_run_at_reduced_size(tmp_path, capsys):
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    assert main([*REDUCED, "--seeds", "2", "--cache-dir", str(cache), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert (out / "results.png").stat().st_size > 10_000
    methods = results["methods"]
    expected = {
        "base model", "LoRA", "LoRA x0.5 (weight interpolation)", "LoRA + intruder reduction (peft)", "IMSM",
        "IMSM w/o query", "IMSM w/o gate", "LoRA + anchor KL (w=1)", "IMSM + self anchors [gate+adapter] (w=1)",
        "IMSM + self anchors [gate] (w=0.5)", "IMSM + self anchors [gate] (w=2)",
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
    assert methods["base model"]["scores"][tasks[1]]["std"] == 0.0
    # Same seeds, same data: a second run reproduces the figures exactly (the skills LM now comes from the cache).
    subset = "LoRA,IMSM"
    main([*REDUCED, "--seeds", "1", "--cache-dir", str(cache), "--out", str(tmp_path / "again"), "--methods", subset])
    again = json.loads((tmp_path / "again" / "results.json").read_text())["methods"]
    for name in ("LoRA", "IMSM"):
        assert again[name]["per_seed"][0]["scores"] == methods[name]["per_seed"][0]["scores"]


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
        [sys.executable, "-m", "peft_imsm.bench", *args], capture_output=True, text=True, timeout=120,
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
