"""A small synthetic world for the offline forgetting benchmark: a character tokenizer and generated tasks.

The MIXTURE tasks are what the small "pretrained" skills LM (:mod:`imsm_bench.pretrain`) learns from scratch; the
TARGET task is absent from that mixture and is what the benchmark later fine-tunes on with LoRA / IMSM.

Every task is a generator of ``(prompt, answer)`` pairs. Prompts are short, single-line and name their task; the
answer is appended to the prompt directly (no separator), and training appends the eos token after the answer:

=========== ============================== ========== ========================================================
task        prompt                          answer     train/test split
=========== ============================== ========== ========================================================
recall      ``capital of Rulaia?``          ``Mev``    none: both splits draw from the same memorised fact base
add         ``add 12+7=``                   ``19``     disjoint (a, b) pairs
reverse     ``reverse kobe=``               ``ebok``   disjoint words
compare     ``is 17>9?``                    ``yes``    disjoint (a, b) pairs
ends        ``<kobe> ends:``                ``ke``     disjoint words  (TARGET task, not in the mixture)
=========== ============================== ========== ========================================================

Split membership is a fixed property of an example's content (a crc32 of its key), independent of any seed, so
``make_examples(..., split="train")`` and ``make_examples(..., split="test")`` never overlap whatever their seeds.
"""

import random
import string
import zlib
from collections.abc import Callable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0, 1, 2, 3
CHARS: str = "".join(chr(c) for c in range(32, 127))  # the 95 printable ASCII characters, space included
VOCAB_SIZE: int = len(SPECIAL_TOKENS) + len(CHARS)  # 99

WORLD_SEED: int = 20250101  # fixes the fact base; changing it changes the world (and the pretrained model)
NUM_FACTS: int = 40
TEST_FRACTION_PER_MILLE: int = 200  # 20% of the example keys of add / reverse / compare / ends are test-only

MIXTURE_TASKS: tuple[str, ...] = ("recall", "add", "reverse", "compare")
TARGET_TASK: str = "ends"  # first + last letter of a word; learned by LoRA in ~100-200 steps
ALL_TASKS: tuple[str, ...] = MIXTURE_TASKS + (TARGET_TASK,)
EVAL_TASKS: tuple[str, ...] = (TARGET_TASK,) + MIXTURE_TASKS  # the benchmark's eval sets, target first
VALIDATION_SEED: int = 2  # seed of the validation sets (the test sets use seed 1, the training examples seed 0)
SPLITS: tuple[str, ...] = ("train", "test")


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------
def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the fixed character-level tokenizer: one token per printable ASCII character, plus 4 special tokens.

    Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, then ``chr(32) .. chr(126)`` as ids 4 .. 98.

    What ``tokenizer(text)`` adds: exactly one ``<bos>`` in front (a ``TemplateProcessing`` post-processor), never an
    eos. Because tokens are single characters, ``tokenizer(prompt).input_ids`` is a prefix of
    ``tokenizer(prompt + answer).input_ids``; the training sequence is ``<bos> prompt answer <eos>`` with the eos id
    appended by the caller. Pass ``add_special_tokens=False`` to get the bare characters. ``padding_side`` is
    "left" (for batched generation). Decoding joins characters back without spaces between them.

    Returns:
        A ``PreTrainedTokenizerFast`` that round-trips ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    backend.decoder = decoders.Fuse()  # "".join(tokens)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
    )
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=64,
    )


# ---------------------------------------------------------------------------------------------------------------
# The fact base
# ---------------------------------------------------------------------------------------------------------------
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _syllable(rng: random.Random) -> str:
    return rng.choice(_CONSONANTS) + rng.choice(_VOWELS)


def build_fact_base(num_facts: int = NUM_FACTS, seed: int = WORLD_SEED) -> dict[str, str]:
    """Return the synthetic fact base ``{country: capital}`` (e.g. ``"Rulaia" -> "Mev"``), fixed by ``seed``.

    Countries are 2 syllables + an ending ("ia", "or", "an", "ek"); capitals are 1-2 syllables + a consonant.
    All names are distinct and capitalised.
    """
    rng = random.Random(seed)
    facts: dict[str, str] = {}
    used: set[str] = set()
    while len(facts) < num_facts:
        country = (_syllable(rng) + _syllable(rng) + rng.choice(("ia", "or", "an", "ek"))).capitalize()
        capital = ("".join(_syllable(rng) for _ in range(rng.randint(1, 2))) + rng.choice(_CONSONANTS)).capitalize()
        if country in used or capital in used:
            continue
        used.update((country, capital))
        facts[country] = capital
    return facts


FACT_BASE: dict[str, str] = build_fact_base()


# ---------------------------------------------------------------------------------------------------------------
# Task generators
# ---------------------------------------------------------------------------------------------------------------
def _split_of(key: str) -> str:
    """The split an example key belongs to, fixed by its content: ``"test"`` for ~20% of keys, else ``"train"``."""
    return "test" if zlib.crc32(key.encode()) % 1000 < TEST_FRACTION_PER_MILLE else "train"


