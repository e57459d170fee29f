"""Tests of imsm_bench.metrics and imsm_bench.data against hand-computed values."""

import json
import math
import os
from decimal import Decimal
from pathlib import Path

import pytest

from imsm_bench.data import load_jsonl, parse_eval_arg
from imsm_bench.metrics import (
    METRICS,
    METRICS_BY_SET,
    accuracy,
    binary_f1,
    compute_metrics,
    contains_accuracy,
    exact_match,
    extract_gsm8k_number,
    extract_label,
    get_metric,
    gsm8k_accuracy,
    matthews_corrcoef,
    normalize_answer,
    resolve_metric_names,
    token_f1,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def benchmarks_dir() -> Path:
    """The shared benchmark folder: ``$IMSM_BENCHMARKS_DIR``, else ``<repo root>/../shared/data/imsm-benchmarks``."""
    from_env = os.environ.get("IMSM_BENCHMARKS_DIR")
    if from_env:
        return Path(from_env)
    return REPO_ROOT.parent / "shared" / "data" / "imsm-benchmarks"


# --------------------------------------------------------------------------------------------------------------------
# normalize_answer and extraction
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Eiffel-Tower!", "eiffeltower"),
        ("An apple, a day", "apple day"),
        ("  St. Louis\n", "st louis"),
        ("Theater", "theater"),
        ("", ""),
        ("the a an", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("yes", "yes"),
        ("No.", "no"),
        ("  YES, they are equivalent.", "yes"),
        ("The answer is no. Yes would be wrong.", "no"),
        ("Yesterday it rained", None),
        ("not sure", None),
        ("", None),
        ("maybe", None),
    ],
)
def test_extract_label(text: str, expected: str | None) -> None:
    assert extract_label(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Janet sells 16 - 3 - 4 = 9 duck eggs.\nThe answer is 18.", Decimal(18)),
        ("so 1,000 + 200 = 1,200\n#### 1,200", Decimal(1200)),
        ("The answer is $1,450,000.", Decimal(1450000)),
        ("The answer is -3.", Decimal(-3)),
        ("The answer is 18.\n\nQuestion: Tom has 5 apples and 7 pears.", Decimal(18)),
        ("First 2, then The answer is 4. Wait, the answer is 6.", Decimal(6)),
        ("We get 5 and then 16-3=13", Decimal(13)),
        ("the answer is 18.00", Decimal(18)),
        ("The answer is unknown", None),
        ("", None),
    ],
)
def test_extract_gsm8k_number(text: str, expected: Decimal | None) -> None:
    assert extract_gsm8k_number(text) == expected


# --------------------------------------------------------------------------------------------------------------------
# Classification metrics: one 2x2 confusion matrix computed on paper
# --------------------------------------------------------------------------------------------------------------------

# tp = 3, fp = 1, fn = 2, tn = 4 (10 examples), with noisy generated text.
CLASSIFICATION_PREDICTIONS = [
    "Yes, they mean the same.",  # gold yes -> tp
    "yes",  # gold yes -> tp
    "The answer is yes.",  # gold yes -> tp
    "No.",  # gold yes -> fn
    "no, not at all",  # gold yes -> fn
    "YES",  # gold no -> fp
    "no",  # gold no -> tn
    "No",  # gold no -> tn
    "no. Yes would be wrong",  # gold no -> tn
    "\nno",  # gold no -> tn
]
CLASSIFICATION_GOLDS = ["yes"] * 5 + ["no"] * 5


def test_accuracy_hand_computed() -> None:
    # (tp + tn) / n = (3 + 4) / 10
    assert accuracy(CLASSIFICATION_PREDICTIONS, CLASSIFICATION_GOLDS) == pytest.approx(70.0)


def test_binary_f1_hand_computed() -> None:
    # precision = 3 / 4, recall = 3 / 5, F1 = 2 * 3 / (2 * 3 + 1 + 2) = 6 / 9
    assert binary_f1(CLASSIFICATION_PREDICTIONS, CLASSIFICATION_GOLDS) == pytest.approx(66.6666667)


