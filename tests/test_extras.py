"""Optional dependencies (pyproject.toml's extras): the core runs without any of them, and each tool that needs one
says which extra to install. ``sys.modules[name] = None`` makes ``import name`` fail as if it were not installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
OPTIONAL = ("trl", "datasets", "matplotlib", "lm_eval")


def test_the_core_runs_without_any_extra(tmp_path):
    """``import peft_imsm``, get_peft_model, forward / generate / save / load, retrofit, train_gate and the HF
    Trainer, in a fresh process where TRL, datasets, matplotlib and lm-eval cannot be imported."""
    code = f"""
        import sys
        for name in {OPTIONAL!r}:
            sys.modules[name] = None
        sys.path.insert(0, {str(TESTS)!r})
        import torch
        from helpers import adapter_config, batch, tiny_model
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import Trainer, TrainingArguments

        from peft_imsm import AnchorConfig, IMSMConfig, retrofit, train_gate

        model = get_peft_model(tiny_model("llama"), IMSMConfig(adapter_config=adapter_config("lora", identity=False)))
        model.eval()
        ids, mask = batch()
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert out.shape == (3, 15)
        model.save_pretrained({str(tmp_path / "imsm")!r})
        loaded = PeftModel.from_pretrained(tiny_model("llama"), {str(tmp_path / "imsm")!r}).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, logits, atol=1e-6, rtol=0)

        lora = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        lora.save_pretrained({str(tmp_path / "lora")!r})
        anchor = AnchorConfig(every=1, num_samples=4, sample_length=4)
        retrofitted = retrofit(tiny_model("llama"), {str(tmp_path / "lora")!r}, gate_dropout=0.0, anchor=anchor)
        plain, _ = batch(left_pad=False)
        rows = [(row.tolist(), [-100] * 4 + row[4:].tolist()) for row in plain]
        log = train_gate(retrofitted, rows, steps=2, batch_tokens=16)
        assert len(log.task_loss) == 2

        args = TrainingArguments({str(tmp_path / "trainer")!r}, max_steps=1, per_device_train_batch_size=3,
                                 use_cpu=True, report_to=[], save_strategy="no")
        data = [dict(input_ids=row, labels=row) for row in plain]
        Trainer(model=model.train(), args=args, train_dataset=data).train()
        assert [m for m in {OPTIONAL!r} if sys.modules.get(m) is not None] == []
        print("core ok")
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "core ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("missing,name", [("trl", "TRL"), ("datasets", "datasets")])
def test_imsm_sft_without_trl_or_datasets_names_the_extra(monkeypatch, missing, name):
    from peft_imsm import sft

    monkeypatch.setitem(sys.modules, missing, None)
    message = rf'imsm-sft needs {name}, which could not be imported .*pip install "peft-imsm\[trl\]"'
    with pytest.raises(ImportError, match=message):
        sft.run((None, None, None, None), None, None)
    if missing == "trl":
        with pytest.raises(ImportError, match=message):
            sft.parse_args(["--model_name_or_path", "m", "--output_dir", "out"])
        with pytest.raises(SystemExit, match=rf"imsm-sft: error: {message}"):
            sft.main(["--model_name_or_path", "m", "--output_dir", "out"])


def test_plots_without_matplotlib_name_the_extra(monkeypatch, tmp_path):
    from imsm_bench.cli import main as imsm_bench
    from peft_imsm.gate_maps import GateMap

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    gm = GateMap(prompts=["a"], tokens=[["a", "b"]], token_ids=[[5, 6]], gate=[torch.tensor([0.2, 0.8])],
                 prompt_lengths=[1])  # fmt: skip
    with pytest.raises(ImportError, match=r'GateMap.plot needs matplotlib, .*pip install "peft-imsm\[plot\]"'):
        gm.plot(tmp_path / "map.png")
    out = tmp_path / "bench"
    message = r'error: imsm-bench \(its figure, results.png\) needs matplotlib, .*pip install "peft-imsm\[plot\]"'
    with pytest.raises(SystemExit, match=message):
        imsm_bench(["--out", str(out)])
    assert not out.exists()  # refused before the run, not after it
