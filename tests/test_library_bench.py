"""``imsm-bench --protocol library`` (``imsm_bench.library`` and ``imsm_bench.library_tasks``): the task generators,
the scoring, and a tiny end-to-end run (a tiny Llama over the benchmark's character tokenizer, 1 step each)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers

from imsm_bench.cli import main
from imsm_bench.library import (
    BASE_ROUTE,
    OPTIONAL_ROWS,
    entry_of,
    label_mcc,
    library_requested,
    parse_library_args,
    routed_as_lookup,
    routing_of,
    teacher_forced_prompt_query,
)
from imsm_bench.library_tasks import (
    COLA_MAX_CHARS,
    COLA_TEST_TEMPLATES,
    COLA_TRAIN_TEMPLATES,
    EXTRACT_ANSWER,
    EXTRACT_FIELDS,
    NEAR_PROMPTS,
    TASKS,
    TEST_TEMPLATES,
    TRAIN_TEMPLATES,
    cola_rows,
    cola_sentences,
    task_rows,
    template_fragments,
)
from imsm_bench.real import CHAT_PROMPTS, TAG_CATEGORIES, Scored, teacher_forced
from imsm_bench.skills import build_tokenizer

PAPER_PROMPT = (
    "Given a sentence, judge the grammatical acceptability of the sentence with yes or no.\nSentence:{}\nOutput:"
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_cola(folder, train: list[tuple[str, str]], test: list[tuple[str, str]]):
    """A folder in the paper's CoLA layout (``cola/train.jsonl``, ``cola/test.jsonl``) with the given rows."""
    (folder / "cola").mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("test", test)):
        lines = [json.dumps({"input": " " + PAPER_PROMPT.format(s), "output": label}) for s, label in rows]
        (folder / "cola" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def cola_dir(tmp_path):
    train = [(f"The dog number {i} barked.", "yes") for i in range(6)] + [
        (f"Dog the {i} barked number.", "no") for i in range(4)
    ]
    test = [("The cat slept.", "yes"), ("Cat the slept.", "no"), ("The bird sang.", "yes"), ("Bird sang the.", "no")]
    test += [("The dog number 0 barked.", "yes")]
    test += [("A very long sentence " + "x" * COLA_MAX_CHARS, "no")]
    return write_cola(tmp_path / "sets", train, test)


def rows_of(task, n, split, seed, folder):
    return task_rows(task, n, split, seed, folder)


# ------------------------------------------------------------------------------------------------------------------
# Task generators
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_rows_are_deterministic_in_the_seed(task, split, cola_dir):
    rows = rows_of(task, 40, split, 3, cola_dir)
    assert rows == rows_of(task, 40, split, 3, cola_dir)
    assert rows != rows_of(task, 40, split, 4, cola_dir)
    assert len(rows) == 40 and all(set(r) == {"input", "output"} and r["output"] for r in rows)


@pytest.mark.parametrize("task", TASKS)
def test_test_prompts_use_templates_absent_from_training(task, cola_dir):
    """The templates of the two splits are disjoint, every test template's fixed text (5+ characters) occurs in no
    training prompt, every training template's in no test prompt, and each split uses all of its templates."""
    assert not set(TRAIN_TEMPLATES[task]) & set(TEST_TEMPLATES[task])
    train = [r["input"] for r in rows_of(task, 300, "train", 0, cola_dir)]
    test = [r["input"] for r in rows_of(task, 40, "test", 1, cola_dir)]
    for templates, prompts in ((TEST_TEMPLATES[task], train), (TRAIN_TEMPLATES[task], test)):
        for template in templates:
            for fragment in template_fragments(template):
                if len(fragment) >= 5:
                    assert not any(fragment in p for p in prompts), (template, fragment)
    for templates, prompts in ((TRAIN_TEMPLATES[task], train), (TEST_TEMPLATES[task], test)):
        for template in templates:
            longest = max(template_fragments(template), key=len)
            assert any(longest in p for p in prompts), template
    assert not set(train) & set(test)


def test_tag_rows_keep_the_real_protocols_words_and_split():
    label_of = {w: label for label, words in TAG_CATEGORIES.items() for w in words}
    test_words = {w for words in TAG_CATEGORIES.values() for i, w in enumerate(words) if i % 4 == 3}
    test = task_rows("tag", 32, "test", 1)
    train = task_rows("tag", 400, "train", 0)
    for rows, split_words in ((test, test_words), (train, set(label_of) - test_words)):
        for row in rows:
            (word,) = [w for w in split_words if w in row["input"].replace("'", " ").replace(".", " ").split()]
            assert row["output"] == label_of[word]
    assert len({r["input"] for r in test}) == 32  # each test word once


def test_extract_answers_hold_the_sentences_fields():
    for split in ("train", "test"):
        for row in task_rows("extract", 60, split, 5):
            fields = dict(pair.split("=") for pair in row["output"].split("; "))
            assert tuple(fields) == EXTRACT_FIELDS
            assert row["output"] == EXTRACT_ANSWER.format(**fields)
            assert all(re.search(rf"\b{value}\b", row["input"]) for value in fields.values()), row


def test_cola_rows_are_balanced_retemplated_and_held_out(cola_dir):
    train = cola_rows(cola_dir, 10, "train", 0)
    test = cola_rows(cola_dir, 4, "test", 1)
    assert [r["output"] for r in train] == ["yes", "no"] * 5
    assert [r["output"] for r in test] == ["yes", "no"] * 2
    assert all(any(r["input"] == t.format(sentence=s) for t in COLA_TRAIN_TEMPLATES for s, _ in
                   cola_sentences(cola_dir, "train")) for r in train)  # fmt: skip
    # the training sentence and the over-long one never reach the test rows: each of the 4 others once, in the
    # test templates in turn
    held_out = ["The cat slept.", "Cat the slept.", "The bird sang.", "Bird sang the."]
    sentences = [next(x for x in held_out if x in r["input"]) for r in test]
    assert sorted(sentences) == sorted(held_out)
    assert [r["input"] for r in test] == [
        COLA_TEST_TEMPLATES[i % 3].format(sentence=x) for i, x in enumerate(sentences)
    ]


def test_cola_rows_of_the_papers_set(benchmarks_dir):
    """On the paper's CoLA files: training rows from train.jsonl, test rows from test.jsonl sentences that are not
    training sentences, each label half of the rows, each test sentence once."""
    train_pool = dict(cola_sentences(benchmarks_dir, "train"))
    test_pool = dict(cola_sentences(benchmarks_dir, "test"))
    assert len(train_pool) > 7000 and len(test_pool) > 900
    for split, n, pool, templates in (("train", 400, train_pool, COLA_TRAIN_TEMPLATES),
                                      ("test", 32, test_pool, COLA_TEST_TEMPLATES)):  # fmt: skip
        rows = cola_rows(benchmarks_dir, n, split, 0)
        assert [r["output"] for r in rows] == ["yes", "no"] * (n // 2)
        prompts = {t.format(sentence=x): x for t in templates for x in pool}
        sentences = [prompts[row["input"]] for row in rows]
        assert [pool[x] for x in sentences] == [row["output"] for row in rows]
        if split == "test":
            assert len(set(sentences)) == n and not set(sentences) & set(train_pool)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist.*--paper-sets DIR.*--tasks tag,extract"),
        ('{"input": "Is it? yes", "output": "yes"}\n', "line 1: not a row of the paper's CoLA set"),
        (json.dumps({"input": PAPER_PROMPT.format("A b."), "output": "maybe"}) + "\n", "line 1"),
    ],
)
def test_bad_cola_folder_gets_a_clear_error(tmp_path, content, message):
    if content is not None:
        (tmp_path / "cola").mkdir()
        (tmp_path / "cola" / "train.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        cola_rows(tmp_path, 4, "train", 0)


def test_cola_needs_the_folder():
    with pytest.raises(ValueError, match="--paper-sets DIR"):
        task_rows("cola", 4, "train", 0, None)


def test_near_prompts_are_held_out_and_distinct():
    everything = [p for prompts in NEAR_PROMPTS.values() for p in prompts]
    assert set(NEAR_PROMPTS) == set(TASKS) and all(len(p) == 16 for p in NEAR_PROMPTS.values())
    assert len(set(everything)) == len(everything) and not set(everything) & set(CHAT_PROMPTS)
    templates = [f for task in TASKS for t in TRAIN_TEMPLATES[task] + TEST_TEMPLATES[task] for f in
                 template_fragments(t) if len(f) >= 8]  # fmt: skip
    assert not any(f in p for f in templates for p in everything)


# ------------------------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------------------------
def s(matches: int, length: int, logprob: float = -1.0) -> Scored:
    return Scored(logprob=logprob, matches=matches, length=length)


def test_entry_of_pools_the_near_prompts_and_averages():
    tasks = ["tag", "cola"]
    reference = {"near tag": [s(2, 2, -1.0)], "near cola": [s(4, 4, -2.0), s(2, 2, -1.0)], "chat": [s(4, 4, -4.0)]}
    scored = {
        "tag": [s(1, 1), s(0, 1), s(1, 1), s(1, 1)],  # 3 of 4 exact
        "cola": [s(2, 2), s(1, 2)],  # golds yes, no: the second is wrong
        "near tag": [s(1, 2, -1.0)],
        "near cola": [s(4, 4, -2.0), s(0, 2, -1.0 - 8 * torch.log(torch.tensor(2.0)).item())],
        "chat": [s(2, 4, -4.0)],
    }
    entry = entry_of(scored, reference, tasks, {"cola": ["yes", "no"]})
    scores = entry["scores"]
    assert scores["tag"] == 75.0 and scores["cola"] == 50.0
    assert scores["agree near"] == pytest.approx(100 * 5 / 8) and scores["agree chat"] == 50.0
    assert scores["lik near"] == pytest.approx(100.0 * 2 ** (-8 / 8))  # 8 pooled tokens lose 8 log 2
    assert scores["lik chat"] == pytest.approx(100.0)
    assert scores["target avg"] == 62.5
    assert scores["retention avg"] == pytest.approx((62.5 + 50.0 + 50.0 + 100.0) / 4)
    assert entry["metrics"]["near cola"]["answer_agreement"] == 50.0
    assert entry["metrics"]["cola"]["mcc"] == pytest.approx(100 * (1 * 0 - 1 * 0) / 1) == 0.0
    assert entry["metrics"]["tag"]["token_accuracy"] == 75.0


@pytest.mark.parametrize(
    "exact, expected", [([1, 1, 1, 1], 100.0), ([0, 0, 0, 0], -100.0), ([1, 1, 1, 0], pytest.approx(100 / 3**0.5))]
)
def test_label_mcc_counts_a_wrong_answer_as_the_other_label(exact, expected):
    golds = ["yes", "no", "no", "yes"]
    assert label_mcc([s(e, 1) for e in exact], golds) == expected


def test_routing_shares_and_counts():
    routes = {
        "tag": ["tag", "tag", "cola", BASE_ROUTE],
        "cola": ["cola", "cola"],
        "near tag": [BASE_ROUTE, "tag"],
        "chat": [BASE_ROUTE, BASE_ROUTE, BASE_ROUTE, "cola"],
    }
    routing = routing_of(routes, ["tag", "cola"])
    assert routing["shares"] == {"tag": 50.0, "cola": 100.0, "near tag": 50.0, "chat": 75.0, "general": 100 * 4 / 6}
    assert routing["counts"]["tag"] == {BASE_ROUTE: 1, "cola": 1, "tag": 2}


def test_routed_as_lookup_compares_with_the_routes_model():
    table = {BASE_ROUTE: {"chat": [s(3, 4, -2.0), s(4, 4, -1.0)]}, "tag": {"chat": [s(0, 4, -7.0), s(1, 4, -9.0)]}}
    same = {"chat": [s(3, 4, -2.0), s(1, 4, -9.0 + 1e-4)]}
    assert routed_as_lookup(same, {"chat": [BASE_ROUTE, "tag"]}, table) == 100.0
    assert routed_as_lookup(same, {"chat": ["tag", "tag"]}, table) == 50.0
    assert routed_as_lookup(same, {"chat": [BASE_ROUTE, BASE_ROUTE]}, table) == 50.0
    off = {"chat": [s(3, 4, -2.0 - 5e-3), s(1, 4, -9.0)]}  # (more than 1e-3 per token away)
    assert routed_as_lookup(off, {"chat": [BASE_ROUTE, "tag"]}, table) == 50.0


def test_teacher_forced_with_prompt_labels_equals_the_plain_scoring_without_a_gate():
    tok = build_tokenizer()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    pairs = [(tok("Tag: fox")["input_ids"], [10, 11, 2]), (tok("Hi")["input_ids"], [12, 2]), ([1, 40], [13, 14, 15])]
    plain = teacher_forced(model, pairs, tok.pad_token_id, batch_size=2)
    labelled = teacher_forced_prompt_query(model, pairs, tok.pad_token_id, batch_size=2)
    assert [(x.matches, x.length) for x in labelled] == [(x.matches, x.length) for x in plain]
    assert [x.logprob for x in labelled] == pytest.approx([x.logprob for x in plain], abs=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# Command line and a tiny end-to-end run
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, wanted",
    [(["--protocol", "library"], True), (["--protocol=library"], True), (["--protocol", "real"], False), ([], False)],
)
def test_library_requested(argv, wanted):
    assert library_requested(["--model", "m", *argv]) is wanted


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "tag"], "at least two different tasks"),
        (["--tasks", "tag,tag"], "at least two different tasks"),
        (["--tasks", "tag,poems"], "at least two different tasks"),
        (["--methods", "imsm,lora"], r"unknown row\(s\) \['lora'\]"),
        (["--gate-steps", "0"], "--gate-steps must be >= 1"),
    ],
)
def test_bad_library_options_are_refused(extra, message):
    with pytest.raises(SystemExit, match=message):
        parse_library_args(["--protocol", "library", "--model", "m", *extra])


