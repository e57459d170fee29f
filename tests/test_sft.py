"""``imsm-sft`` (``peft_imsm/sft.py``): TRL's SFT script with IMSM, run end to end on a tiny local model, offline.

The runs train in subprocesses (the console script, ``python -m peft_imsm.sft`` and a small driver that calls
``peft_imsm.sft.run`` and keeps the trained model's logits); a fresh process reloads every output directory with
``AutoPeftModelForCausalLM`` after ``import peft_imsm``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "examples" / "recipes").glob("*.yaml"))
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "copy", "reverse", ":"] + list("abcdefghijklmnopqrstuvwxyz")
VOCAB = 48  # model vocabulary (>= len(WORDS))
# The fixed input the trained and the reloaded models are compared on: [2, 6], the second row left-padded.
PROBE_IDS = [[4, 7, 8, 9, 6, 7], [0, 0, 5, 10, 11, 6]]
PROBE_MASK = [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "WANDB_DISABLED": "true",
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
}
# Flags every training run shares: a few optimizer steps on CPU, nothing reported, logs every step.
TRAIN_FLAGS = [
    "--max_steps", "4", "--per_device_train_batch_size", "8", "--learning_rate", "2e-2", "--logging_steps", "1",
    "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--max_length", "32", "--seed", "0",
    "--disable_tqdm", "true", "--dataloader_num_workers", "0",
]  # fmt: skip
LORA_FLAGS = ["--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.0"]

# Run inside the subprocesses: train with peft_imsm.sft.run and save what the test compares.
DRIVER = textwrap.dedent(
    """
    import sys, torch, trl
    from transformers import TrainerCallback
    from peft_imsm.sft import parse_args, run

    torch.set_num_threads(1)

    class SnapshotTrainable(TrainerCallback):
        "Keeps the trainable parameters as they are before the first optimizer step."
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    out_file, probe_file, *argv = sys.argv[1:]
    snapshot = SnapshotTrainable()
    parsed = parse_args(argv)
    trainer = run(parsed.trl_args, parsed.imsm_args, parsed.peft_config, callbacks=[snapshot])
    assert type(trainer) is trl.SFTTrainer, type(trainer)  # TRL's own trainer class, not a subclass
    probe = torch.load(probe_file)
    # Accelerate wrapped the forward in bf16 autocast for training (SFTConfig's bf16 default, also on CPU): compare
    # the trained weights' float32 function, as a reload computes it.
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    with torch.no_grad():
        logits = model(**probe).logits.float()
    torch.save({"logits": logits, "init": snapshot.init, "log_history": trainer.state.log_history}, out_file)
    """
)

# Run in a fresh process: reload every given output directory the peft way and compute its logits on the probe.
RELOAD = textwrap.dedent(
    """
    import sys, torch
    import peft_imsm
    from peft import AutoPeftModelForCausalLM
    from transformers import BitsAndBytesConfig

    torch.set_num_threads(1)
    out_file, probe_file, *dirs = sys.argv[1:]
    probe = torch.load(probe_file)
    result = {}
    for spec in dirs:
        path, _, quant = spec.partition("::")
        # The quantization `imsm-sft --load_in_4bit` trains with (TRL's defaults: NF4, compute dtype of the model).
        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        kwargs = {"quantization_config": nf4, "dtype": torch.float32} if quant == "4bit" else {}
        model = AutoPeftModelForCausalLM.from_pretrained(path, **kwargs).eval()
        assert type(model.base_model).__name__ == "IMSMModel", type(model.base_model)
        with torch.no_grad():
            result[spec] = model(**probe).logits.float()
            with model.disable_adapter():
                result[spec + "::base"] = model(**probe).logits.float()
    torch.save(result, out_file)
    """
)


def _python(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return _run([sys.executable, *args], timeout=timeout)


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout, cwd=REPO)
    return proc


def _check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )
    return proc


def _build_model_dir(path: Path) -> None:
    """A tiny Llama (random weights, fixed seed) and a word-level tokenizer, saved like a Hub checkpoint.

    ``hidden_size=64``: bitsandbytes' CPU 4-bit inference needs in_features to be a multiple of its block size (64).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    # A chat template, so that `--imsm_anchor_start auto` starts self anchors from its user turn ("<s> copy").
    tokenizer.chat_template = "{% for m in messages %}<s> copy {{ m['content'] }} </s>{% endfor %}"
    tokenizer.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


