"""Fast tests of the offline benchmark world (tokenizer, tasks) and of the skills-LM build / cache / evaluation."""

import os

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig

from imsm_bench import pretrain
from imsm_bench.pretrain import (
    SKILLS_MODEL_CONFIG,
    TrainRecipe,
    encode_batch,
    evaluate_tasks,
    generate_answers,
    load_or_build_skills_model,
    skills_model_dir,
)
from imsm_bench.skills import (
    ALL_TASKS,
    CHARS,
    FACT_BASE,
    MIXTURE_TASKS,
    TARGET_TASK,
    VOCAB_SIZE,
    build_tokenizer,
    make_examples,
)

TINY_CONFIG = LlamaConfig(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=True,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
TINY_RECIPE = TrainRecipe(steps=5, batch_size=8, warmup_steps=2)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    model, tok = load_or_build_skills_model(
        str(tmp_path_factory.mktemp("cache")), seed=0, progress=False, config=TINY_CONFIG, recipe=TINY_RECIPE
    )
    return model, tok


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------
def test_tokenizer_special_tokens_and_vocab(tokenizer):
    assert len(tokenizer) == VOCAB_SIZE
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.padding_side == "left"
    ids = tokenizer(CHARS)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(CHARS) + 1  # one bos, one token per char, no eos
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == CHARS
    assert tokenizer("ab", add_special_tokens=False)["input_ids"] == ids[1 + CHARS.index("a") : 1 + CHARS.index("c")]


def test_tokenizer_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.padding_side == "left"
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 0)
    texts = [CHARS, "capital of Zorvia?Plemt", "add 1+2=3"]
    assert loaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    batch = loaded(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0][:2] == [0, 0] and batch["attention_mask"][0] == [0, 0, 1, 1, 1]


@pytest.mark.parametrize("task", ALL_TASKS)
def test_prompt_is_prefix_of_prompt_plus_answer(tokenizer, task):
    for ex in make_examples(task, 20, seed=3, split="train"):
        prompt_ids = tokenizer(ex["input"])["input_ids"]
        full_ids = tokenizer(ex["input"] + ex["output"])["input_ids"]
        assert full_ids[: len(prompt_ids)] == prompt_ids
        assert full_ids[len(prompt_ids) :] == tokenizer(ex["output"], add_special_tokens=False)["input_ids"]


