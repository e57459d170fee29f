"""Self-anchored gate (beyond the paper): teach the gate what "not the target task" looks like.

The paper trains the gate on target-task data only, where the adapted view is always the better one, so the gate
learns to favour it everywhere. Anchors are token sequences that stand for the base model's general behaviour; on a
small anchor batch in every training forward (or every ``every``-th, weighted ``every`` times there) IMSM adds
``anchor_weight * KL(p_frozen || p_imsm)`` (mean over anchor tokens) to the loss the forward returns, so the Trainer
and TRL optimise it with no code change. This module holds the anchors (config, sets, sampling); the KL and the
routing term are defined in :mod:`peft_imsm.losses`, and added to the loss in :mod:`peft_imsm.anchor_term`.

* ``source="self"`` (default): anchors are sampled from the frozen view itself (the base model) before the first
  training step: ``num_samples`` sequences of ``sample_length`` new tokens, from the BOS token (or ``start_tokens``,
  or short random starts; :func:`chat_start_tokens` gives an instruct model's user-turn start), batched ``generate()`` with the KV cache, deterministic under ``seed`` (+ the process
  rank in multi-process training, so each rank has its own anchors).
* ``source="data"``: user-given texts or prompts, set with :func:`set_anchor_data`.

Query rule for anchors: an anchor has no prompt/response split, so its query is the whole anchor sequence (for
``"data"`` anchors given as prompts this is exactly the prompt).

Cost: the frozen view's states of the anchors are computed once (they never change); per anchored forward only the
adapted view runs on the anchor batch. Anchors that share a prefix (self anchors started from a chat template's user
turn, whose system prompt can be most of each anchor) run that prefix once per batch, the other rows continuing from
its KV cache (:attr:`AnchorSet.shared_prefix`; the same term up to float rounding).

By default the adapter learns from the anchor term too (``train_adapter=True``, "gate+adapter");
``train_adapter=False`` ("gate only") detaches the adapted view's hidden states there, so only the gate learns from it
(cheaper: the adapted view then runs on the anchors without autograd). Measured results of both: ``docs/anchors.md``.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .padding import left_pad, pad_token_id

ANCHOR_SOURCES = ("self", "data")


def is_finite_number(value: Any) -> bool:
    """True for a finite real number (int or float, numpy's too), False for bools, NaN, infinities and the rest."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class AnchorConfig:
    """The ``anchor`` section of :class:`~peft_imsm.IMSMConfig` (off when ``IMSMConfig.anchor`` is None).

    Args:
        source: ``"self"`` (sample anchors from the frozen view) or ``"data"`` (see :func:`set_anchor_data`).
        weight: ``anchor_weight``, the factor of the KL term (>= 0). 0 turns the KL off and runs no anchor pass;
            with the route gate the anchors then serve the routing term alone.
        batch_size: anchors per anchored training forward (per process). None (the default): 2 with
            ``IMSMConfig(gate_mode="route")`` (its router learns from every anchor on every forward, so the KL needs
            fewer), 4 with the other gate modes.
        every: run the anchor term on every ``every``-th training forward only, weighted ``weight * every`` there:
            the same weight on average for ``1 / every`` of its cost (the anchor batch costs about as much as a
            training batch of as many tokens). 4 (the default) is the recommended setting; 1 runs it on every forward.
            Measured results: ``docs/anchors.md``.
        num_samples: number of self-sampled anchors.
        sample_length: new tokens per self-sampled anchor.
        start: ``"bos"`` (start every sample from the BOS token) or ``"random"`` (``start_length`` uniformly random
            token ids).
        start_length: length of random starts.
        start_tokens: explicit start token ids, None or a non-empty list of ids below the vocabulary size (for
            models without a BOS token, or ``chat_start_tokens(tokenizer)`` for instruct models).
        end_tokens: token ids appended to every self-sampled anchor, None (default: nothing) or a non-empty list.
            ``chat_end_tokens(tokenizer)`` (the end of the user turn and the generation prompt) with
            ``chat_start_tokens`` makes every anchor a whole chat prompt, shaped like the prompts the model answers,
            which the route gate needs to tell general prompts from the target task.
        temperature: sampling temperature of self anchors (> 0).
        seed: sampling and batching seed (the process rank is added in multi-process training).
        train_adapter: let the wrapped adapter learn from the anchor term too (default); False: only the gate does.
        max_length: truncation length of ``"data"`` anchors.
        route_weight: weight of the routing term. It trains the gate towards the frozen view (gate 1) on the
            anchors and towards the adapted view (gate 0) on the supervised tokens of the training batch, so that the
            gate learns to send general prompts to the frozen model and the target task to the adapter. None (the
            default): 1 with ``IMSMConfig(gate_mode="route")``, 0 (off) with the other gate modes. Needs a learned
            gate. See ``docs/anchors.md``.
    """

    source: str = "self"
    weight: float = 1.0
    batch_size: int | None = None
    every: int = 4
    num_samples: int = 32
    sample_length: int = 16
    start: str = "bos"
    start_length: int = 2
    start_tokens: list[int] | None = None
    end_tokens: list[int] | None = None
    temperature: float = 1.0
    seed: int = 0
    train_adapter: bool = True
    max_length: int = 64
    route_weight: float | None = None

    def __post_init__(self) -> None:
        if self.source not in ANCHOR_SOURCES:
            raise ValueError(f"anchor source must be one of {ANCHOR_SOURCES}, got {self.source!r}.")
        if not is_finite_number(self.weight) or self.weight < 0:
            raise ValueError(
                f"anchor weight must be a number >= 0 (a finite float, e.g. 1.0), got {self.weight!r}: a NaN or "
                "infinite weight makes the loss, and after one step every trained weight, NaN."
            )
        for name in ("batch_size", "every", "num_samples", "sample_length", "start_length", "max_length"):
            value = getattr(self, name)
            if name == "batch_size" and value is None:
                continue  # (resolved by IMSMConfig from the gate mode)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"anchor {name} must be an integer >= 1, got {value!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"anchor seed must be an integer, got {self.seed!r}.")
        if self.start not in ("bos", "random"):
            raise ValueError(f"anchor start must be 'bos' or 'random', got {self.start!r}.")
        for name, default, helper in (
            ("start_tokens", "start from the BOS token", "chat_start_tokens(tokenizer); otherwise e.g. "
             "[tokenizer.bos_token_id]"),
            ("end_tokens", "append nothing", "chat_end_tokens(tokenizer)"),
        ):  # fmt: skip
            tokens = getattr(self, name)
            if isinstance(tokens, tuple):
                tokens = list(tokens)
                setattr(self, name, tokens)
            if tokens is None:
                continue
            valid_ids = isinstance(tokens, list) and all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens
            )
            if not valid_ids or not tokens:
                raise ValueError(
                    f"anchor {name} must be None ({default}) or a non-empty list of token ids (integers >= 0), got "
                    f"{tokens!r}. For an instruct model pass peft_imsm.{helper}."
                )
        if not is_finite_number(self.temperature) or self.temperature <= 0:
            raise ValueError(f"anchor temperature must be > 0 and finite (e.g. 1.0), got {self.temperature!r}.")
        if self.route_weight is not None and (not is_finite_number(self.route_weight) or self.route_weight < 0):
            raise ValueError(
                f"anchor route_weight must be None (1 for the route gate, else 0) or a finite number >= 0 (0: off), "
                f"got {self.route_weight!r}."
            )
        if not isinstance(self.train_adapter, bool):
            raise ValueError(f"anchor train_adapter must be True or False, got {self.train_adapter!r}.")

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, **overrides: Any) -> AnchorConfig:
        """The recommended anchor section for a model with this tokenizer: self anchors that are whole chat
        prompts, a user turn sampled from the frozen model between the chat template's start of a user turn
        (:func:`chat_start_tokens`) and its end with the generation prompt (:func:`chat_end_tokens`), so that they
        look like the prompts an instruct model answers; from the BOS token, with nothing appended, when the
        tokenizer has no chat template. Every other field keeps its default (gate+adapter, weight 1, the term on
        every 4th training step) unless given in ``overrides``.

        Example::

            config = IMSMConfig(adapter_config=LoraConfig(...), anchor=AnchorConfig.from_tokenizer(tokenizer))
        """
        if overrides.get("source", "self") == "self":
            if "start_tokens" not in overrides:
                overrides["start_tokens"] = user_turn_start(tokenizer)
            if "end_tokens" not in overrides:
                overrides["end_tokens"] = user_turn_end(tokenizer)
        return cls(**overrides)

    def to_dict(self) -> dict:
        return asdict(self)


