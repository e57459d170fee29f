"""Loading of prompt-formatted benchmark sets stored as JSON Lines: one ``{"input": ..., "output": ...}`` a line.

``input`` is the prompt (a string); ``output`` is the gold answer: a string, or a non-empty list of acceptable
answer strings (WebQ). Users bring their own files; nothing here depends on a particular data folder.
"""

import json
import os
from pathlib import Path
from typing import Any


def _check_example(example: Any, path: Path, line_number: int) -> dict[str, Any]:
    """Return ``example`` if it is a valid ``{"input": str, "output": str | list[str]}`` object, else raise.

    Wrong types raise ``ValueError`` (not ``TypeError``, hence the ``noqa: TRY004``): they are bad file content.
    """
    where = f"{path}, line {line_number}"
    if not isinstance(example, dict):
        kind = type(example).__name__
        raise ValueError(f"{where}: expected a JSON object with 'input' and 'output', got {kind}")  # noqa: TRY004
    missing = [key for key in ("input", "output") if key not in example]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(repr(key) for key in missing)}")
    if not isinstance(example["input"], str):
        raise ValueError(f"{where}: 'input' must be a string, got {type(example['input']).__name__}")  # noqa: TRY004
    output = example["output"]
    if isinstance(output, list):
        if not output:
            raise ValueError(f"{where}: 'output' is an empty list; it needs at least one answer string")
        for answer in output:
            if not isinstance(answer, str):
                kind = type(answer).__name__
                raise ValueError(f"{where}: 'output' list items must be strings, got {kind}")  # noqa: TRY004
    elif not isinstance(output, str):
        kind = type(output).__name__
        raise ValueError(f"{where}: 'output' must be a string or a list of strings, got {kind}")  # noqa: TRY004
    return example


def load_jsonl(path: str | os.PathLike[str], limit: int | None = None) -> list[dict[str, Any]]:
    """Read a JSON Lines benchmark file of ``{"input": str, "output": str | list[str]}`` objects.

    Blank lines are skipped; other keys of an object are kept as they are. With ``limit``, only the first ``limit``
    examples are read (and checked). Raises ``FileNotFoundError`` if ``path`` does not exist, and ``ValueError``
    naming the file and the 1-based line number for text that is not UTF-8, malformed JSON, a line that is not an
    object, a missing ``input`` or ``output`` key, or a value of the wrong type.
    """
    file_path = Path(path)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or >= 0, got {limit}")
    if not file_path.exists():
        raise FileNotFoundError(f"benchmark file not found: {file_path}")
    if not file_path.is_file():
        raise ValueError(f"benchmark path is not a file: {file_path}")
    examples: list[dict[str, Any]] = []
    if limit == 0:
        return examples
    with file_path.open("rb") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{file_path}, line {line_number}: not valid UTF-8 ({error})") from error
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{file_path}, line {line_number}: malformed JSON ({error})") from error
            examples.append(_check_example(example, file_path, line_number))
            if limit is not None and len(examples) >= limit:
                break
    return examples


def parse_eval_arg(value: str) -> tuple[str, str]:
    """Split a ``--eval NAME=PATH`` command-line value into ``(name, path)``.

    The split is at the first ``=``, so the path may itself contain ``=``; surrounding whitespace is stripped from
    both parts. Raises ``ValueError`` when there is no ``=`` or when the name or the path is empty.
    """
    if "=" not in value:
        raise ValueError(f"--eval expects NAME=PATH (e.g. mrpc=data/mrpc/test.jsonl), got {value!r}: no '='")
    name, path = (part.strip() for part in value.split("=", 1))
    if not name:
        raise ValueError(f"--eval expects NAME=PATH, got {value!r}: the name before '=' is empty")
    if not path:
        raise ValueError(f"--eval expects NAME=PATH, got {value!r}: the path after '=' is empty")
    return name, path


def sample_rows(rows: list[dict[str, Any]], size: int | None, seed: int) -> list[dict[str, Any]]:
    """A seeded random sample of ``size`` rows without replacement, in the sample's (shuffled) order.

    ``size=None`` or ``size >= len(rows)``: every row, shuffled with ``seed``. The same ``(rows, size, seed)`` always
    gives the same sample, and a smaller ``size`` gives a prefix of a larger one's sample (one shuffle, then a cut).
    Raises ``ValueError`` for a negative size.
    """
    import random

    if size is not None and size < 0:
        raise ValueError(f"sample size must be None or >= 0, got {size}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    if size is not None:
        order = order[:size]
    return [rows[i] for i in order]