def test_cola_without_the_folder_stops_before_loading_the_model(tmp_path, monkeypatch):
    monkeypatch.delenv("IMSM_BENCHMARKS_DIR", raising=False)
    with pytest.raises(SystemExit, match="--paper-sets DIR"):
        main(["--protocol", "library", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "out")])


def tiny_chat_model(path) -> str:
    tok = build_tokenizer()
    tok.model_max_length = 4096
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_library_protocol_end_to_end_at_tiny_size(tmp_path, cola_dir, capsys):
    model = tiny_chat_model(tmp_path / "model")
    out = tmp_path / "out"
    args = ["--protocol", "library", "--model", model, "--paper-sets", str(cola_dir), "--steps", "1",
            "--batch-size", "2", "--train-size", "8", "--eval-size", "2", "--max-new-tokens", "3", "--jobs", "1",
            "--gate-steps", "2", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == list(TASKS) and results["settings"]["chat_template"] is True
    assert list(results["methods"]) == [
        "base model", "oracle choice", "LoRA tag on every prompt", "LoRA extract on every prompt",
        "LoRA cola on every prompt", "merged (cat w=1)", "merged (cat w=1/3)", "Arrow (top_k=1)", "Arrow (top_k=3)",
        "IMSM router (hard choice)",
    ]  # fmt: skip
    assert set(OPTIONAL_ROWS) == {"merged-sum", "merged-mean", "arrow-1", "arrow-all", "imsm"}
    base = results["methods"]["base model"]["scores"]
    assert base["agree chat"]["mean"] == 100.0 and base["lik near"]["mean"] == pytest.approx(100.0)
    oracle = results["methods"]["oracle choice"]
    for task in TASKS:  # the oracle: each task's LoRA on its test prompts, the base model on every general prompt
        alone = results["methods"][f"LoRA {task} on every prompt"]
        assert oracle["scores"][task] == alone["scores"][task]
    assert oracle["scores"]["retention avg"]["mean"] == pytest.approx(100.0)
    assert results["methods"]["merged (cat w=1)"]["per_seed"][0]["built"] == {
        "combination_type": "cat", "weights": [1.0, 1.0, 1.0]
    }  # fmt: skip
    for task in TASKS:
        adapter = out / "adapters" / "seed0" / task
        assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    design = results["task_design"]
    assert design["cola"]["test_prompts"] == 2 and design["tag"]["near_prompts"] == 2
    assert results["settings"]["general_prompts"] == {"near tag": 2, "near extract": 2, "near cola": 2, "chat": 2}
    imsm = results["methods"]["IMSM router (hard choice)"]
    routing = imsm["per_seed"][0]["routing"]
    assert set(routing["shares"]) == {*TASKS, *(f"near {t}" for t in TASKS), "chat", "general"}
    for name, counts in routing["counts"].items():  # every prompt routed once, to the base model or one LoRA
        assert sum(counts.values()) == 2 and set(counts) <= {BASE_ROUTE, *TASKS}, (name, counts)
    assert imsm["routed_as_lookup"]["mean"] == 100.0  # each prompt scored as the model of its route alone
    built = imsm["per_seed"][0]["built"]
    assert set(built["routers"]) == set(TASKS) and built["gate_steps"] == 2 and built["train_seconds"] > 0
    printed = capsys.readouterr().out
    assert "| oracle choice |" in printed and "Arrow (top_k=3)" in printed
    assert "| IMSM router (hard choice) |" in printed.split("| router |")[1]  # the routing table
