"""``--anchor-start`` (``imsm-bench``) and ``--imsm_anchor_start`` (``imsm-sft``) name the same anchors: ``chat`` is
``AnchorConfig.from_tokenizer``'s whole chat prompts in both, ``auto`` falls back to BOS without a chat template, and
``imsm-bench``'s ``user-turn`` is the user-turn start alone. Tested on the skills LM's tokenizer, given a chat
template (as tests/test_readme.py does)."""

from __future__ import annotations

import typing

import pytest
from peft import LoraConfig, get_peft_model

import peft_imsm
from imsm_bench import load_skills_lm
from imsm_bench.options import ANCHOR_STARTS, anchor_tokens, parse_args
from peft_imsm.sft_arguments import IMSMArguments, start_anchors_from_chat, wrap_peft_config

CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
CHAT_HELP = "chat: whole chat prompts, as AnchorConfig.from_tokenizer gives"


@pytest.fixture(scope="module")
def skills():
    model, tokenizer = load_skills_lm()
    tokenizer.chat_template = CHAT_TEMPLATE
    return model, tokenizer


def _sft_anchor_tokens(skills, start: str) -> tuple[list[int] | None, list[int] | None]:
    """The start and end tokens ``imsm-sft --imsm_anchor --imsm_anchor_start <start>`` gives the model's anchors."""
    model, tokenizer = skills
    args = IMSMArguments(imsm_anchor=True, imsm_anchor_start=start)
    peft_model = get_peft_model(model, wrap_peft_config(LoraConfig(target_modules=["q_proj"]), args))
    try:
        start_anchors_from_chat(peft_model, tokenizer, args)
        anchor = peft_model.peft_config["default"].anchor
        return anchor.start_tokens, anchor.end_tokens
    finally:
        peft_model.unload()


def test_chat_is_from_tokenizer_in_both_commands(skills):
    _, tokenizer = skills
    library = peft_imsm.AnchorConfig.from_tokenizer(tokenizer)
    expected = (library.start_tokens, library.end_tokens)
    assert expected == (peft_imsm.chat_start_tokens(tokenizer), peft_imsm.chat_end_tokens(tokenizer))
    assert anchor_tokens("chat", tokenizer, chat=True) == expected
    assert _sft_anchor_tokens(skills, "chat") == expected
    assert anchor_tokens("auto", tokenizer, chat=True) == expected
    assert _sft_anchor_tokens(skills, "auto") == expected
    assert anchor_tokens(parse_args([]).anchor_start, tokenizer, chat=True) == expected  # the default: auto


@pytest.mark.parametrize(
    "start, chat, expected",
    [
        ("auto", False, (None, None)),
        ("bos", True, (None, None)),
        ("bos", False, (None, None)),
        ("user-turn", True, "start only"),
    ],
)
def test_the_other_starts(skills, start, chat, expected):
    _, tokenizer = skills
    if expected == "start only":
        expected = (peft_imsm.chat_start_tokens(tokenizer), None)
    assert anchor_tokens(start, tokenizer, chat=chat) == expected


@pytest.mark.parametrize("start", ["chat", "user-turn"])
def test_chat_starts_without_a_chat_template_exit_saying_why(skills, start):
    _, tokenizer = skills
    with pytest.raises(SystemExit, match=rf"--anchor-start {start} builds anchors from the chat template.*bos"):
        anchor_tokens(start, tokenizer, chat=False)


def test_the_two_commands_share_names_and_help(capsys):
    sft_starts = typing.get_args(typing.get_type_hints(IMSMArguments)["imsm_anchor_start"])
    assert set(ANCHOR_STARTS) - {"user-turn"} == set(sft_starts) - {"random"} == {"auto", "chat", "bos"}
    sft_help = next(f for f in IMSMArguments.__dataclass_fields__.values() if f.name == "imsm_anchor_start")
    assert CHAT_HELP in sft_help.metadata["help"]
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    bench_help = " ".join(capsys.readouterr().out.split())
    assert CHAT_HELP in bench_help and "user-turn: the user-turn start and the sampled text only" in bench_help
    with pytest.raises(SystemExit):
        parse_args(["--anchor-start", "prompt"])
    assert "invalid choice: 'prompt'" in capsys.readouterr().err
