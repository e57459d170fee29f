"""``peft_imsm.output_dirs`` and the commands that write into a folder the user names besides ``imsm-export``
(``tests/test_export.py``): ``imsm-sft --output_dir`` and ``save_pretrained`` of a retrofitted model."""

from __future__ import annotations

import copy
import json

import pytest
from helpers import adapter_config, tiny_model
from peft import get_peft_model

from peft_imsm import retrofit
from peft_imsm.output_dirs import OutputDirError, check_not_protected, check_output_dir

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tree(root):
    """Every file (path: bytes) and folder (path: None) under ``root``, to compare a folder before and after."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture
def places(tmp_path, monkeypatch):
    """tmp_path/user-home (HOME), tmp_path/user-home/project (the working folder) and a protected tmp_path/adapter."""
    (tmp_path / "user-home" / "project").mkdir(parents=True)
    (tmp_path / "adapter").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "user-home"))
    monkeypatch.chdir(tmp_path / "user-home" / "project")
    return tmp_path


@pytest.mark.parametrize(
    "out,nested,working_dirs,message",
    [
        ("adapter", False, False, "is the adapter folder; writing there would overwrite its files"),
        ("adapter/../adapter", False, False, "is the adapter folder"),
        (".", True, False, "contains the adapter folder"),
        ("adapter/sub", True, False, "is inside the adapter folder"),
        ("user-home/project", False, True, "is the working folder"),
        ("user-home", False, True, "is the home folder"),
        ("/", False, True, "is a filesystem root"),
    ],
)
def test_check_not_protected_refuses(places, out, nested, working_dirs, message):
    path = out if out.startswith("/") else places / out
    with pytest.raises(OutputDirError, match=message):
        check_not_protected(path, {"adapter folder": places / "adapter"}, name="OUT", nested=nested,
                            working_dirs=working_dirs)  # fmt: skip


@pytest.mark.parametrize(
    "out,nested,working_dirs",
    [
        ("adapter/sub", False, True),
        (".", False, False),
        ("user-home/project/new", True, True),
        ("user-home/other", True, True),
    ],
)
def test_check_not_protected_accepts(places, out, nested, working_dirs):
    """With nested=False a folder inside or around a protected one is allowed; a new folder in the working folder or
    beside it is."""
    got = check_not_protected(places / out, {"adapter folder": places / "adapter"}, name="OUT", nested=nested,
                              working_dirs=working_dirs)  # fmt: skip
    assert got == (places / out).resolve()


def test_check_output_dir_replaces_only_an_earlier_output(tmp_path):
    out = tmp_path / "out"
    kwargs = dict(command="tool", protected={}, earlier_output=lambda p: None if (p / "MARK").is_file() else "no MARK",
                  writes=lambda p: p.name in ("MARK", "data.bin"))  # fmt: skip
    assert check_output_dir(out, overwrite=False, **kwargs) is None  # missing
    out.mkdir()
    assert check_output_dir(out, overwrite=False, **kwargs) is None  # empty
    (out / "data.bin").write_text("x")
    with pytest.raises(OutputDirError, match=r"is not empty \(it holds data.bin\)"):
        check_output_dir(out, overwrite=False, **kwargs)
    with pytest.raises(OutputDirError, match=r"not a folder that tool wrote \(no MARK; it holds data.bin\)"):
        check_output_dir(out, overwrite=True, **kwargs)
    (out / "MARK").write_text("")
    assert check_output_dir(out, overwrite=True, **kwargs) == out.resolve()
    (out / "mine").mkdir()
    with pytest.raises(OutputDirError, match="also holds files that tool does not write: mine/. --overwrite would"):
        check_output_dir(out, overwrite=True, **kwargs)


# ------------------------------------------------------------------------------------------- imsm-sft --output_dir
@pytest.mark.parametrize("where", ["base", "working folder"])
def test_imsm_sft_refuses_an_output_dir_whose_files_trl_would_overwrite(tmp_path, monkeypatch, capsys, where):
    """TRL writes README.md, the tokenizer and the adapter into --output_dir: never into the base model's folder or
    the working folder (refused while parsing, before anything loads)."""
    from peft_imsm.sft import main

    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("the base model's card")
    monkeypatch.chdir(tmp_path)
    output_dir = str(base) if where == "base" else "."
    argv = ["--model_name_or_path", str(base), "--dataset_name", "/nonexistent/data", "--output_dir", output_dir,
            "--use_cpu", "--use_peft"]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    cause = "is the base model folder (--model_name_or_path)" if where == "base" else "is the working folder"
    assert f"imsm-sft: error: --output_dir '{output_dir}'" in err and cause in err, err
    assert "TRL writes README.md, the tokenizer and the adapter into --output_dir" in err
    assert (base / "README.md").read_text() == "the base model's card"


# ------------------------------------------------------------------------------ save_pretrained of a retrofit
@pytest.mark.parametrize("spelling", ["same", "trailing slash", "symlink"])
def test_retrofitted_model_refuses_to_save_over_its_adapter_folder(tmp_path, spelling):
    lora = get_peft_model(tiny_model("llama"), adapter_config("lora", identity=False))
    lora.save_pretrained(tmp_path / "lora")
    model = retrofit(tiny_model("llama"), tmp_path / "lora")
    before = tree(tmp_path)
    target = {"same": tmp_path / "lora", "trailing slash": f"{tmp_path / 'lora'}/", "symlink": tmp_path / "link"}
    if spelling == "symlink":
        (tmp_path / "link").symlink_to(tmp_path / "lora")
        before = tree(tmp_path)
    message = (
        rf"save_pretrained\('{target[spelling]}'\) would write the IMSM adapter 'default' into {tmp_path / 'lora'}, "
        "the folder of an adapter this model was retrofitted from"
    )
    with pytest.raises(OutputDirError, match=message):
        model.save_pretrained(target[spelling])
    with pytest.raises(OutputDirError, match="retrofitted from"):
        copy.deepcopy(model).save_pretrained(target[spelling])  # (a copy keeps the check)
    assert tree(tmp_path) == before
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_retrofitted_model_saves_to_a_new_folder(tmp_path):
    lora = get_peft_model(tiny_model("llama"), adapter_config("lora", identity=False))
    lora.save_pretrained(tmp_path / "lora")
    model = retrofit(tiny_model("llama"), tmp_path / "lora")
    copy.deepcopy(model).save_pretrained(tmp_path / "copy")  # (saves the copy, not the original)
    model.save_pretrained(tmp_path / "lora" / "imsm")  # (inside the adapter folder: only adds files)
    for folder in ("copy", "lora/imsm"):
        assert json.loads((tmp_path / folder / "adapter_config.json").read_text())["peft_type"] == "IMSM"
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
