"""The tasks of ``imsm-bench --protocol library``: three target tasks of different forms, and the prompts that must
stay with the base model.

Every task gives training rows and held-out test rows (``{"input", "output"}``) whose prompt templates are disjoint:
the test prompts are phrased in ways no training row uses, so a router has to recognise the task, not the template.

* ``tag`` (:func:`tag_rows`): the real protocol's task (``imsm_bench.real``: a word's category named by a nonce
  label, its categories and its train/test word split), asked with several training templates and several others at
  test time.
* ``extract`` (:func:`extract_rows`): the fields of a short generated sentence in a fixed ``key=value`` form
  (``"Maria bought 3 lamps in Oslo on Friday."`` -> ``"name=Maria; item=lamps; count=3; city=Oslo; day=Friday"``),
  the training and test sentences written in disjoint sentence forms too.
* ``cola`` (:func:`cola_rows`): grammatical acceptability (``yes`` / ``no``) of the sentences of the paper's CoLA
  set (``<DIR>/cola/train.jsonl`` for training, ``<DIR>/cola/test.jsonl`` for testing; the set is read from the
  folder given at run time, never shipped), re-templated, with both labels drawn equally often.

:data:`NEAR_PROMPTS`: per task, general prompts written here that share the task's surface (its kind of words or
sentences) but ask something else; :data:`imsm_bench.real.CHAT_PROMPTS` are the everyday ones. Neither is ever
trained on.
"""

from __future__ import annotations

import json
import os
import random
import re
import string
from typing import Any

from .real import TAG_CATEGORIES

TASKS: tuple[str, ...] = ("tag", "extract", "cola")
"""The target tasks, in the order of the router's choices (after the base model)."""

# ------------------------------------------------------------------------------------------------------------------
# tag
# ------------------------------------------------------------------------------------------------------------------
TAG_TRAIN_TEMPLATES: tuple[str, ...] = ("Tag: {word}", "Tag this word: {word}", "Which tag does {word} get?")
TAG_TEST_TEMPLATES: tuple[str, ...] = (
    "What is the tag of the word '{word}'?",
    "Give me the tag for {word}.",
    "{word} -- its tag, please.",
)


def tag_rows(n: int, split: str, seed: int) -> list[dict[str, str]]:
    """``n`` rows of the ``tag`` task drawn with ``seed``: the real protocol's words and labels (every 4th word of a
    category is a test word), training words drawn with replacement in a random training template, test words each
    once (in a seeded order) before any repeats, in the test templates in turn."""
    _check_split(split)
    test = split == "test"
    pool = [(w, label) for label, words in TAG_CATEGORIES.items() for i, w in enumerate(words) if (i % 4 == 3) == test]
    rng = random.Random(seed)
    if not test:
        picked = [(rng.choice(pool), rng.choice(TAG_TRAIN_TEMPLATES)) for _ in range(n)]
    else:
        words = _cycle(pool, n, rng)
        picked = [(wl, TAG_TEST_TEMPLATES[i % len(TAG_TEST_TEMPLATES)]) for i, wl in enumerate(words)]
    return [{"input": template.format(word=w), "output": label} for (w, label), template in picked]


# ------------------------------------------------------------------------------------------------------------------
# extract
# ------------------------------------------------------------------------------------------------------------------
EXTRACT_NAMES = ("Maria", "Tom", "Aisha", "Kenji", "Lena", "Omar", "Sofia", "Ivan", "Priya", "Lucas", "Chloe",
                 "Mateo", "Hana", "Noah", "Zara", "Felix")  # fmt: skip
EXTRACT_ITEMS = ("apples", "books", "chairs", "lamps", "tickets", "candles", "shirts", "bottles", "pencils", "plates",
                 "towels", "batteries", "cups", "maps", "kites", "boxes")  # fmt: skip
EXTRACT_CITIES = ("Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Dublin", "Denver", "Madrid", "Seoul", "Nairobi",
                  "Lisbon", "Toronto", "Vienna", "Quito", "Perth", "Milan")  # fmt: skip
EXTRACT_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
EXTRACT_FIELDS = ("name", "item", "count", "city", "day")
EXTRACT_ANSWER = "name={name}; item={item}; count={count}; city={city}; day={day}"