def _write_dataset(path: Path, n: int = 64, seed: int = 0) -> None:
    """Prompt/completion JSONL: "copy x y z :" -> " x y z" and "reverse x y z :" -> " z y x"."""
    gen = torch.Generator().manual_seed(seed)
    letters = WORDS[7:]
    with open(path, "w") as f:
        for i in range(n):
            picked = [letters[j] for j in torch.randint(0, len(letters), (3,), generator=gen).tolist()]
            task = "copy" if i % 2 == 0 else "reverse"
            answer = picked if task == "copy" else picked[::-1]
            f.write(
                json.dumps({"prompt": f"{task} {' '.join(picked)} :", "completion": " " + " ".join(answer)}) + "\n"
            )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imsm_sft")
    _build_model_dir(root / "model")
    (root / "data").mkdir()
    _write_dataset(root / "data" / "train.jsonl")
    with open(root / "anchors.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"text": " ".join(WORDS[7 + i : 12 + i])}) + "\n")
    torch.save({"input_ids": torch.tensor(PROBE_IDS), "attention_mask": torch.tensor(PROBE_MASK)}, root / "probe.pt")
    (root / "driver.py").write_text(DRIVER)
    (root / "reload.py").write_text(RELOAD)
    return root


def _common(workdir: Path, out: str) -> list[str]:
    return ["--model_name_or_path", str(workdir / "model"), "--output_dir", str(workdir / out), *TRAIN_FLAGS]


@pytest.fixture(scope="module")
def cli_run(workdir: Path) -> Path:
    """The console script with command-line flags: self anchors (gate + adapter), query gate."""
    exe = shutil.which("imsm-sft")
    assert exe is not None, "the imsm-sft console script is not installed: pip install -e ."
    argv = [
        *_common(workdir, "out_cli"), "--dataset_name", str(workdir / "data"), *LORA_FLAGS,
        "--lora_target_modules", "q_proj", "v_proj", "--imsm_gate_rank", "4", "--imsm_gate_dropout", "0.0",
        "--imsm_anchor", "--imsm_anchor_weight", "0.5", "--imsm_anchor_train_adapter", "--imsm_anchor_num_samples",
        "8", "--imsm_anchor_sample_length", "6", "--imsm_anchor_batch_size", "4", "--imsm_anchor_every", "1",
    ]  # fmt: skip
    proc = _check(_run([exe, *argv]))
    (workdir / "out_cli" / "stdout.txt").write_text(proc.stdout)
    return workdir / "out_cli"


@pytest.fixture(scope="module")
def yaml_run(workdir: Path) -> Path:
    """Everything in a YAML recipe (a dataset mixture from a JSONL file, anchors from data, the token gate), run
    through the driver."""
    import yaml

    recipe = {
        "model_name_or_path": str(workdir / "model"),
        "output_dir": str(workdir / "out_yaml"),
        "datasets": [{"path": "json", "data_files": str(workdir / "data" / "train.jsonl")}],
        "max_steps": 4, "per_device_train_batch_size": 8, "learning_rate": 2e-2, "logging_steps": 1,
        "save_strategy": "no", "report_to": "none", "use_cpu": True, "max_length": 32, "seed": 0,
        "disable_tqdm": True, "dataloader_num_workers": 0,
        "use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_target_modules": "all-linear",
        "imsm_gate_rank": 2, "imsm_gate_mode": "token", "imsm_gate_dropout": 0.0,
        "imsm_anchor": True, "imsm_anchor_source": "data", "imsm_anchor_dataset": str(workdir / "anchors.jsonl"),
        "imsm_anchor_batch_size": 2, "imsm_anchor_weight": 2.0, "imsm_anchor_every": 2,
    }  # fmt: skip
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    _check(
        _python(str(workdir / "driver.py"), str(workdir / "yaml.pt"), str(workdir / "probe.pt"), "--config", str(path))
    )
    return workdir / "out_yaml"


@pytest.fixture(scope="module")
def qlora_run(workdir: Path) -> Path:
    """QLoRA: --load_in_4bit (NF4, as `trl sft`), no anchors, through the driver.

    ``--dtype float32``: without a dtype, transformers quantizes from bfloat16 copies of the weights (TRL passes
    ``dtype=None``), and a reload would have to do the same to match."""
    argv = [
        *_common(workdir, "out_qlora"), "--dataset_name", str(workdir / "data"), *LORA_FLAGS, "--load_in_4bit",
        "--bnb_4bit_quant_type", "nf4", "--dtype", "float32", "--lora_target_modules", "all-linear",
        "--imsm_gate_rank", "4",
    ]  # fmt: skip
    _check(_python(str(workdir / "driver.py"), str(workdir / "qlora.pt"), str(workdir / "probe.pt"), *argv))
    return workdir / "out_qlora"


@pytest.fixture(scope="module")
def reloaded(workdir: Path, cli_run: Path, yaml_run: Path, qlora_run: Path) -> dict[str, torch.Tensor]:
    """Logits of every output directory reloaded in ONE fresh process (and of its base model, adapter off)."""
    specs = [str(cli_run), str(yaml_run), f"{qlora_run}::4bit"]
    _check(_python(str(workdir / "reload.py"), str(workdir / "reloaded.pt"), str(workdir / "probe.pt"), *specs))
    result = torch.load(workdir / "reloaded.pt")
    return {k.replace(str(workdir) + os.sep, ""): v for k, v in result.items()}


# ----------------------------------------------------------------------------------------------------- training runs


def _saved_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def test_cli_run_saves_an_imsm_adapter_that_reloads(workdir, cli_run, reloaded):
    config = json.loads((cli_run / "adapter_config.json").read_text())
    assert config["peft_type"] == "IMSM"
    assert config["gate_rank"] == 4 and config["gate_mode"] == "query" and config["gate_dropout"] == 0.0
    # The wrapped adapter is exactly what TRL's own flags describe.
    inner = config["adapter_config"]
    assert inner["peft_type"] == "LORA" and inner["r"] == 4 and inner["lora_alpha"] == 8
    assert sorted(inner["target_modules"]) == ["q_proj", "v_proj"]
    assert config["anchor"]["source"] == "self" and config["anchor"]["weight"] == 0.5
    assert config["anchor"]["train_adapter"] is True and config["anchor"]["seed"] == 0
    assert config["anchor"]["start_tokens"] == [1, 4]  # --imsm_anchor_start auto: the chat template's "<s> copy"
    assert config["anchor"]["end_tokens"] == [2]  # ... and its end of the user turn, "</s>"

    weights = _saved_weights(cli_run)
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    gate = {k: v for k, v in weights.items() if "imsm_gate.W_" in k}  # (beside them: the marker imsm_gate.effective)
    assert len(lora_b) == 4 and len(gate) == 2, sorted(weights)
    assert all(v.abs().max() > 0 for v in lora_b.values()), "LoRA B is still at its zero init: nothing was trained"

    # Reloaded in the test process, with `import peft_imsm` and AutoPeftModelForCausalLM, as the README says.
    from peft import AutoPeftModelForCausalLM

    import peft_imsm  # noqa: F401

    model = AutoPeftModelForCausalLM.from_pretrained(str(cli_run)).eval()
    with torch.no_grad():
        here = model(input_ids=torch.tensor(PROBE_IDS), attention_mask=torch.tensor(PROBE_MASK)).logits
    torch.testing.assert_close(reloaded["out_cli"], here, rtol=0, atol=1e-6)
    assert (reloaded["out_cli"] - reloaded["out_cli::base"]).abs().max() > 1e-3, "IMSM output equals the base model's"

    # IMSM's figures in the Trainer's logs (PrinterCallback prints each log dict after IMSMLogCallback filled it).
    logs = [eval(line) for line in (cli_run / "stdout.txt").read_text().splitlines() if line.startswith("{'loss'")]
    assert len(logs) == 4, (cli_run / "stdout.txt").read_text()[-2000:]
    # (PrinterCallback prints the values formatted as strings.)
    assert all(float(log["anchor_kl"]) >= 0 and float(log["task_loss"]) > 0 for log in logs)
    assert all(0 < float(log["gate_mean"]) < 1 for log in logs)


def test_yaml_run_equals_trained_model_after_reload(workdir, yaml_run, reloaded):
    trained = torch.load(workdir / "yaml.pt")
    config = json.loads((yaml_run / "adapter_config.json").read_text())
    assert config["gate_mode"] == "token" and config["gate_rank"] == 2
    assert (
        config["anchor"]["source"] == "data" and config["anchor"]["weight"] == 2.0 and config["anchor"]["every"] == 2
    )
    assert config["anchor"]["train_adapter"] is True  # the default: gate+adapter
    # TRL's "all-linear", resolved by peft to every linear layer but the output layer.
    targets = {name.rsplit(".", 1)[-1] for name in config["adapter_config"]["target_modules"]}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    # The saved adapter reproduces the trained in-memory model exactly, in a fresh process.
    torch.testing.assert_close(reloaded["out_yaml"], trained["logits"], rtol=0, atol=1e-6)
    assert (trained["logits"] - reloaded["out_yaml::base"]).abs().max() > 1e-3

    # The trained parameters (gate AND adapter) were saved, each moved from its initial value.
    saved = _saved_weights(yaml_run)
    init = {k.replace("base_model.model.", "", 1).replace(".default", ""): v for k, v in trained["init"].items()}
    saved = {k.replace("base_model.model.", "", 1): v for k, v in saved.items()}
    # Every trained parameter is in the file; anything else there is IMSM's own state (e.g. the anchor sampler's).
    assert set(init) <= set(saved), sorted(set(init) - set(saved))
    assert all("imsm_" in k for k in set(saved) - set(init)), sorted(set(saved) - set(init))
    assert any("imsm_gate" in k for k in init) and any("lora_A" in k for k in init)
    for name, value in init.items():
        assert not torch.equal(saved[name], value.to(saved[name].dtype)), f"{name} was saved at its initial value"

    # Anchor texts from --imsm_anchor_dataset were used: the logged anchor KL is there on every 2nd step (every: 2).
    steps = [log for log in trained["log_history"] if "loss" in log]
    assert len(steps) == 4
    assert ["anchor_kl" in log for log in steps] == [True, False, True, False]
    assert all(log["anchor_kl"] >= 0 and log["task_loss"] > 0 for log in steps if "anchor_kl" in log)
    assert all(0 < log["gate_mean"] < 1 for log in steps)


def test_qlora_run_reloads_4bit(workdir, qlora_run, reloaded):
    trained = torch.load(workdir / "qlora.pt")
    spec = "out_qlora::4bit"
    # Not bit-exact: the in-memory QLoRA model and the reloaded one agreed up to 1.4e-3 (measured; the float32 runs
    # above agree to 1e-6), although every trainable tensor and the quantized weights of the reload were equal to the
    # trained model's (checked by hand, once). bitsandbytes' CPU 4-bit matmul has a packed bf16 inference path besides
    # its dequantize path; which one a layer takes depends on module state (not pinned down here). Training moved the
    # logits by ~0.67, so the tolerance still tells a reloaded adapter from a lost or untrained one.
    tolerance = 5e-3
    torch.testing.assert_close(reloaded[spec], trained["logits"], rtol=0, atol=tolerance)
    assert (trained["logits"] - reloaded[spec + "::base"]).abs().max() > 100 * tolerance
    saved = _saved_weights(qlora_run)
    assert any("imsm_gate" in k for k in saved) and sum("lora_B" in k for k in saved) == 14
    assert all(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)
    # No anchors: no anchor figures in the logs, but the gate's mean.
    steps = [log for log in trained["log_history"] if "loss" in log]
    assert len(steps) == 4 and not any("anchor_kl" in log for log in steps)
    assert all(0 < log["gate_mean"] < 1 for log in steps)


def test_imsm_sft_leaves_the_trl_namespace_alone(workdir, monkeypatch, capsys):
    """`peft_imsm.sft.main` passes IMSM to TRL's public API: no attribute of the `trl` module is replaced, neither
    while the trainer is built and trains (seen from a callback) nor after (a 1-step run in this process)."""
    import trl

    from peft_imsm import sft

    names = ("SFTTrainer", "get_peft_config", "get_dataset", "get_quantization_config")
    before = {name: getattr(trl, name) for name in names}
    during = []

    class SeeTrl(sft.IMSMLogCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            during.append({name: getattr(trl, name) for name in names})

    monkeypatch.setattr(sft, "IMSMLogCallback", SeeTrl)
    sft.main([*_common(workdir, "out_trl_untouched"), "--dataset_name", str(workdir / "data"), *LORA_FLAGS,
              "--max_steps", "1", "--imsm_gate_rank", "2"])  # fmt: skip
    assert len(during) == 1, "the run did not train"
    for seen in (during[0], {name: getattr(trl, name) for name in names}):
        assert all(seen[name] is before[name] for name in names), {
            n: seen[n] for n in names if seen[n] is not before[n]
        }
    config = json.loads((workdir / "out_trl_untouched" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IMSM" and config["gate_rank"] == 2


# --------------------------------------------------------------------------------------------- arguments and errors


def test_help_lists_imsm_arguments_with_help():
    from dataclasses import fields

    from peft_imsm.sft import IMSMArguments, make_parser

    text = " ".join(make_parser().format_help().split())
    for f in fields(IMSMArguments):
        assert f"--{f.name}" in text
        assert " ".join(f.metadata["help"].split())[:40] in text
    for trl_flag in ("--use_peft", "--lora_r", "--use_dora", "--load_in_4bit", "--dataset_name", "--max_steps"):
        assert trl_flag in text


BASE_ARGV = [
    "--model_name_or_path", "/nonexistent/model", "--dataset_name", "/nonexistent/data", "--output_dir", "x",
    "--use_cpu",
]  # fmt: skip


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--imsm_gate_rank", "0"], "--imsm_gate_rank must be an integer >= 1"),
        (["--imsm_gate_mode", "sigmoid"], "invalid choice: 'sigmoid'"),
        (["--imsm_anchor", "--imsm_anchor_weight", "-1"], "--imsm_anchor_weight must be >= 0"),
        (["--imsm_anchor", "--imsm_anchor_every", "0"], "--imsm_anchor_every must be an integer >= 1"),
        (["--imsm_gate_rnk", "4"], "unknown IMSM argument --imsm_gate_rnk (did you mean --imsm_gate_rank?)"),
        (["--imsm_gate_dropout", "1.5"], "--imsm_gate_dropout must be in [0, 1)"),
        (["--imsm_anchor_weight", "2"], "the anchor term is off. Add --imsm_anchor"),
        (["--imsm_anchor", "--imsm_anchor_source", "data"], "needs anchor texts: set --imsm_anchor_dataset"),
        (["--imsm_anchor", "--imsm_anchor_temperature", "0"], "--imsm_anchor_temperature must be > 0"),
        (["--imsm_anchor", "--imsm_anchor_num_samples", "0"], "--imsm_anchor_num_samples must be an integer >= 1"),
        (["--imsm_gate_mode", "route"], "--imsm_gate_mode route learns which prompts are general from the anchors"),
        (["--imsm_anchor", "--imsm_gate_mode", "route", "--imsm_anchor_route_weight", "0"], "route_weight=0 turns"),
        (["--imsm_gate_lr_scale", "0"], "--imsm_gate_lr_scale must be None or a finite number > 0"),
        (["--imsm_route_threshold", "0.5"], "route_threshold=0.5 picks one view per sequence"),
        (
            ["--imsm_anchor", "--imsm_gate_mode", "route", "--imsm_route_threshold", "1.5"],
            "--imsm_route_threshold must be None (the soft mix) or a number strictly between 0 and 1",
        ),
        (["--imsm_route_threshold", "high"], "--imsm_route_threshold must be auto, none or a number"),
    ],
)
def test_bad_imsm_argument_is_a_clear_error_before_loading(extra, message, capsys):
    """The model and dataset paths do not exist: the error must come from the argument checks, before any loading."""
    from peft_imsm.sft import main

    with pytest.raises(SystemExit) as exc:
        main([*BASE_ARGV, "--use_peft", *extra])
    assert exc.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "imsm-sft: error:" in err and message in err, err


@pytest.mark.parametrize(
    "gate_mode, flag, expected", [("route", "auto", 0.5), ("route", "none", None), ("route", "0.7", 0.7),
                                  ("query", "auto", None)],
)  # fmt: skip
def test_route_threshold_flag(gate_mode, flag, expected):
    from peft import LoraConfig

    from peft_imsm.sft_arguments import IMSMArguments, wrap_peft_config

    args = IMSMArguments(imsm_gate_mode=gate_mode, imsm_anchor=True, imsm_route_threshold=flag)
    assert wrap_peft_config(LoraConfig(r=2), args).route_threshold == expected


def test_missing_use_peft_is_a_clear_error(capsys):
    from peft_imsm.sft import main

    with pytest.raises(SystemExit) as exc:
        main([*BASE_ARGV, "--lora_r", "8"])
    assert exc.value.code == 2
    assert "IMSM wraps a peft adapter, but --use_peft is not set. Add --use_peft" in capsys.readouterr().err


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("imsm_gate_mode", "sigmoid", "--imsm_gate_mode 'sigmoid' is not a gate mode"),
        ("imsm_gate_rank", 0, "--imsm_gate_rank must be an integer >= 1"),
        ("imsm_gate_rnk", 4, "unknown IMSM argument --imsm_gate_rnk (did you mean --imsm_gate_rank?)"),
    ],
)
def test_bad_imsm_yaml_key_is_a_clear_error(key, value, message, tmp_path, capsys):
    """YAML values skip argparse's own checks (choices, types): the same errors must come from the YAML file."""
    import yaml

    from peft_imsm.sft import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"use_peft": True, key: value}))
    with pytest.raises(SystemExit) as exc:
        main([*BASE_ARGV, "--config", str(recipe)])
    assert exc.value.code == 2
    assert message in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("start", ["chat", "auto", "bos"])