class AnchorSet:
    """The anchors of one process: ``input_ids`` / ``attention_mask`` ``[num_anchors, length]``, left-padded.

    Batches are drawn by index: draw ``k`` takes positions ``k * batch_size ...`` of an endless sequence of seeded
    permutations of the anchors (a new permutation each time the anchors are used up), so the batch of a draw depends
    only on the seed and ``k``. The anchor term (:class:`~peft_imsm.anchor_term.AnchorRegularizer`) counts its draws
    and saves the count with the adapter, which makes a Trainer run resumed from a checkpoint draw exactly the batches
    the uninterrupted run would have drawn.
    """

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, seed: int) -> None:
        if input_ids.shape[0] == 0:
            raise ValueError("The anchor set is empty: give at least one anchor text (or num_samples >= 1).")
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.seed = seed
        self._permutations: list[torch.Tensor] = []
        self._generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def length(self) -> int:
        """Tokens per anchor (padded width)."""
        return self.input_ids.shape[1]

    @functools.cached_property
    def shared_prefix(self) -> int:
        """How many leading tokens every anchor has in common, unpadded (e.g. the chat template's start of a user
        turn that self anchors continue; at most ``length - 1``). Computed once: the anchors never change."""
        same = (self.input_ids == self.input_ids[:1]).all(dim=0) & self.attention_mask.bool().all(dim=0)
        return min(int(same.long().cumprod(dim=0).sum()), self.length - 1)

    def prefix_worth_sharing(self, batch_size: int) -> int:
        """The shared prefix the anchor term runs once per batch instead of once per anchor (0: none): only when it
        saves at least a quarter of the batch's tokens (below that a second, shorter backbone call costs about as
        much as it saves on a small model)."""
        prefix = self.shared_prefix
        return prefix if prefix * (batch_size - 1) * 4 >= batch_size * self.length else 0

    def _permutation(self, epoch: int) -> torch.Tensor:
        while len(self._permutations) <= epoch:
            self._permutations.append(torch.randperm(len(self), generator=self._generator))
        return self._permutations[epoch]

    def rows(self, draw: int, batch_size: int) -> list[int]:
        """The indices of the anchors of draw number ``draw``."""
        picked = []
        for position in range(draw * batch_size, (draw + 1) * batch_size):
            epoch, offset = divmod(position, len(self))
            picked.append(int(self._permutation(epoch)[offset]))
        return picked


