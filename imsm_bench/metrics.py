"""Metrics of the IMSM paper, as pure Python functions over generated texts and gold answers.

Every metric takes ``predictions`` (one generated string per example) and ``golds`` (one gold per example: a string,
or a non-empty list of acceptable strings as in WebQ) and returns a float in percent (0-100), like the paper's tables.
Matthews correlation is the one exception to the 0-100 range: it lies in -100..100.

Sets and their metrics (``METRICS_BY_SET``):

- mrpc: accuracy and binary F1 of the yes/no label;
- cola: Matthews correlation of the yes/no label;
- multirc: accuracy of the yes/no label;
- ropes: SQuAD-style exact match and token F1;
- gsm8k: accuracy of the final number;
- webq, freebase: the normalized prediction contains a normalized gold answer.

Differences from the original IMSM evaluation script, on purpose:

- yes/no labels come from the first label word of the normalized text (the script tests whether the substring
  "yes" occurs anywhere, so "yesterday" counted as yes and any non-"yes" text as "no"); a text without a label word
  counts as wrong in every classification metric;
- token F1 is SQuAD's (multiset overlap, maximum over the golds) rather than an overlap of token sets;
- GSM8K compares numbers, not normalized strings.
"""

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation

Gold = str | Sequence[str]
"""A gold answer: one string, or a non-empty sequence of acceptable strings."""

MetricFn = Callable[[Sequence[str], Sequence[Gold]], float]
"""Signature of every metric: ``(predictions, golds) -> percent``."""

POSITIVE_LABEL = "yes"
"""The positive class of the yes/no classification sets (MRPC, CoLA, MultiRC)."""

NEGATIVE_LABEL = "no"
"""The negative class of the yes/no classification sets."""