def test_anchor_start_without_a_chat_template(workdir, start):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_imsm.sft_arguments import IMSMArgumentError, IMSMArguments, start_anchors_from_chat, wrap_peft_config

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    tokenizer.chat_template = None
    args = IMSMArguments(imsm_anchor=True, imsm_anchor_start=start)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(workdir / "model"), wrap_peft_config(LoraConfig(), args)
    )
    if start == "chat":
        with pytest.raises(IMSMArgumentError, match="--imsm_anchor_start chat needs a tokenizer with a chat template"):
            start_anchors_from_chat(model, tokenizer, args)
    else:
        start_anchors_from_chat(model, tokenizer, args)
        assert model.peft_config["default"].anchor.start_tokens is None


def test_module_entry_point_reports_errors(workdir):
    """`python -m peft_imsm.sft` (what `accelerate launch -m peft_imsm.sft` runs) parses and checks the same way."""
    proc = _python("-m", "peft_imsm.sft", *BASE_ARGV, "--use_peft", "--imsm_anchor_weight=-3", "--imsm_anchor")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--imsm_anchor_weight must be >= 0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_anchor_dataset_is_a_clear_error_before_loading(tmp_path, capsys):
    """A --imsm_anchor_dataset without the column: an error that names the columns, before the model is loaded."""
    from peft_imsm.sft import main

    anchors = tmp_path / "anchors.jsonl"
    anchors.write_text('{"prompt": "a b c"}\n{"prompt": "d e f"}\n')
    flags = ["--use_peft", "--imsm_anchor", "--imsm_anchor_source", "data", "--imsm_anchor_dataset", str(anchors)]
    with pytest.raises(SystemExit) as exc:
        main([*BASE_ARGV, *flags])
    assert exc.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"imsm-sft: error: --imsm_anchor_dataset '{anchors}' has no column 'text' (its columns: prompt)" in err


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_example_recipes_parse(recipe):
    """The shipped recipes are valid imsm-sft configs (parsed and checked, not run: they name Hub models)."""
    from peft_imsm.sft import parse_args

    parsed = parse_args(["--config", str(recipe), "--use_cpu"])  # the recipes train in bf16 on a GPU
    script_args, training_args, model_args, dataset_args = parsed.trl_args
    assert model_args.use_peft and model_args.model_name_or_path
    assert script_args.dataset_name or dataset_args.datasets
    assert not parsed.yaml_launch_args and not parsed.cli_launch_args
    assert any(key.startswith("imsm_") for key in __import__("yaml").safe_load(recipe.read_text()))