EXTRACT_TRAIN_SENTENCES = (
    "{name} bought {count} {item} in {city} on {day}.",
    "On {day}, {name} sold {count} {item} in {city}.",
    "{name} ordered {count} {item} from {city} on {day}.",
)
EXTRACT_TEST_SENTENCES = (
    "In {city} on {day}, {name} picked up {count} {item}.",
    "{count} {item} were delivered to {name} in {city} last {day}.",
    "It was {day} when {name} found {count} {item} at a market in {city}.",
)
EXTRACT_TRAIN_TEMPLATES = (
    "Extract name, item, count, city and day: {sentence}",
    "Fields of this sentence (name, item, count, city, day): {sentence}",
    "{sentence}\nList the fields name, item, count, city, day.",
)
EXTRACT_TEST_TEMPLATES = (
    "Parse the sentence below into key=value pairs for name, item, count, city and day.\n{sentence}",
    "Sentence: {sentence}\nWhat are its name, item, count, city and day?",
    "Turn this into a record with the keys name, item, count, city, day: {sentence}",
)


def extract_rows(n: int, split: str, seed: int) -> list[dict[str, str]]:
    """``n`` rows of the ``extract`` task drawn with ``seed``: a random sentence (name, count 2-19, item, city, day)
    in a sentence form of the split, in an instruction template of the split; the answer is
    :data:`EXTRACT_ANSWER` filled in. Test rows take the test forms and templates in turn."""
    _check_split(split)
    test = split == "test"
    forms = EXTRACT_TEST_SENTENCES if test else EXTRACT_TRAIN_SENTENCES
    templates = EXTRACT_TEST_TEMPLATES if test else EXTRACT_TRAIN_TEMPLATES
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        fields = {"name": rng.choice(EXTRACT_NAMES), "item": rng.choice(EXTRACT_ITEMS), "count": rng.randint(2, 19),
                  "city": rng.choice(EXTRACT_CITIES), "day": rng.choice(EXTRACT_DAYS)}  # fmt: skip
        if test:
            form, template = forms[i % len(forms)], templates[(i // len(forms)) % len(templates)]
        else:
            form, template = rng.choice(forms), rng.choice(templates)
        sentence = form.format(**fields)
        rows.append({"input": template.format(sentence=sentence), "output": EXTRACT_ANSWER.format(**fields)})
    return rows


# ------------------------------------------------------------------------------------------------------------------
# cola
# ------------------------------------------------------------------------------------------------------------------
COLA_TRAIN_TEMPLATES = (
    "Is this sentence grammatical? Answer yes or no.\n{sentence}",
    "Grammatically acceptable (yes/no): {sentence}",
    "Given a sentence, judge the grammatical acceptability of the sentence with yes or no.\nSentence:{sentence}"
    "\nOutput:",
)
COLA_TEST_TEMPLATES = (
    "Would a careful English speaker accept this sentence? Reply yes or no.\n{sentence}",
    "{sentence}\nIs the sentence above well-formed English? yes or no",
    'Check the grammar of "{sentence}" and say yes if it is acceptable, no if it is not.',
)
COLA_MAX_CHARS = 100
"""CoLA sentences longer than this are left out (the median sentence has 37 characters)."""
_COLA_PROMPT = re.compile(r"\s*Given a sentence, judge the grammatical acceptability of the sentence with yes or no\."
                          r"\nSentence:(?P<sentence>.*)\nOutput:\s*", re.S)  # fmt: skip


def cola_sentences(folder: str | os.PathLike[str], split: str) -> list[tuple[str, str]]:
    """``(sentence, "yes" | "no")`` of the paper's prompt-formatted CoLA file ``<folder>/cola/<split>.jsonl``
    (sentences of at most :data:`COLA_MAX_CHARS` characters). Raises ``ValueError`` naming the file, the line and
    the fix for a missing file or a line of another form."""
    _check_split(split)
    path = os.path.join(os.fspath(folder), "cola", f"{split}.jsonl")
    if not os.path.isfile(path):
        raise ValueError(
            f"The cola task reads the paper's CoLA set from {path!r}, which does not exist. Pass --paper-sets DIR, "
            "the folder that holds cola/train.jsonl and cola/test.jsonl (the paper's prompt-formatted sets), or "
            "leave cola out: --tasks tag,extract."
        )
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                match = _COLA_PROMPT.fullmatch(row["input"])
                label = str(row["output"]).strip().lower()
            except (json.JSONDecodeError, KeyError, TypeError):
                match, label = None, None
            if match is None or label not in ("yes", "no"):
                raise ValueError(
                    f"{path}, line {number}: not a row of the paper's CoLA set ({line.strip()[:120]!r}). Each line "
                    "must be JSON {'input': 'Given a sentence, judge the grammatical acceptability of the sentence "
                    "with yes or no.\\nSentence:...\\nOutput:', 'output': 'yes' or 'no'}."
                )
            sentence = match.group("sentence").strip()
            if len(sentence) <= COLA_MAX_CHARS:
                pairs.append((sentence, label))
    return pairs


def cola_rows(folder: str | os.PathLike[str], n: int, split: str, seed: int) -> list[dict[str, str]]:
    """``n`` rows of the ``cola`` task drawn with ``seed``, half ``yes`` and half ``no`` (alternating): training rows
    from ``cola/train.jsonl`` in a random training template (drawn with replacement), test rows from
    ``cola/test.jsonl`` (without the sentences that are also training sentences; each sentence at most once while
    any is left) in the test templates in turn."""
    _check_split(split)
    test = split == "test"
    pairs = cola_sentences(folder, split)
    if test:
        seen = {s for s, _ in cola_sentences(folder, "train")}
        pairs = [(s, label) for s, label in pairs if s not in seen]
    by_label = {label: [p for p in pairs if p[1] == label] for label in ("yes", "no")}
    empty = [label for label, rows in by_label.items() if not rows]
    if empty:
        raise ValueError(
            f"cola/{split}.jsonl in {os.fspath(folder)!r} has no usable {empty[0]!r} sentence (of at most "
            f"{COLA_MAX_CHARS} characters): the task needs both labels."
        )
    rng = random.Random(seed)
    if test:
        draws = {label: _cycle(rows, (n + 1) // 2, rng) for label, rows in by_label.items()}
        picked = [draws["yes" if i % 2 == 0 else "no"][i // 2] for i in range(n)]
        templates = [COLA_TEST_TEMPLATES[i % len(COLA_TEST_TEMPLATES)] for i in range(n)]
    else:
        picked = [rng.choice(by_label["yes" if i % 2 == 0 else "no"]) for i in range(n)]
        templates = [rng.choice(COLA_TRAIN_TEMPLATES) for _ in range(n)]
    return [{"input": t.format(sentence=s), "output": label} for (s, label), t in zip(picked, templates, strict=True)]


# ------------------------------------------------------------------------------------------------------------------
# Near-surface general prompts
# ------------------------------------------------------------------------------------------------------------------
NEAR_PROMPTS: dict[str, tuple[str, ...]] = {
    "tag": (
        "Is a zebra a mammal?",
        "What color is a ripe banana?",
        "What does a carpenter do all day?",
        "Is a tomato a fruit or a vegetable?",
        "Why can't penguins fly?",
        "When would someone wear a tuxedo?",
        "What do giraffes eat?",
        "Name three animals that live in the ocean.",
        "How do I keep lettuce fresh?",
        "What is the difference between a coat and a jacket?",
        "What skills does a nurse need?",
        "Write one sentence about a sleepy fox.",
        "How long does it take to grow a pumpkin?",
        "Is a dolphin a fish?",
        "What does a librarian do?",
        "Which is warmer, a sweater or a shirt?",
    ),
    "extract": (
        "Rewrite this sentence politely: Tom bought 4 lamps in Oslo on Friday.",
        "Translate into French: Maria ordered 6 books from Lima on Tuesday.",
        "Is this sentence in the past tense? Aisha sold 12 candles in Cairo on Sunday.",
        "Write a question about this sentence: Kenji bought 3 kites in Tokyo on Monday.",
        "Summarize in five words: On Wednesday, Lena sold 9 shirts in Dublin.",
        "How many words are in this sentence: Omar ordered 2 maps from Quito on Saturday.",
        "Make this sentence sound exciting: Sofia bought 15 cups in Vienna on Thursday.",
        "What might Ivan do with the 8 towels he bought in Perth on Friday?",
        "Correct the spelling: Priya boght 5 plates in Lisbon on Tusday.",
        "Continue the story: Lucas bought 7 tickets in Madrid on Sunday.",
        "Is Denver a big city?",
        "What day comes after Thursday?",
        "Why would someone buy 20 batteries at once?",
        "Turn this into a news headline: Chloe sold 11 bottles in Seoul on Monday.",
        "Who is the subject of this sentence: Mateo ordered 4 chairs from Milan on Tuesday?",
        "Write a thank-you note to Hana for the 6 pencils she bought in Toronto.",
    ),
    "cola": (
        "Translate this sentence into Spanish: The children played in the garden all afternoon.",
        "What is the subject of this sentence: The old man fed the pigeons.",
        "Rewrite this sentence in the passive voice: The dog chased the ball.",
        "Explain what this sentence means: Day by day the weather gets colder.",
        "Make this sentence shorter: Bill walked slowly all the way to the station in the rain.",
        "What is the main verb in this sentence: She sang a song to the baby.",
        "Write a sentence using the word 'although'.",
        "What is an adjective? Give an example sentence.",
        "Continue this sentence: The more we study, the more",
        "Is this sentence a question or a statement: John left early.",
        "Turn this sentence into a question: The train arrives at noon.",
        "What tense is this sentence in: We will visit Rome next year.",
        "Paraphrase this sentence: The cat that the dog chased ran up a tree.",
        "Count the nouns in this sentence: The teacher gave the students a book.",
        "What does the word 'murky' mean?",
        "Write a sentence that contains a relative clause.",
    ),
}
"""Per task, general prompts on the task's surface that ask something else (written for this benchmark)."""


def template_fragments(template: str) -> list[str]:
    """The fixed text of a prompt template: its parts between ``{placeholders}``, stripped, non-empty."""
    parts = [literal.strip() for literal, _, _, _ in string.Formatter().parse(template)]
    return [p for p in parts if p]


def task_rows(
    task: str, n: int, split: str, seed: int, paper_sets: str | os.PathLike[str] | None = None
) -> list[dict[str, Any]]:
    """``n`` rows of ``task`` (one of :data:`TASKS`) of ``split`` drawn with ``seed``; ``paper_sets``: the folder of
    the paper's sets (needed by ``cola`` only)."""
    if task == "tag":
        return tag_rows(n, split, seed)
    if task == "extract":
        return extract_rows(n, split, seed)
    if task == "cola":
        if paper_sets is None:
            raise ValueError(
                "The cola task reads the paper's CoLA set at run time: pass --paper-sets DIR (the folder holding "
                "cola/train.jsonl and cola/test.jsonl; default $IMSM_BENCHMARKS_DIR), or leave cola out: "
                "--tasks tag,extract."
            )
        return cola_rows(paper_sets, n, split, seed)
    raise ValueError(f"Unknown task {task!r}; the library's tasks are {', '.join(TASKS)}.")


TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "tag": TAG_TRAIN_TEMPLATES,
    "extract": EXTRACT_TRAIN_TEMPLATES + EXTRACT_TRAIN_SENTENCES,
    "cola": COLA_TRAIN_TEMPLATES,
}
TEST_TEMPLATES: dict[str, tuple[str, ...]] = {
    "tag": TAG_TEST_TEMPLATES,
    "extract": EXTRACT_TEST_TEMPLATES + EXTRACT_TEST_SENTENCES,
    "cola": COLA_TEST_TEMPLATES,
}
"""Per task, the prompt templates (for ``extract``, also the sentence forms) of each split."""


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _cycle(pool: list[Any], n: int, rng: random.Random) -> list[Any]:
    """``n`` items of ``pool``: seeded permutations of it one after another (each item once before any repeats)."""
    picked: list[Any] = []
    while len(picked) < n:
        order = pool[:]
        rng.shuffle(order)
        picked += order
    return picked[:n]