LABEL_WORDS: tuple[str, ...] = (POSITIVE_LABEL, NEGATIVE_LABEL)
"""The label words searched for in a generated text, after normalization."""

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
# A number: "1,000" style thousands groups or plain digits, optional decimals; a "-" sign only when it does not
# follow a digit (so "16-3" gives 16 and 3, not 16 and -3). A trailing sentence period ("18.") is not a decimal.
_NUMBER_RE = re.compile(r"(?<!\d)-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_GSM8K_MARKERS_RE = re.compile(r"####|the answer is", re.IGNORECASE)


# --------------------------------------------------------------------------------------------------------------------
# Normalization and answer extraction
# --------------------------------------------------------------------------------------------------------------------


def normalize_answer(s: str) -> str:
    """Normalize an answer SQuAD style: lower-case, drop ASCII punctuation, drop articles, collapse whitespace.

    Example: ``normalize_answer("The  Eiffel-Tower!")`` is ``"eiffeltower"``.
    """
    text = s.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def extract_label(text: str, labels: Sequence[str] = LABEL_WORDS) -> str | None:
    """Return the first label word among the normalized tokens of ``text``, or ``None`` when there is none.

    Robust to extra generated text: ``"Yes, they are equivalent."`` gives ``"yes"`` and
    ``"The answer is no. Yes would be wrong"`` gives ``"no"``. Whole tokens only: ``"yesterday"`` is not ``"yes"``
    and ``"not"`` is not ``"no"``. ``labels`` must be lower-case single words.
    """
    wanted = set(labels)
    for token in normalize_answer(text).split():
        if token in wanted:
            return token
    return None


def extract_gsm8k_number(text: str) -> Decimal | None:
    """Return the final numeric answer of a GSM8K solution, or ``None`` when the text has no number.

    The number that follows the last ``####`` or ``The answer is`` marker (case-insensitive) wins; without a marker
    followed by a number, the last number of the whole text. Thousands commas are removed (``1,000`` is 1000) and a
    trailing sentence period is ignored (``The answer is 18.`` gives 18). Values are compared as decimals, so ``18``,
    ``18.0`` and ``18.00`` are equal.
    """
    marker_ends = [match.end() for match in _GSM8K_MARKERS_RE.finditer(text)]
    if marker_ends:
        after_marker = _NUMBER_RE.search(text, marker_ends[-1])
        if after_marker is not None:
            return _to_decimal(after_marker.group(0))
    numbers = _NUMBER_RE.findall(text)
    if not numbers:
        return None
    return _to_decimal(numbers[-1])


def _to_decimal(number: str) -> Decimal | None:
    """Turn a matched number string such as ``"-1,450,000"`` into a ``Decimal`` (``None`` if it cannot be parsed)."""
    try:
        return Decimal(number.replace(",", ""))
    except InvalidOperation:
        return None


# --------------------------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------------------------


def _gold_list(gold: Gold) -> list[str]:
    """Return a gold answer as a non-empty list of strings (``ValueError`` if empty, ``TypeError`` if not strings)."""
    if isinstance(gold, str):
        return [gold]
    answers = list(gold)
    if not answers:
        raise ValueError("a gold answer list is empty; it needs at least one acceptable answer")
    for answer in answers:
        if not isinstance(answer, str):
            raise TypeError(f"gold answers must be strings, got {type(answer).__name__}: {answer!r}")
    return answers


def _check_inputs(predictions: Sequence[str], golds: Sequence[Gold]) -> None:
    """Raise ``ValueError`` unless there are examples, as many predictions as golds; ``TypeError`` for non-strings."""
    if len(predictions) != len(golds):
        raise ValueError(f"got {len(predictions)} predictions but {len(golds)} gold answers; they must pair up")
    if len(predictions) == 0:
        raise ValueError("no examples to score: predictions and golds are empty")
    for prediction in predictions:
        if not isinstance(prediction, str):
            raise TypeError(f"predictions must be strings, got {type(prediction).__name__}: {prediction!r}")


def _gold_label(gold: Gold) -> str:
    """Return the yes/no label of a classification gold (its first answer if a list); raise if it has none."""
    first = _gold_list(gold)[0]
    label = extract_label(first)
    if label is None:
        raise ValueError(f"gold answer {first!r} has no label word {LABEL_WORDS}; is this a yes/no set?")
    return label


def _confusion_matrix(predictions: Sequence[str], golds: Sequence[Gold]) -> tuple[int, int, int, int]:
    """Count ``(tp, fp, fn, tn)`` for the positive label "yes".

    A prediction without a label word counts as wrong: it is taken as the opposite of its gold label (a false negative
    when the gold is "yes", a false positive when the gold is "no").
    """
    _check_inputs(predictions, golds)
    tp = fp = fn = tn = 0
    for prediction, gold in zip(predictions, golds, strict=True):
        gold_positive = _gold_label(gold) == POSITIVE_LABEL
        predicted = extract_label(prediction)
        if predicted is None:
            predicted_positive = not gold_positive
        else:
            predicted_positive = predicted == POSITIVE_LABEL
        if predicted_positive and gold_positive:
            tp += 1
        elif predicted_positive:
            fp += 1
        elif gold_positive:
            fn += 1
        else:
            tn += 1
    return tp, fp, fn, tn


# --------------------------------------------------------------------------------------------------------------------
# Metrics (all in percent)
# --------------------------------------------------------------------------------------------------------------------


def accuracy(predictions: Sequence[str], golds: Sequence[Gold]) -> float:
    """Percent of examples whose predicted yes/no label (first label word) equals the gold label.

    A prediction without a label word counts as wrong.
    """
    tp, fp, fn, tn = _confusion_matrix(predictions, golds)
    return 100.0 * (tp + tn) / (tp + fp + fn + tn)


def binary_f1(predictions: Sequence[str], golds: Sequence[Gold]) -> float:
    """F1 in percent of the positive label "yes": ``2 tp / (2 tp + fp + fn)``; 0.0 when there is no true positive.

    A prediction without a label word counts as wrong (see ``_confusion_matrix``).
    """
    tp, fp, fn, _ = _confusion_matrix(predictions, golds)
    denominator = 2 * tp + fp + fn
    if denominator == 0:
        return 0.0
    return 100.0 * 2 * tp / denominator


def matthews_corrcoef(predictions: Sequence[str], golds: Sequence[Gold]) -> float:
    """Matthews correlation coefficient of the yes/no labels, times 100 (so in -100..100).

    ``(tp tn - fp fn) / sqrt((tp + fp)(tp + fn)(tn + fp)(tn + fn))``; 0.0 when undefined (a zero factor in the
    denominator, e.g. all golds or all predictions of one class). A prediction without a label word counts as wrong.
    """
    tp, fp, fn, tn = _confusion_matrix(predictions, golds)
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    if denominator == 0.0:
        return 0.0
    return 100.0 * (tp * tn - fp * fn) / denominator


def exact_match(predictions: Sequence[str], golds: Sequence[Gold]) -> float:
    """Percent of predictions equal to some gold answer after ``normalize_answer`` (SQuAD exact match)."""
    _check_inputs(predictions, golds)
    hits = 0
    for prediction, gold in zip(predictions, golds, strict=True):
        normalized_prediction = normalize_answer(prediction)
        if any(normalize_answer(answer) == normalized_prediction for answer in _gold_list(gold)):
            hits += 1
    return 100.0 * hits / len(predictions)


def _token_f1_single(prediction: str, gold: str) -> float:
    """SQuAD token F1 (0-1) of one prediction against one gold.

    If either side normalizes to no tokens, the score is 1.0 when both do and 0.0 otherwise (as in SQuAD v2).
    """
    prediction_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not prediction_tokens or not gold_tokens:
        return float(prediction_tokens == gold_tokens)
    common = Counter(prediction_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(predictions: Sequence[str], golds: Sequence[Gold]) -> float:
    """Mean SQuAD token-overlap F1 in percent, taking for each example the best F1 over its gold answers."""
    _check_inputs(predictions, golds)
    total = 0.0
    for prediction, gold in zip(predictions, golds, strict=True):
        total += max(_token_f1_single(prediction, answer) for answer in _gold_list(gold))
    return 100.0 * total / len(predictions)


def gsm8k_accuracy(predictions: Sequence[str], golds: Sequence[Gold]) -> float:
    """Percent of predictions whose final number equals the gold's final number (see ``extract_gsm8k_number``).

    Golds may end with ``#### N`` (original GSM8K) or ``The answer is N.`` (the IMSM files). A prediction without a
    number is wrong; a gold without a number raises ``ValueError``.
    """
    _check_inputs(predictions, golds)
    hits = 0
    for prediction, gold in zip(predictions, golds, strict=True):
        gold_numbers = []
        for answer in _gold_list(gold):
            number = extract_gsm8k_number(answer)
            if number is None:
                raise ValueError(f"GSM8K gold answer has no number: {answer[-80:]!r}")
            gold_numbers.append(number)
        predicted = extract_gsm8k_number(prediction)
        if predicted is not None and predicted in gold_numbers:
            hits += 1
    return 100.0 * hits / len(predictions)


def contains_accuracy(predictions: Sequence[str], golds: Sequence[Gold]) -> float:
    """Percent of predictions whose normalized text contains some normalized gold answer (WebQ, FreebaseQA).

    Substring containment, as in the IMSM evaluation script. A gold answer that normalizes to the empty string never
    matches (it would otherwise be contained in every prediction).
    """
    _check_inputs(predictions, golds)
    hits = 0
    for prediction, gold in zip(predictions, golds, strict=True):
        normalized_prediction = normalize_answer(prediction)
        for answer in _gold_list(gold):
            normalized_answer = normalize_answer(answer)
            if normalized_answer and normalized_answer in normalized_prediction:
                hits += 1
                break
    return 100.0 * hits / len(predictions)


# --------------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------------

METRICS: dict[str, MetricFn] = {
    "accuracy": accuracy,
    "binary_f1": binary_f1,
    "matthews_corrcoef": matthews_corrcoef,
    "exact_match": exact_match,
    "token_f1": token_f1,
    "gsm8k_accuracy": gsm8k_accuracy,
    "contains_accuracy": contains_accuracy,
}
"""Every metric by name."""

METRICS_BY_SET: dict[str, list[str]] = {
    "mrpc": ["accuracy", "binary_f1"],
    "cola": ["matthews_corrcoef"],
    "ropes": ["exact_match", "token_f1"],
    "gsm8k": ["gsm8k_accuracy"],
    "webq": ["contains_accuracy"],
    "freebase": ["contains_accuracy"],
    "multirc": ["accuracy"],
}
"""The metrics the paper reports for each benchmark set."""


def get_metric(name: str) -> MetricFn:
    """Return the metric function called ``name``; raise ``ValueError`` listing the known names if there is none."""
    metric = METRICS.get(name)
    if metric is None:
        raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(sorted(METRICS))}")
    return metric


def resolve_metric_names(set_or_metric_names: str | Sequence[str]) -> list[str]:
    """Expand set names and metric names into a list of metric names, in order and without repeats.

    Each name is a set name of ``METRICS_BY_SET`` (it stands for that set's metrics) or a metric name of ``METRICS``;
    anything else raises ``ValueError`` listing both.
    """
    names = [set_or_metric_names] if isinstance(set_or_metric_names, str) else list(set_or_metric_names)
    if not names:
        raise ValueError("no set or metric names given")
    resolved: list[str] = []
    for name in names:
        if name in METRICS_BY_SET:
            expanded = METRICS_BY_SET[name]
        elif name in METRICS:
            expanded = [name]
        else:
            raise ValueError(
                f"unknown set or metric {name!r}; known sets: {', '.join(sorted(METRICS_BY_SET))}; "
                f"known metrics: {', '.join(sorted(METRICS))}"
            )
        for metric_name in expanded:
            if metric_name not in resolved:
                resolved.append(metric_name)
    return resolved


def compute_metrics(
    set_or_metric_names: str | Sequence[str], predictions: Sequence[str], golds: Sequence[Gold]
) -> dict[str, float]:
    """Score ``predictions`` against ``golds`` with every metric named, directly or through a set name.

    Example: ``compute_metrics("mrpc", ["Yes.", "no"], ["yes", "yes"])`` is
    ``{"accuracy": 50.0, "binary_f1": 66.66...}``. Returns metric name -> percent.
    """
    return {name: get_metric(name)(predictions, golds) for name in resolve_metric_names(set_or_metric_names)}