def test_there_is_an_example_recipe():
    assert RECIPES, "examples/recipes/ has no YAML recipe"


@pytest.mark.slow  # ~40 s (2 processes start, import and train)
def test_two_processes_through_accelerate_launch(workdir):
    """`imsm-sft --multi_gpu --num_processes 2 ...` hands the launch options to `accelerate launch` (as `trl sft`
    does), which starts `python -m peft_imsm.sft` on 2 ranks (torchrun; `--use_cpu`: CPU processes, gloo). accelerate's
    own `--cpu` would start a single process, hence `--multi_gpu` also on a machine without GPUs."""
    exe = shutil.which("imsm-sft")
    assert exe is not None, "the imsm-sft console script is not installed: pip install -e ."
    argv = [
        "--multi_gpu", "--num_processes", "2", "--num_cpu_threads_per_process", "1",
        *_common(workdir, "out_ddp"), "--per_device_train_batch_size", "4", "--dataset_name", str(workdir / "data"),
        *LORA_FLAGS, "--imsm_gate_rank", "4", "--imsm_anchor", "--imsm_anchor_num_samples", "8",
        "--imsm_anchor_sample_length", "6", "--imsm_anchor_batch_size", "2", "--imsm_anchor_every", "1",
    ]  # fmt: skip
    proc = _check(_run([exe, *argv]))
    logs = [eval(line) for line in proc.stdout.splitlines() if line.startswith("{'loss'")]
    assert len(logs) == 4, proc.stdout[-2000:]
    # 64 examples, 2 ranks x 4 per step: each step is 1/8 of an epoch (a single process would make it 1/16).
    assert [float(log["epoch"]) for log in logs] == [0.125, 0.25, 0.375, 0.5]
    assert all(float(log["anchor_kl"]) >= 0 and 0 < float(log["gate_mean"]) < 1 for log in logs)
    assert json.loads((workdir / "out_ddp" / "adapter_config.json").read_text())["peft_type"] == "IMSM"