def check_anchor_length(length: int, limit: int | None, config: AnchorConfig) -> None:
    """Refuse anchors longer than the model's position limit (learned positions would fail with an IndexError)."""
    if limit is None or length <= limit:
        return
    if config.source == "self":
        field_hint = f"AnchorConfig.sample_length (now {config.sample_length}) plus the start and end tokens"
    else:
        field_hint = f"AnchorConfig.max_length (now {config.max_length})"
    raise ValueError(
        f"The anchors are {length} tokens long but this model takes at most {limit} positions. Lower {field_hint} "
        f"so that anchors fit in {limit} tokens."
    )


def process_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _around_user_text(tokenizer: Any, side: str) -> list[int]:
    """The chat template's token ids before (``side="start"``) or after (``"end"``, with the generation prompt) a
    user message's text."""
    if not getattr(tokenizer, "chat_template", None):
        what, unset = ("start from", "start_tokens unset (anchors start from the BOS token)") if side == "start" else (
            "end", "end_tokens unset")  # fmt: skip
        raise ValueError(
            f"The tokenizer {type(tokenizer).__name__} has no chat template, so anchors cannot {what} a user turn: "
            f"leave AnchorConfig.{unset} or set a chat template."
        )
    marker = "\x00MARK\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=side == "end"
    )
    before, after = text.split(marker)
    return tokenizer(before if side == "start" else after, add_special_tokens=False)["input_ids"]


def chat_start_tokens(tokenizer: Any) -> list[int]:
    """The chat template's token ids before a user message's text (its system turn included, if it adds one).

    For instruct models: ``AnchorConfig(start_tokens=chat_start_tokens(tokenizer))`` makes self anchors continue a
    user turn, so they look like the prompts the model answers (from a bare BOS token an instruct model samples
    text unlike any chat). Raises ``ValueError`` for a tokenizer without a chat template.
    """
    return _around_user_text(tokenizer, "start")


def chat_end_tokens(tokenizer: Any) -> list[int]:
    """The chat template's token ids after a user message's text: the end of the user turn and the generation
    prompt (the start of the assistant's turn).

    With :func:`chat_start_tokens`: ``AnchorConfig(start_tokens=chat_start_tokens(tok),
    end_tokens=chat_end_tokens(tok))`` makes every self anchor a whole chat prompt, as the model gets it. Raises
    ``ValueError`` for a tokenizer without a chat template.
    """
    return _around_user_text(tokenizer, "end")