def test_matthews_corrcoef_hand_computed() -> None:
    # (3 * 4 - 1 * 2) / sqrt((3 + 1) * (3 + 2) * (4 + 1) * (4 + 2)) = 10 / sqrt(600) = 0.4082483
    assert matthews_corrcoef(CLASSIFICATION_PREDICTIONS, CLASSIFICATION_GOLDS) == pytest.approx(40.82483, abs=1e-4)
    assert matthews_corrcoef(CLASSIFICATION_PREDICTIONS, CLASSIFICATION_GOLDS) == pytest.approx(1000 / math.sqrt(600))


def test_perfect_and_inverted_classification() -> None:
    golds = ["yes", "no", "yes", "no"]
    assert accuracy(golds, golds) == 100.0
    assert binary_f1(golds, golds) == 100.0
    assert matthews_corrcoef(golds, golds) == 100.0
    inverted = ["no", "yes", "no", "yes"]
    assert accuracy(inverted, golds) == 0.0
    assert binary_f1(inverted, golds) == 0.0
    assert matthews_corrcoef(inverted, golds) == -100.0


def test_unknown_prediction_counts_as_wrong() -> None:
    # Unknown with gold yes -> fn; unknown with gold no -> fp; so tp = tn = 0, fp = fn = 1.
    predictions = ["maybe", "I do not know", ""]
    golds = ["yes", "no", "no"]
    assert accuracy(predictions, golds) == 0.0
    assert binary_f1(predictions, golds) == 0.0  # no true positive
    # tp = 0, fp = 2, fn = 1, tn = 0: (0 - 2) / sqrt(2 * 1 * 2 * 1) = -1
    assert matthews_corrcoef(predictions, golds) == pytest.approx(-100.0)


def test_matthews_corrcoef_undefined_is_zero() -> None:
    # Only one gold class: (tn + fp) = 0, the denominator vanishes.
    assert matthews_corrcoef(["yes", "yes"], ["yes", "yes"]) == 0.0
    # Only one predicted class: (tp + fp) = 0.
    assert matthews_corrcoef(["no", "no"], ["yes", "no"]) == 0.0


def test_binary_f1_no_positives_is_zero() -> None:
    assert binary_f1(["no", "no"], ["no", "no"]) == 0.0


def test_classification_gold_without_label_raises() -> None:
    with pytest.raises(ValueError, match="label word"):
        accuracy(["yes"], ["acceptable"])


def test_classification_list_gold_uses_first_answer() -> None:
    assert accuracy(["yes"], [["yes", "no"]]) == 100.0


# --------------------------------------------------------------------------------------------------------------------
# Span metrics (ROPES)
# --------------------------------------------------------------------------------------------------------------------


def test_exact_match() -> None:
    assert exact_match(["The Cat.", "dog"], ["cat", "cat"]) == pytest.approx(50.0)
    assert exact_match(["Group B"], [["Group A", "group b"]]) == 100.0
    assert exact_match([""], ["cat"]) == 0.0


def test_token_f1_hand_computed() -> None:
    # pred tokens [cat, sat, on, mat], gold [cat, sat]: overlap 2, P = 2/4, R = 2/2, F1 = 2 * .5 * 1 / 1.5 = 2/3
    assert token_f1(["the cat sat on the mat"], ["a cat sat"]) == pytest.approx(66.6666667)
    # multiset overlap: pred [red, red, blue], gold [red, blue, blue]: overlap 2, P = R = 2/3, F1 = 2/3
    assert token_f1(["red red blue"], ["red blue blue"]) == pytest.approx(66.6666667)
    # no overlap
    assert token_f1(["dog"], ["cat"]) == 0.0


def test_token_f1_max_over_golds_and_mean() -> None:
    # Example 1: max(F1 vs "dog" = 0, F1 vs "cat sat" = 1) = 1; example 2: 0.  Mean = 0.5.
    assert token_f1(["cat sat", "x"], [["dog", "cat sat"], "y"]) == pytest.approx(50.0)


def test_token_f1_empty_prediction() -> None:
    assert token_f1([""], ["cat"]) == 0.0
    # Both normalize to nothing: SQuAD scores 1.
    assert token_f1(["The"], ["a"]) == 100.0


# --------------------------------------------------------------------------------------------------------------------
# GSM8K
# --------------------------------------------------------------------------------------------------------------------