def test_encode_batch_labels_only_answer_and_eos(tokenizer):
    batch = encode_batch(tokenizer, [("add 1+2=", "3"), ("reverse abc=", "cba")])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    labels = batch["labels"][0]
    kept = labels[labels != -100].tolist()
    assert kept == tokenizer("3", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    row = batch["input_ids"][0]
    assert row[0].item() == tokenizer.pad_token_id and row[-1].item() == tokenizer.eos_token_id  # left-padded
    assert batch["position_ids"][1].tolist() == list(range(batch["input_ids"].shape[1]))


# ---------------------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------------------
def test_task_names():
    assert TARGET_TASK not in MIXTURE_TASKS and len(MIXTURE_TASKS) >= 4
    assert len(FACT_BASE) == 40 and len(set(FACT_BASE.values())) == 40


@pytest.mark.parametrize("task", ALL_TASKS)
def test_make_examples_deterministic(task):
    a = make_examples(task, 50, seed=7, split="test")
    assert a == make_examples(task, 50, seed=7, split="test")
    assert a != make_examples(task, 50, seed=8, split="test")
    assert len(a) == 50 and all(set(ex) == {"input", "output"} and ex["output"] for ex in a)


@pytest.mark.parametrize("task", [t for t in ALL_TASKS if t != "recall"])
def test_splits_disjoint(task):
    train = {ex["input"] for ex in make_examples(task, 2000, seed=0, split="train")}
    test = {ex["input"] for ex in make_examples(task, 300, seed=1, split="test")}
    assert len(test) == 300  # distinct within a call
    assert not train & test


def test_recall_tests_the_memorised_base():
    test = make_examples("recall", 40, seed=0, split="test")
    assert {ex["input"] for ex in test} == {f"capital of {c}?" for c in FACT_BASE}
    assert all(FACT_BASE[ex["input"][len("capital of ") : -1]] == ex["output"] for ex in test)


def test_target_prompts_look_different():
    target = make_examples(TARGET_TASK, 20, seed=0, split="test")
    mixture_starts = {ex["input"][:3] for t in MIXTURE_TASKS for ex in make_examples(t, 20, seed=0, split="test")}
    assert not {ex["input"][:3] for ex in target} & mixture_starts


# ---------------------------------------------------------------------------------------------------------------
# Build + cache
# ---------------------------------------------------------------------------------------------------------------
def _sha256(path: str) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_the_default_skills_lm_is_the_shipped_one_and_nothing_is_trained(tmp_path, monkeypatch):
    """The default benchmark fine-tunes the model that ships with the package: no pretraining, no cache written."""
    monkeypatch.setattr(pretrain, "train_skills_model", lambda *a, **k: pytest.fail("pretrained instead of loading"))
    info = pretrain.shipped_model_info()
    assert info is not None and info["key"] == pretrain.skills_model_key(
        SKILLS_MODEL_CONFIG, 0, pretrain.DEFAULT_RECIPE
    )
    assert _sha256(os.path.join(pretrain.SHIPPED_MODEL_DIR, "model.safetensors")) == info["model_sha256"]
    model, tok = load_or_build_skills_model(str(tmp_path), progress=False)
    assert os.listdir(tmp_path) == []
    assert sum(p.numel() for p in model.parameters()) == 1_062_400 and not model.training
    assert tok.padding_side == "left" and tok.pad_token_id == 0


def test_a_changed_world_is_built_instead_of_loading_the_shipped_model(tmp_path, monkeypatch):
    """The shipped copy is used only under its own key: another key (a changed skills world, recipe or seed) builds."""
    monkeypatch.setattr(pretrain, "SKILLS_MODEL_CONFIG", TINY_CONFIG)
    monkeypatch.setattr(pretrain, "DEFAULT_RECIPE", TINY_RECIPE)
    monkeypatch.setattr(pretrain, "shipped_model_info", lambda: {"key": "not-this-world"})
    model, _ = load_or_build_skills_model(str(tmp_path), progress=False)
    assert model.config.hidden_size == TINY_CONFIG.hidden_size
    assert os.listdir(tmp_path) == [os.path.basename(skills_model_dir(str(tmp_path), 0, TINY_CONFIG, TINY_RECIPE))]


@pytest.mark.slow  # ~4.5 min: the full pretraining, on one thread
def test_rebuilding_on_this_machine_gives_the_shipped_weights(tmp_path):
    """``imsm-bench --rebuild`` retrains the skills LM; on a CPU of the same float kernels as the machine that wrote
    the shipped copy it is the same model bit for bit (other CPUs may build another model: why the model ships)."""
    shipped_kernels = pretrain.shipped_model_info()["float_kernels"]
    here = pretrain.float_kernels()
    # the shipped record names the CPU's vendor, not its model name: the model name is compared where recorded
    compared = ("torch", "cpu_capability", "cpu_vendor") + (("cpu_model",) if "cpu_model" in shipped_kernels else ())
    differing = [k for k in compared if here[k] != shipped_kernels[k]]
    if differing:
        pytest.skip(f"float kernels differ from the shipped build's in {differing} ({here} vs {shipped_kernels})")
    model, _ = load_or_build_skills_model(str(tmp_path), progress=False, rebuild=True)
    shipped, _ = load_or_build_skills_model(progress=False)
    for (name, built), (_, reference) in zip(model.state_dict().items(), shipped.state_dict().items(), strict=True):
        assert torch.equal(built, reference), name


def test_cache_is_reused(tmp_path, monkeypatch):
    calls = []
    real_train = pretrain.train_skills_model

    def counting_train(*args, **kwargs):
        calls.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(pretrain, "train_skills_model", counting_train)
    kwargs = {"seed": 0, "progress": False, "config": TINY_CONFIG, "recipe": TINY_RECIPE}
    model1, tok1 = load_or_build_skills_model(str(tmp_path), **kwargs)
    folder = skills_model_dir(str(tmp_path), 0, TINY_CONFIG, TINY_RECIPE)
    assert os.path.isfile(os.path.join(folder, "config.json"))
    assert os.listdir(tmp_path) == [os.path.basename(folder)]  # no leftover temp folder
    model2, tok2 = load_or_build_skills_model(str(tmp_path), **kwargs)
    assert len(calls) == 1
    for (n1, p1), (n2, p2) in zip(model1.state_dict().items(), model2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert tok2.padding_side == "left" and tok2(CHARS)["input_ids"] == tok1(CHARS)["input_ids"]
    # the environment variable picks the root when cache_dir is not given
    monkeypatch.setenv(pretrain.CACHE_ENV_VAR, str(tmp_path))
    load_or_build_skills_model(None, **kwargs)
    assert len(calls) == 1


def test_build_runs_on_one_thread_and_restores_the_callers_threads(tmp_path, monkeypatch):
    """The trained weights depend on the thread count: every machine builds on one thread to get the same model."""
    seen = []
    real_train = pretrain.train_skills_model

    def recording_train(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_train(*args, **kwargs)

    monkeypatch.setattr(pretrain, "train_skills_model", recording_train)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        load_or_build_skills_model(str(tmp_path), seed=0, progress=False, config=TINY_CONFIG, recipe=TINY_RECIPE)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_build_is_deterministic_and_keyed(tiny_model, tmp_path):
    model, _ = tiny_model
    again, _ = load_or_build_skills_model(
        str(tmp_path), seed=0, progress=False, config=TINY_CONFIG, recipe=TINY_RECIPE
    )
    for p1, p2 in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(p1, p2)
    base = skills_model_dir("/x", 0, SKILLS_MODEL_CONFIG, TINY_RECIPE)
    assert skills_model_dir("/x", 1, SKILLS_MODEL_CONFIG, TINY_RECIPE) != base
    assert skills_model_dir("/x", 0, TINY_CONFIG, TINY_RECIPE) != base
    assert skills_model_dir("/x", 0, SKILLS_MODEL_CONFIG, TrainRecipe(steps=6)) != base


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
class OracleModel(torch.nn.Module):
    """Stands in for a causal LM: ``generate`` looks the prompt up in ``answers`` and emits it, then eos + padding."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.answers = answers

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, eos_token_id, pad_token_id):
        assert not do_sample and input_ids.shape == attention_mask.shape
        assert (attention_mask[:, -1] == 1).all()  # left padding
        rows = []
        for row in input_ids.tolist():
            prompt = self.tokenizer.decode(row, skip_special_tokens=True)
            new = self.tokenizer(self.answers[prompt], add_special_tokens=False)["input_ids"] + [eos_token_id]
            new = (new + [pad_token_id] * max_new_tokens)[:max_new_tokens]
            rows.append(row + new)
        return torch.tensor(rows)


def test_evaluate_tasks_exact_match(tokenizer):
    tasks = {t: make_examples(t, 30, seed=0, split="test") for t in ALL_TASKS}
    gold = {ex["input"]: ex["output"] for exs in tasks.values() for ex in exs}
    scores = evaluate_tasks(OracleModel(tokenizer, gold), tokenizer, tasks, batch_size=7)
    assert scores == {t: 100.0 for t in ALL_TASKS}
    half_wrong = dict(gold)
    for ex in tasks["add"][:15]:
        half_wrong[ex["input"]] = ex["output"] + "0"  # a longer answer is wrong, not a prefix match
    for ex in tasks["reverse"]:
        half_wrong[ex["input"]] = ""
    scores = evaluate_tasks(OracleModel(tokenizer, half_wrong), tokenizer, tasks, batch_size=7)
    assert scores["add"] == 50.0 and scores["reverse"] == 0.0 and scores["recall"] == 100.0


def test_batched_generation_matches_one_by_one(tiny_model):
    model, tok = tiny_model
    prompts = [ex["input"] for t in ALL_TASKS for ex in make_examples(t, 2, seed=0, split="test")]
    batched = generate_answers(model, tok, prompts, batch_size=len(prompts), max_new_tokens=6)
    single = generate_answers(model, tok, prompts, batch_size=1, max_new_tokens=6)
    assert batched == single
    scores = evaluate_tasks(model, tok, {"add": make_examples("add", 8, 0, "test")})
    assert 0.0 <= scores["add"] <= 100.0