def test_imsm_sft_defaults_are_the_python_apis():
    """`imsm-sft --imsm_anchor` gives what `AnchorConfig()` gives (the recommended setting), flag for flag."""
    from dataclasses import fields as dataclass_fields

    from peft import LoraConfig

    from peft_imsm import AnchorConfig, IMSMConfig
    from peft_imsm.sft import IMSMArguments

    args, anchor = IMSMArguments(), AnchorConfig()
    compared = []
    for f in dataclass_fields(AnchorConfig):
        flag = f"imsm_anchor_{f.name}"
        if hasattr(args, flag) and f.name not in ("start", "seed"):  # (start: auto picks chat or bos; seed: the run's)
            assert getattr(args, flag) == getattr(anchor, f.name), flag
            compared.append(f.name)
    assert {"weight", "batch_size", "every", "num_samples", "sample_length", "train_adapter"} <= set(compared)
    config = IMSMConfig(adapter_config=LoraConfig())
    for name in ("gate_rank", "gate_mode", "gate_dropout"):
        assert getattr(args, f"imsm_{name}") == getattr(config, name)


@pytest.mark.parametrize("accumulated", [False, True])
def test_sft_trainers_fused_loss_carries_the_anchor_and_routing_terms(accumulated, tmp_path):
    """TRL's SFTTrainer builds the loss from its fused head's per-token log-probs, not from ``outputs.loss``: the
    gradients of its loss must equal those of IMSM's own loss (task + anchor KL + routing term), also with a
    ``num_items_in_batch`` of an accumulated batch (this micro-batch's terms weighted by its token share)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    import peft_imsm
    from imsm_bench import TARGET_TASK, load_skills_lm, make_examples

    torch.manual_seed(0)
    model, tokenizer = load_skills_lm()
    rows = make_examples(TARGET_TASK, 8, seed=0, split="train")
    dataset = Dataset.from_list([{"prompt": r["input"], "completion": r["output"]} for r in rows])
    config = peft_imsm.IMSMConfig(
        adapter_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
        gate_mode="route",
        anchor=peft_imsm.AnchorConfig(source="data", every=1),
    )
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1, report_to=[],
                     use_cpu=True, max_length=64, save_strategy="no")  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=config)
    peft_model, tuner = trainer.model, trainer.model.base_model
    peft_imsm.set_anchor_data(peft_model, [r["input"] for r in make_examples("add", 8, seed=0, split="train")],
                              tokenizer)  # fmt: skip
    with torch.no_grad():
        tuner.gate.W_R.weight.normal_(0, 0.05 / tuner.gate.lr_scale)  # (a router away from its zero start)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    supervised = int((inputs["labels"][:, 1:] != -100).sum())
    num_items = 3 * supervised if accumulated else None
    peft_model.train()
    counters = (tuner.anchor_term.draws, tuner.anchor_term.forwards)

    def grads(loss_fn):
        peft_model.zero_grad()
        tuner.anchor_term.draws, tuner.anchor_term.forwards = counters  # (the same anchor batch for both)
        loss_fn().backward()
        return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}

    fused = grads(lambda: trainer.compute_loss(peft_model, dict(inputs), num_items_in_batch=num_items))
    extra = {} if num_items is None else {"num_items_in_batch": num_items}
    own = grads(lambda: peft_model(**{**inputs, "use_cache": False}, **extra).loss)
    router = [n for n in own if "imsm_gate" in n]
    assert router and all(own[n].abs().sum() > 0 for n in router), {n: own[n].abs().sum() for n in router}
    assert set(fused) == set(own)
    for name in own:
        torch.testing.assert_close(fused[name], own[name], atol=1e-6, rtol=1e-4)