def user_turn_end(tokenizer: Any) -> list[int] | None:
    """:func:`chat_end_tokens` where the tokenizer has a chat template that puts tokens after a user message, else
    None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    return chat_end_tokens(tokenizer) or None


def user_turn_start(tokenizer: Any) -> list[int] | None:
    """:func:`chat_start_tokens` where the tokenizer has a chat template that puts tokens before a user message,
    else None (self anchors then start from the BOS token)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    return chat_start_tokens(tokenizer) or None


def sample_self_anchors(hf_model: torch.nn.Module, config: AnchorConfig, device: torch.device) -> AnchorSet:
    """Sample ``config.num_samples`` anchors from ``hf_model`` (the caller switches IMSM off), batched, with cache.

    Deterministic for a given ``config.seed`` and process rank (the global RNG is forked, not disturbed).
    """
    seed = config.seed + process_rank()
    vocab = hf_model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    n = config.num_samples
    for name, helper in (("start_tokens", "chat_start_tokens"), ("end_tokens", "chat_end_tokens")):
        outside = [t for t in getattr(config, name) or [] if not 0 <= t < vocab]
        if outside:
            raise ValueError(
                f"AnchorConfig.{name} holds token id(s) {outside} that are not in this model's vocabulary of "
                f"{vocab} tokens (ids 0 to {vocab - 1}). Pass ids of this model's tokenizer, e.g. "
                f"peft_imsm.{helper}(tokenizer)."
            )
    if config.start_tokens:
        starts = torch.tensor(config.start_tokens, dtype=torch.long)[None].expand(n, -1)
    elif config.start == "random":
        starts = torch.randint(0, vocab, (n, config.start_length), generator=gen)
    else:
        bos = getattr(hf_model.generation_config, "bos_token_id", None)
        if bos is None:
            bos = getattr(hf_model.config, "bos_token_id", None)
        if isinstance(bos, list):
            bos = bos[0] if bos else None
        if bos is None:
            raise ValueError(
                "Self anchors start from the BOS token, but this model has no bos_token_id. Set "
                "AnchorConfig(start_tokens=[...]) to token ids to start from, or start='random'."
            )
        starts = torch.full((n, 1), int(bos), dtype=torch.long)
    was_training = hf_model.training
    hf_model.eval()
    devices = [device] if device.type == "cuda" else []
    pieces = []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for chunk in starts.split(64):
                chunk = chunk.to(device)
                out = hf_model.generate(
                    input_ids=chunk, attention_mask=torch.ones_like(chunk), do_sample=True,
                    temperature=config.temperature, top_k=0, top_p=1.0, max_new_tokens=config.sample_length,
                    min_new_tokens=config.sample_length, pad_token_id=0,
                )  # fmt: skip
                pieces.append(out.cpu())
    finally:
        hf_model.train(was_training)
    ids = torch.cat(pieces)
    if config.end_tokens:
        ids = torch.cat([ids, torch.tensor(config.end_tokens, dtype=ids.dtype)[None].expand(ids.shape[0], -1)], 1)
    return AnchorSet(ids, torch.ones_like(ids), seed)


def tokenize_anchor_data(
    data: Any, tokenizer: Any, column: str = "text", max_length: int = 64, seed: int = 0
) -> AnchorSet:
    """Anchors from a list of strings or a ``datasets.Dataset`` column, tokenized and left-padded."""
    if tokenizer is None:
        raise ValueError(
            "Anchor data needs the tokenizer that goes with the model: set_anchor_data(model, texts, tokenizer)."
        )
    if data is None:
        raise ValueError("Anchor source 'data' needs anchor texts: set_anchor_data(model, texts, tokenizer).")
    if isinstance(data, (str, bytes)):
        raise TypeError(
            "Anchor data must be a list of texts (or a datasets.Dataset), got a single string: it would make one "
            "anchor per character. Pass [text] for a single anchor, or a list of texts."
        )
    if hasattr(data, "column_names"):
        if column not in data.column_names:
            raise ValueError(f"The anchor dataset has no column {column!r}; its columns are {data.column_names}.")
        texts = list(data[column])
    else:
        texts = list(data)
    if not texts:
        raise ValueError("The anchor set is empty: give at least one anchor text.")
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("Anchor texts must be strings.")
    pad_id = pad_token_id(tokenizer)
    rows = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    rows = [r for r in rows if r]
    if not rows:
        raise ValueError("Every anchor text tokenized to nothing.")
    ids, mask = left_pad(rows, pad_id)
    return AnchorSet(ids, mask, seed + process_rank())