def test_gsm8k_accuracy() -> None:
    predictions = [
        "1,000 + 200 = 1,200. The answer is 1,200.",  # gold #### 1200 -> hit
        "She makes 9 * 2 = $18.\nThe answer is $18.",  # gold "The answer is 18." -> hit
        "So 3 + 4 = 7",  # no marker, last number 7; gold 8 -> miss
        "",  # empty -> miss
        "The answer is 70000.",  # gold "The answer is 70,000." -> hit
    ]
    golds = [
        "... #### 1200",
        "He makes 18.\nThe answer is 18.",
        "The answer is 8.",
        "#### 5",
        "The answer is 70,000.",
    ]
    assert gsm8k_accuracy(predictions, golds) == pytest.approx(60.0)


def test_gsm8k_gold_without_number_raises() -> None:
    with pytest.raises(ValueError, match="no number"):
        gsm8k_accuracy(["5"], ["no number here"])


# --------------------------------------------------------------------------------------------------------------------
# Containment (WebQ, FreebaseQA)
# --------------------------------------------------------------------------------------------------------------------


def test_contains_accuracy_webq_list_golds() -> None:
    predictions = ["They speak Jamaican English.", "English", "", "Lawyer, then president"]
    golds = [
        ["Jamaican Creole English Language", "Jamaican English"],  # hit via the 2nd answer
        ["Jamaican Creole English Language", "Jamaican English"],  # "english" contains neither -> miss
        ["Lawyer"],  # empty prediction -> miss
        ["Lawyer"],  # hit
    ]
    assert contains_accuracy(predictions, golds) == pytest.approx(50.0)


def test_contains_accuracy_freebase_string_golds() -> None:
    assert contains_accuracy(["Sandi Toksvig.", "Henry"], ["sandi toksvig", "henry fonda"]) == pytest.approx(50.0)


def test_contains_accuracy_empty_normalized_gold_never_matches() -> None:
    assert contains_accuracy(["anything"], ["The"]) == 0.0


# --------------------------------------------------------------------------------------------------------------------
# Registry and input checks
# --------------------------------------------------------------------------------------------------------------------


def test_metrics_by_set_covers_all_sets() -> None:
    assert set(METRICS_BY_SET) == {"mrpc", "cola", "ropes", "gsm8k", "webq", "freebase", "multirc"}
    for names in METRICS_BY_SET.values():
        for name in names:
            assert name in METRICS


def test_compute_metrics_by_set_and_by_metric() -> None:
    result = compute_metrics("mrpc", ["Yes.", "no"], ["yes", "yes"])
    # tp = 1, fn = 1: accuracy 1/2, F1 = 2 / (2 + 0 + 1) = 2/3
    assert list(result) == ["accuracy", "binary_f1"]
    assert result["accuracy"] == pytest.approx(50.0)
    assert result["binary_f1"] == pytest.approx(66.6666667)
    mixed = compute_metrics(["multirc", "matthews_corrcoef", "accuracy"], ["yes", "no"], ["yes", "no"])
    assert mixed == {"accuracy": 100.0, "matthews_corrcoef": 100.0}


def test_resolve_metric_names_dedupes() -> None:
    assert resolve_metric_names(["webq", "freebase", "exact_match"]) == ["contains_accuracy", "exact_match"]


def test_get_metric() -> None:
    assert get_metric("token_f1") is token_f1
    with pytest.raises(ValueError, match="unknown metric 'bleu'.*accuracy.*token_f1"):
        get_metric("bleu")


def test_compute_metrics_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown set or metric 'squad'.*known sets:.*mrpc.*known metrics:"):
        compute_metrics("squad", ["a"], ["a"])