def _random_word(rng: random.Random, min_len: int = 3, max_len: int = 6) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(min_len, max_len)))


def _gen_recall(rng: random.Random) -> tuple[str, str, str]:
    country = rng.choice(list(FACT_BASE))
    return f"capital of {country}?", FACT_BASE[country], ""  # empty key: recall has no split


def _gen_add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"add {a}+{b}=", str(a + b), f"add:{a},{b}"


def _gen_reverse(rng: random.Random) -> tuple[str, str, str]:
    word = _random_word(rng)
    return f"reverse {word}=", word[::-1], f"word:{word}"


def _gen_compare(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"is {a}>{b}?", "yes" if a > b else "no", f"compare:{a},{b}"


def _gen_ends(rng: random.Random) -> tuple[str, str, str]:
    word = _random_word(rng)
    return f"<{word}> ends:", word[0] + word[-1], f"word:{word}"


# Each generator returns (prompt, answer, split key); an empty split key means "belongs to both splits".
TASK_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "recall": _gen_recall,
    "add": _gen_add,
    "reverse": _gen_reverse,
    "compare": _gen_compare,
    "ends": _gen_ends,
}


def sample_example(task: str, rng: random.Random, split: str) -> tuple[str, str]:
    """Draw one ``(prompt, answer)`` pair of ``task`` from ``split`` (rejection sampling on the split key)."""
    if task not in TASK_GENERATORS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASK_GENERATORS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    while True:
        prompt, answer, key = TASK_GENERATORS[task](rng)
        if not key or _split_of(key) == split:
            return prompt, answer


def make_examples(task: str, n: int, seed: int, split: str) -> list[dict]:
    """Return ``n`` examples ``{"input": prompt, "output": answer}`` of ``task`` (the paper's JSONL row format).

    Deterministic for ``(task, n, seed, split)``. Examples within one call are distinct where the split's pool
    allows it (recall cycles through the ``NUM_FACTS`` facts in a seeded order, so ``n > NUM_FACTS`` repeats facts).
    Train and test never share an example for add / reverse / compare / ends; recall has no held-out facts (it
    tests the memorised base), so its two splits draw from the same facts.
    """
    if task == "recall":
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
        countries = list(FACT_BASE)
        random.Random(f"{seed}:{split}:recall").shuffle(countries)
        return [
            {"input": f"capital of {c}?", "output": FACT_BASE[c]}
            for c in (countries[i % len(countries)] for i in range(n))
        ]
    rng = random.Random(f"{seed}:{split}:{task}")
    examples: list[dict] = []
    seen: set[str] = set()
    attempts = 0
    while len(examples) < n:
        prompt, answer = sample_example(task, rng, split)
        attempts += 1
        if prompt in seen and attempts < 50 * n:  # give up on distinctness only if the pool is nearly exhausted
            continue
        seen.add(prompt)
        examples.append({"input": prompt, "output": answer})
    return examples


def validation_sets(n: int, exclude: list[dict]) -> dict[str, list[dict]]:
    """``n`` validation examples per task of :data:`EVAL_TASKS`, for choosing settings without the test sets.

    Seeded draws (:data:`VALIDATION_SEED`) from the TRAIN split, so no validation example is a test example; prompts
    of ``exclude`` (the run's training examples) are left out, so none is a training example either. The mixture
    tasks' train split is what the skills LM was pretrained on, so their validation items may be ones it saw (as
    recall's test items are: recall has no split). Raises ``ValueError`` when the pool cannot give ``n`` examples.
    """
    excluded = {row["input"] for row in exclude}
    sets = {}
    for task in EVAL_TASKS:
        if task == "recall":  # no split, no training examples of it: the memorised facts, as its test set
            rows = make_examples(task, n, VALIDATION_SEED, "train")
        else:
            pool = make_examples(task, 2 * n + len(excluded), VALIDATION_SEED, "train")
            rows = [row for row in pool if row["input"] not in excluded][:n]
        if len(rows) < n:
            raise ValueError(f"The {task!r} train split has fewer than {n} examples outside the training set.")
        sets[task] = rows
    return sets


GENERAL_PROMPTS_PER_TASK: int = 16


def general_prompts(per_task: int = GENERAL_PROMPTS_PER_TASK, tasks: tuple[str, ...] = MIXTURE_TASKS) -> list[str]:
    """``per_task`` prompts of each of ``tasks`` (default: the mixture's; train split, seed 0, no answers): the "general prompts" a user
    of the skills LM would have, used as data anchors. The skills LM was pretrained on answers only (its prompts
    were never a target), so it samples nothing like them from BOS: self anchors cannot stand for them. Recall's
    prompts ask the memorised facts, some of which its test set asks too (recall has no split)."""
    return [row["input"] for task in tasks for row in make_examples(task, per_task, 0, "train")]
