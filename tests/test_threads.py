"""One IMSM model shared by several threads: every concurrent call gives exactly what it gives alone; the frozen
view is per thread, ``disable_adapter()`` model-wide (as in peft).

Each case runs a set of different calls (other batch sizes, prompt lengths, padding) one by one for the reference,
then all of them several times at once from a thread pool, and compares bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import VOCAB, adapter_config, batch, perturb_adapter, tiny_model
from peft import get_peft_model
from transformers import LogitsProcessor, LogitsProcessorList

from peft_imsm import IMSMConfig

THREADS = 4
REPEATS = 3


class GumbelSampler(LogitsProcessor):
    """Sampling with a per-call generator: Gumbel noise from its own ``torch.Generator`` + greedy argmax is an exact
    sample from ``softmax(scores)`` (transformers' ``do_sample=True`` draws from the process-wide RNG instead)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        uniform = torch.rand(scores.shape, generator=self.generator).clamp_(1e-9, 1 - 1e-9)
        return scores.float() - torch.log(-torch.log(uniform))


def shared_model(stacked: bool = True, kind: str = "lora"):
    model = get_peft_model(
        tiny_model("llama"), IMSMConfig(adapter_config=adapter_config(kind, identity=False), gate_dropout=0.0)
    )
    perturb_adapter(model, scale=0.5)
    with torch.no_grad():
        for param in model.base_model.gate.parameters():
            param.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    model.base_model.stacked_views = stacked
    model.eval()
    return model


def prompts(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch whose size and length depend on ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    rows, length = 1 + seed % 3, 4 + seed % 5
    ids = torch.randint(3, VOCAB, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    for row in range(1, rows):
        mask[row, :row] = 0
        ids[row, :row] = 0
    return ids, mask


def run_concurrently(jobs: list[Callable[[], torch.Tensor]]) -> None:
    """Run every job alone, then all of them ``REPEATS`` times from ``THREADS`` threads; results must be equal."""
    alone = [job() for job in jobs]
    with ThreadPoolExecutor(THREADS) as pool:
        futures = [(i, pool.submit(jobs[i])) for _ in range(REPEATS) for i in range(len(jobs))]
        for i, future in futures:
            got = future.result()
            assert got.shape == alone[i].shape, f"call {i}: shape {tuple(got.shape)} != {tuple(alone[i].shape)}"
            assert torch.equal(got, alone[i]), f"call {i} gave another result under threads"


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "two_passes"])
def test_concurrent_no_grad_forwards(stacked):
    model = shared_model(stacked)

    def job(seed: int) -> Callable[[], torch.Tensor]:
        ids, mask = prompts(seed)

        def run() -> torch.Tensor:
            with torch.no_grad():
                return model(input_ids=ids, attention_mask=mask).logits

        return run

    run_concurrently([job(seed) for seed in range(6)])


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "two_passes"])
@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
def test_concurrent_generate(stacked, sampling):
    model = shared_model(stacked)

    def job(seed: int) -> Callable[[], torch.Tensor]:
        ids, mask = prompts(seed)

        def run() -> torch.Tensor:
            processors = LogitsProcessorList([GumbelSampler(seed)]) if sampling else None
            with torch.no_grad():
                return model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None,
                    pad_token_id=0, logits_processor=processors,
                )  # fmt: skip

        return run

    run_concurrently([job(seed) for seed in range(6)])


def test_concurrent_generate_with_adapters_that_run_two_passes():
    model = shared_model(kind="ia3")
    assert not model.base_model.supports_stacked_views

    def job(seed: int) -> Callable[[], torch.Tensor]:
        ids, mask = prompts(seed)
        return lambda: model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0
        )

    run_concurrently([job(seed) for seed in range(4)])


def test_training_forward_in_one_thread_and_generate_in_others():
    """A training forward (autograd, labels, two passes) beside generate() calls (no autograd, one doubled batch).

    The model is in training mode throughout (dropout 0), as in a server that evaluates while it trains.
    """
    model = shared_model()
    model.train()
    ids, mask = prompts(5)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    trainable = [p for p in model.parameters() if p.requires_grad]

    def train_step() -> torch.Tensor:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        grads = torch.autograd.grad(loss, trainable)
        return torch.cat([loss.detach().reshape(1)] + [g.flatten() for g in grads])

    def generate_job(seed: int) -> Callable[[], torch.Tensor]:
        p_ids, p_mask = prompts(seed)

        def run() -> torch.Tensor:
            with torch.no_grad():
                return model.generate(
                    input_ids=p_ids, attention_mask=p_mask, max_new_tokens=5, do_sample=False, eos_token_id=None,
                    pad_token_id=0,
                )  # fmt: skip

        return run

    run_concurrently([train_step, generate_job(1), generate_job(2), train_step, generate_job(4)])


def test_frozen_view_of_one_thread_does_not_switch_off_the_adapter_of_another():
    """The frozen view is per thread: a direct call of the inner model (the adapted view) in one thread while another
    thread sits inside the frozen view still gets the adapter."""
    import threading

    from peft_imsm.dual_pass import frozen_view

    model = shared_model()
    ids, mask = prompts(2)
    inner = model.get_base_model()
    with torch.no_grad():
        adapted = inner(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            base = inner(input_ids=ids, attention_mask=mask).logits
    assert not torch.equal(adapted, base)
    inside, release = threading.Event(), threading.Event()

    def hold_frozen_view() -> None:
        with frozen_view():
            inside.set()
            release.wait(timeout=30)

    holder = threading.Thread(target=hold_frozen_view)
    holder.start()
    try:
        assert inside.wait(timeout=30)
        with torch.no_grad():
            assert torch.equal(inner(input_ids=ids, attention_mask=mask).logits, adapted)
            with frozen_view():
                assert torch.equal(inner(input_ids=ids, attention_mask=mask).logits, base)
    finally:
        release.set()
        holder.join()


def test_disable_adapter_is_model_wide_and_concurrent_imsm_calls_stay_exact():
    """Documented behaviour (as in peft): while one thread is inside ``with model.disable_adapter():``, every thread
    gets the base model; outside such a block, concurrent IMSM calls each give what they give alone."""
    import threading

    plain = tiny_model("llama")  # (the weights shared_model() wraps)
    model = shared_model()
    ids, mask = batch(seq_len=9)

    def greedy(lm) -> torch.Tensor:
        with torch.no_grad():
            return lm.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None,
                pad_token_id=0,
            )  # fmt: skip

    imsm_tokens = greedy(model)
    base_tokens = greedy(plain)
    assert not torch.equal(imsm_tokens, base_tokens)

    inside, release = threading.Event(), threading.Event()

    def hold_disabled() -> None:
        with model.disable_adapter():
            inside.set()
            release.wait(timeout=60)

    holder = threading.Thread(target=hold_disabled)
    holder.start()
    try:
        assert inside.wait(timeout=60)
        assert torch.equal(greedy(model), base_tokens)  # another thread: the base model too
    finally:
        release.set()
        holder.join()
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: greedy(model), range(6)))
    assert all(torch.equal(tokens, imsm_tokens) for tokens in results)