def test_length_mismatch_and_empty_inputs() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 gold"):
        exact_match(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no examples"):
        accuracy([], [])
    with pytest.raises(ValueError, match="empty"):
        contains_accuracy(["a"], [[]])
    with pytest.raises(TypeError, match="predictions must be strings"):
        exact_match([None], ["a"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="gold answers must be strings"):
        exact_match(["a"], [["a", 1]])  # type: ignore[list-item]


# --------------------------------------------------------------------------------------------------------------------
# load_jsonl and parse_eval_arg
# --------------------------------------------------------------------------------------------------------------------


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD_LINE = json.dumps({"input": "Q?", "output": "yes"})


def test_load_jsonl_valid_with_blank_lines_and_lists(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "ok.jsonl",
        [GOOD_LINE, "", "   ", json.dumps({"input": "Who?", "output": ["A", "B"], "id": 7})],
    )
    examples = load_jsonl(path)
    assert examples == [
        {"input": "Q?", "output": "yes"},
        {"input": "Who?", "output": ["A", "B"], "id": 7},
    ]


def test_load_jsonl_limit(tmp_path: Path) -> None:
    # The bad line 3 is never read with limit=2.
    path = write_lines(tmp_path / "limit.jsonl", [GOOD_LINE, GOOD_LINE, "{not json"])
    assert len(load_jsonl(path, limit=2)) == 2
    assert load_jsonl(path, limit=0) == []
    with pytest.raises(ValueError, match="limit"):
        load_jsonl(path, limit=-1)


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "malformed JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('"just a string"', "expected a JSON object"),
        (json.dumps({"input": "Q?"}), "missing key.*'output'"),
        (json.dumps({"output": "yes"}), "missing key.*'input'"),
        (json.dumps({"input": 3, "output": "yes"}), "'input' must be a string"),
        (json.dumps({"input": "Q?", "output": 3}), "'output' must be a string or a list"),
        (json.dumps({"input": "Q?", "output": []}), "empty list"),
        (json.dumps({"input": "Q?", "output": ["a", 1]}), "list items must be strings"),
    ],
)
def test_load_jsonl_bad_line_3(tmp_path: Path, bad_line: str, message: str) -> None:
    # Line 2 is blank: line numbers count physical lines, so the bad one is line 3.
    path = write_lines(tmp_path / "bad.jsonl", [GOOD_LINE, "", bad_line, GOOD_LINE])
    with pytest.raises(ValueError, match=message) as error:
        load_jsonl(path)
    assert str(path) in str(error.value)
    assert "line 3" in str(error.value)


def test_load_jsonl_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD_LINE.encode() + b'\n{"input": "caf\xe9", "output": "yes"}\n')
    with pytest.raises(ValueError, match="line 2: not valid UTF-8"):
        load_jsonl(path)


def test_load_jsonl_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="benchmark file not found") as error:
        load_jsonl(missing)
    assert str(missing) in str(error.value)


def test_parse_eval_arg() -> None:
    assert parse_eval_arg("mrpc=data/mrpc/test.jsonl") == ("mrpc", "data/mrpc/test.jsonl")
    assert parse_eval_arg(" webq = a=b.jsonl ") == ("webq", "a=b.jsonl")
    with pytest.raises(ValueError, match="no '='"):
        parse_eval_arg("mrpc")
    with pytest.raises(ValueError, match="name before '=' is empty"):
        parse_eval_arg("=path.jsonl")
    with pytest.raises(ValueError, match="path after '=' is empty"):
        parse_eval_arg("mrpc= ")


# --------------------------------------------------------------------------------------------------------------------
# The real benchmark files: golds scored against themselves
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("set_name", sorted(METRICS_BY_SET))
def test_benchmark_golds_score_perfectly(set_name: str) -> None:
    root = benchmarks_dir()
    if not root.is_dir():
        pytest.skip(f"benchmark folder {root} is absent (set IMSM_BENCHMARKS_DIR to point at imsm-benchmarks)")
    files = sorted((root / set_name).glob("*.jsonl"))
    if not files:
        pytest.skip(f"no .jsonl files for set {set_name!r} under {root}")
    for path in files:
        examples = load_jsonl(path, limit=20)
        assert len(examples) == 20, path
        golds = [example["output"] for example in examples]
        predictions = [gold if isinstance(gold, str) else gold[0] for gold in golds]
        names = list(METRICS_BY_SET[set_name])
        if "matthews_corrcoef" in names and len({extract_label(gold) for gold in predictions}) < 2:
            names.remove("matthews_corrcoef")  # undefined with one class in the slice
        if not names:
            continue
        scores = compute_metrics(names, predictions, golds)
        assert scores == {name: 100.0 for name in names}, path
