"""Train the gate of a retrofitted IMSM model on stored hidden states (``peft_imsm.train_gate``).

With the adapter frozen (:func:`peft_imsm.retrofit`), neither view changes while the gate trains, so both views'
final hidden states on the training and anchor examples are computed once (one inference pass over them) and the
gate is trained on those states alone: each step costs the gate and the output head on a batch of stored token
states, not a pass through the model. The head is the model's own, logit post-processing included, for any
architecture: :func:`_model_logits` runs the causal LM's forward with its backbone swapped for the stored states.

Parts: :func:`train_gate` (checks, anchors, the stored pass, gate training); :func:`_check_arguments` (every
argument's type and range); :func:`_encode_target` (the target rows, cut to the position limit);
:func:`_precompute_target` / :func:`_precompute_anchors` (the one inference pass, :func:`_capture_views` reading both
views at the gate); :func:`_optimise_gate` (the gate's AdamW steps on :class:`_Tokens`, its loss terms from
:mod:`peft_imsm.losses`); :class:`GateTrainingLog` (what it did, timings).

Training data: a (small) sample of the adapter's own task, plus anchors (the IMSM config's ``anchor`` section; self
anchors by default). Without target data nothing pulls the gate towards the adapter: the anchors alone teach it to
copy the frozen model everywhere, which undoes the adapter. :func:`train_gate` refuses to run without target data
(or with target rows that supervise no token), checks every argument first (:func:`_check_arguments`), and cuts rows
longer than the model's position limit (with a warning).
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

from .anchors import is_finite_number
from .backbone import model_device, position_limit
from .dual_pass import soft_gate
from .gate import IMSMGate
from .losses import anchor_kl, gate_route_loss
from .model import IMSMModel, find_imsm_tuner, prepare_anchors, set_anchor_data
from .padding import left_pad, pad_token_id
from .query import build_query_index, query_summary


def _imsm_tuner(model: Any) -> IMSMModel:
    """The :class:`IMSMModel` inside a ``PeftModel`` (or a Trainer-wrapped one)."""
    tuner = find_imsm_tuner(model, required=False)
    if tuner is None:
        raise TypeError(
            f"Expected an IMSM PeftModel, got {type(model).__name__}. Build one with peft_imsm.retrofit(base, adapter) "
            "or get_peft_model(base, IMSMConfig(...))."
        )
    return tuner


# --------------------------------------------------------------------------------------------------- the fast path
GATE_LR = 5e-3
"""``train_gate``'s learning rate for the query and token gates when none is given."""
ROUTE_GATE_LR = 1e-2
"""The route gate's step size in ``train_gate`` when no learning rate is given: AdamW gets this divided by the gate's
``lr_scale`` (its router is stored scaled to move ``lr_scale`` times faster per step than the rate says)."""


@dataclass
class GateTrainingLog:
    """What :func:`train_gate` did, and how long each part took (seconds, wall clock)."""

    steps: int
    target_examples: int
    target_tokens: int
    anchor_tokens: int
    seconds_anchors: float
    seconds_precompute: float
    seconds_train: float
    seconds_total: float
    lr: float | None = None  # the AdamW learning rate used
    loss: list[float] = field(default_factory=list)
    task_loss: list[float] = field(default_factory=list)
    anchor_kl: list[float] = field(default_factory=list)
    gate_mean: float | None = None  # mean gate (frozen-view weight) on the supervised target tokens, after training
    anchor_gate_mean: float | None = None  # the same on the anchor tokens


@dataclass
class _Tokens:
    """Stored final hidden states of both views at the tokens that carry a loss (all on the model's device)."""

    h_frozen: torch.Tensor  # [n, d]
    h_adapted: torch.Tensor  # [n, d]
    seq: torch.Tensor  # [n] long, which sequence each token belongs to
    q_frozen: torch.Tensor  # [num_sequences, d] float32 query summaries
    q_adapted: torch.Tensor  # [num_sequences, d]
    labels: torch.Tensor | None = None  # [n] next-token ids (target tokens)
    frozen_logp: torch.Tensor | None = None  # [n, vocab] frozen view's log-probabilities (anchors, small vocab)

    def __len__(self) -> int:
        return self.h_frozen.shape[0]


def train_gate(
    model: PeftModel,
    train_data: Iterable[Any] | Mapping[str, Iterable[Any]],
    tokenizer: Any = None,
    *,
    steps: int = 200,
    lr: float | None = None,
    batch_tokens: int = 512,
    anchor_batch_tokens: int | None = None,
    anchor_weight: float | None = None,
    anchor_texts: Sequence[str] | None = None,
    max_length: int = 512,
    forward_batch_size: int = 16,
    max_cached_logits: int = 2**26,
    seed: int = 0,
    _negative_prompts: list[list[int]] | None = None,
) -> GateTrainingLog | dict[str, GateTrainingLog]:
    """Train only the gate of an IMSM model, on stored hidden states: about one inference pass plus seconds.

    1. Anchors: the model's ``IMSMConfig.anchor`` section (self anchors are sampled from the frozen view, as in
       Trainer training; ``"data"`` anchors come from ``anchor_texts`` or an earlier :func:`set_anchor_data`).
    2. One no-grad pass of the model over ``train_data`` and the anchors stores, at every token that carries a loss,
       both views' final hidden states, each sequence's query summaries (the same query rule as in training), the
       next token (target data) and the frozen view's distribution (anchors).
    3. ``steps`` AdamW steps on the gate alone: ``CE(head(interwoven state), next token)`` on ``batch_tokens``
       random supervised target tokens, plus ``anchor_weight * KL(p_frozen || p_imsm)`` on ``anchor_batch_tokens``
       random anchor tokens (and, with ``anchor.route_weight > 0`` as for ``gate_mode="route"``, the routing term on
       the same tokens; the anchors serve it also at ``anchor_weight=0``, as in Trainer training): the loss that
       Trainer training with this config optimises, per token instead of per sequence. The wrapped adapter is never
       touched (exact: both views are fixed while only the gate trains).

    A LoRA library (several route-gate adapters active, e.g. from :func:`retrofit` with a dict) takes a dict
    ``{adapter name: its task's rows}`` with every active adapter: each adapter's router is trained in turn as above,
    on its own rows, with the other adapters' prompts added to its anchors (so it sends them to the base model, and
    the library's router, :func:`~peft_imsm.gate.choose_routes`, to their own adapter); the library is active again
    afterwards, and a dict of logs is returned.

    Args:
        model: an IMSM ``PeftModel`` (e.g. from :func:`retrofit`).
        train_data: a sample of the adapter's own task: dicts with ``input_ids`` and ``labels`` (``-100`` on the
            prompt), or with ``prompt`` and ``completion`` strings (needs ``tokenizer``; the completion and an eos
            token are supervised), or ``(input_ids, labels)`` pairs. For a LoRA library, a dict of such samples by
            adapter name.
        tokenizer: the model's tokenizer (for ``prompt``/``completion`` data and ``anchor_texts``).
        steps, lr: gate optimisation steps and AdamW learning rate. ``lr=None`` (the default):
            :data:`GATE_LR` (5e-3) for the query and token gates; for the route gate :data:`ROUTE_GATE_LR` (1e-2)
            divided by its ``gate_lr_scale`` (1e-4 at the default scale of 100), since its router is stored scaled to
            move ``gate_lr_scale`` times faster per step (given 5e-3 or 1e-3, the retrofitted router of SmolLM2 sent
            every prompt to the adapter).
        batch_tokens: target tokens per step; ``anchor_batch_tokens`` anchor tokens per step (default: the same).
        anchor_weight: overrides ``IMSMConfig.anchor.weight``.
        anchor_texts: anchor texts for ``anchor.source="data"``.
        max_length: truncation of every target row (tokens; rows are also cut, with a warning, to the model's
            position limit, ``max_position_embeddings`` / ``n_positions``).
        forward_batch_size: sequences per no-grad forward in step 2.
        max_cached_logits: store the frozen view's anchor distribution when it has at most this many entries
            (anchor tokens x vocabulary); else it is recomputed from the stored frozen hidden states at each step.
        seed: seed of the token sampling.

    Returns:
        A :class:`GateTrainingLog` (timings, losses, final mean gate on target and anchor tokens).

    Raises:
        ValueError: for an argument outside its range (named, with its value and the range), without target data
            or with target rows that supervise no token (nothing would pull the gate towards the adapter), or when
            the gate has no parameters (``gate_mode="fixed"``).
    """
    if isinstance(train_data, Mapping):
        return _train_library_gates(
            model, train_data, tokenizer, steps=steps, lr=lr, batch_tokens=batch_tokens,
            anchor_batch_tokens=anchor_batch_tokens, anchor_weight=anchor_weight, anchor_texts=anchor_texts,
            max_length=max_length, forward_batch_size=forward_batch_size, max_cached_logits=max_cached_logits,
            seed=seed,
        )  # fmt: skip
    start = time.perf_counter()
    tuner = _imsm_tuner(model)
    if len(tuner._active_names) > 1:
        raise ValueError(
            f"This model routes over a LoRA library ({tuner._active_names}): pass train_data as a dict "
            "{adapter name: rows of its task} with every one of them, so each router also learns the others' prompts."
        )
    if anchor_texts is not None and not isinstance(anchor_texts, (str, bytes)) and isinstance(anchor_texts, Iterable):
        anchor_texts = list(anchor_texts)
    _check_arguments(
        steps=steps, lr=lr, batch_tokens=batch_tokens, anchor_batch_tokens=anchor_batch_tokens,
        anchor_weight=anchor_weight, anchor_texts=anchor_texts, max_length=max_length,
        forward_batch_size=forward_batch_size, max_cached_logits=max_cached_logits, seed=seed,
    )  # fmt: skip
    gate = tuner.gate
    if gate.mode == "fixed":
        raise ValueError("gate_mode='fixed' has no gate parameters to train (it is the constant 0.5/0.5 average).")
    if lr is None:
        lr = ROUTE_GATE_LR / gate.lr_scale if gate.mode == "route" else GATE_LR
    config = tuner.anchor_config
    if anchor_texts is not None and (config is None or config.source != "data"):
        source = "no anchor section" if config is None else f"anchor source {config.source!r}"
        raise ValueError(
            f"train_gate() got anchor_texts, but the model's IMSMConfig has {source}: the texts would be ignored. "
            "Retrofit with anchor=AnchorConfig(source='data') to train on them as anchors, or leave anchor_texts out."
        )
    examples = _encode_target(train_data, tokenizer, max_length, position_limit(model.get_base_model()))
    if anchor_weight is None:
        anchor_weight = config.weight if config is not None else 0.0
    # The anchors serve the KL (anchor_weight > 0) and the routing term (route_weight > 0; with weight 0 too, as in
    # Trainer training, where the route gate's routing term reads the anchors whatever their KL weight).
    route_weight = (config.route_weight or 0.0) if config is not None else 0.0
    use_anchors = config is not None and (anchor_weight > 0 or route_weight > 0)
    if not use_anchors:
        warnings.warn(
            "train_gate() without anchors (IMSMConfig.anchor is None, or its weight and route_weight are 0): the gate "
            "learns from target data only, where the adapted view is always the better one, so it will lean on the "
            "adapter everywhere and protect nothing. Retrofit with anchors (the default AnchorConfig()) to keep "
            "general skills.",
            stacklevel=2,
        )
    was_training = model.training
    model.eval()
    device = model_device(model)
    try:
        t0 = time.perf_counter()
        anchor_ids = anchor_mask = None
        if use_anchors:
            if config.source == "data" and anchor_texts is not None:
                set_anchor_data(model, list(anchor_texts), tokenizer)
            prepare_anchors(model)
            anchors = tuner.anchor_set()
            anchor_ids, anchor_mask = anchors.input_ids, anchors.attention_mask
            if _negative_prompts:  # (a library member: the other adapters' prompts are anchors too)
                rows = [ids[m.bool()].tolist() for ids, m in zip(anchor_ids, anchor_mask)] + list(_negative_prompts)
                anchor_ids, anchor_mask = left_pad(rows, pad_token_id(tokenizer))
        seconds_anchors = time.perf_counter() - t0
        t0 = time.perf_counter()
        target = _precompute_target(model, tuner, examples, forward_batch_size, device, pad_token_id(tokenizer))
        anchor = None
        if anchor_ids is not None:
            cached_logits = max_cached_logits if anchor_weight > 0 else 0  # (the frozen distribution: the KL's only)
            anchor = _precompute_anchors(model, tuner, anchor_ids, anchor_mask, forward_batch_size, cached_logits)
        _sync(device)
        seconds_precompute = time.perf_counter() - t0

        t0 = time.perf_counter()
        log = GateTrainingLog(
            steps=steps,
            target_examples=len(examples),
            target_tokens=len(target),
            anchor_tokens=len(anchor) if anchor is not None else 0,
            seconds_anchors=seconds_anchors,
            seconds_precompute=seconds_precompute,
            seconds_train=0.0,
            seconds_total=0.0,
            lr=float(lr),
        )
        _optimise_gate(
            model, gate, target, anchor, log, anchor_weight=anchor_weight, route_weight=route_weight, steps=steps,
            lr=lr, batch_tokens=batch_tokens, anchor_batch_tokens=anchor_batch_tokens or batch_tokens, seed=seed,
        )  # fmt: skip
        _sync(device)
        log.seconds_train = time.perf_counter() - t0
        gate.eval()
        with torch.no_grad():
            log.gate_mean = _mean_gate(gate, target)
            log.anchor_gate_mean = _mean_gate(gate, anchor) if anchor is not None else None
    finally:
        model.train(was_training)
    log.seconds_total = time.perf_counter() - start
    return log


def _train_library_gates(
    model: PeftModel, train_data: Mapping[str, Iterable[Any]], tokenizer: Any, **kwargs: Any
) -> dict[str, GateTrainingLog]:
    """:func:`train_gate` of a LoRA library: each adapter's router in turn, the others' prompts as its anchors."""
    tuner = _imsm_tuner(model)
    library = tuner._active_names
    names = list(train_data)
    unknown = [n for n in names if n not in tuner.imsm_gate]
    missing = [n for n in library if n not in train_data]
    if unknown or missing or len(library) < 2:
        raise ValueError(
            f"train_gate() got rows for {names}, but the active IMSM adapters are {library}"
            + (f" (unknown: {unknown})" if unknown else "")
            + (f" (no rows for: {missing})" if missing else "")
            + ". A dict of rows trains a LoRA library: give the rows of every active adapter's task, keyed by "
            "adapter name (retrofit(base, {name: folder, ...}, gate_mode='route') activates them all)."
        )
    limit = position_limit(model.get_base_model())
    prompts = {}
    for name in names:
        encoded = _encode_target(train_data[name], tokenizer, kwargs["max_length"], limit)
        prompts[name] = [ids[: next(i for i, lab in enumerate(labels) if lab != -100)] for ids, labels in encoded]
    logs = {}
    try:
        for name in names:
            tuner.set_adapter(name)
            negatives = [p for other in names if other != name for p in prompts[other] if p]
            logs[name] = train_gate(model, train_data[name], tokenizer, _negative_prompts=negatives, **kwargs)
    finally:
        tuner.set_adapter(library)
    return logs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _positive_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _check_arguments(**arguments: Any) -> None:
    """Refuse, naming the argument, its value and the allowed range, any :func:`train_gate` argument of the wrong type
    or out of range (bools are not integers here)."""
    ranges = {
        "steps": "an integer >= 1 (gate optimisation steps; e.g. 200)",
        "batch_tokens": "an integer >= 1 (target tokens per step; e.g. 512)",
        "anchor_batch_tokens": "None (as batch_tokens) or an integer >= 1 (anchor tokens per step)",
        "max_length": "an integer >= 2 (tokens kept per target row: a prompt token and a supervised one at least; "
        "e.g. 512)",
        "forward_batch_size": "an integer >= 1 (sequences per no-grad forward; e.g. 16)",
        "max_cached_logits": "an integer >= 0 (0: never store the frozen anchor distribution)",
        "seed": "an integer >= 0",
        "lr": "a finite number > 0 (or None for the default)",
        "anchor_weight": "None (IMSMConfig.anchor.weight) or a finite number >= 0",
        "anchor_texts": "None or a list of strings (the anchor texts of anchor source 'data')",
    }
    for name, value in arguments.items():
        if name in ("steps", "batch_tokens", "forward_batch_size"):
            ok = _positive_int(value)
        elif name == "anchor_batch_tokens":
            ok = value is None or _positive_int(value)
        elif name == "max_length":
            ok = _positive_int(value) and value >= 2
        elif name in ("max_cached_logits", "seed"):
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0
        elif name == "lr":
            ok = value is None or (is_finite_number(value) and value > 0)
        elif name == "anchor_weight":
            ok = value is None or (is_finite_number(value) and value >= 0)
        else:  # anchor_texts
            ok = value is None or (isinstance(value, list) and all(isinstance(t, str) for t in value))
        if not ok:
            shown = f"the string {value[:40]!r}" if isinstance(value, (str, bytes)) else repr(value)
            raise ValueError(f"train_gate() {name} must be {ranges[name]}, got {shown}.")


def _encode_target(
    data: Iterable[Any], tokenizer: Any, max_length: int, limit: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` per example with at least one supervised next token, each cut to ``max_length`` and to
    the model's position limit ``limit`` (with a warning). Raises ``ValueError`` when no row is left: no rows, or
    rows whose labels are all -100."""
    if data is None:
        data = []
    keep = max_length if limit is None else min(max_length, limit)
    encoded, rows, cut = [], 0, 0
    for row in data:
        if isinstance(row, dict) and "input_ids" in row:
            ids, labels = list(row["input_ids"]), list(row.get("labels", row["input_ids"]))
            if "labels" not in row:
                raise ValueError(
                    "Target examples given as token ids need `labels` too (-100 on the prompt), so that the gate "
                    "learns from the answers and the query is the prompt."
                )
        elif isinstance(row, dict) and "prompt" in row and "completion" in row:
            if tokenizer is None:
                raise ValueError("prompt/completion examples need the tokenizer: train_gate(model, data, tokenizer).")
            prompt = tokenizer(row["prompt"])["input_ids"]
            answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                answer = answer + [tokenizer.eos_token_id]
            ids, labels = prompt + answer, [-100] * len(prompt) + answer
        elif isinstance(row, (tuple, list)) and len(row) == 2:
            ids, labels = list(row[0]), list(row[1])
        else:
            raise TypeError(
                "Each target example must be a dict with 'input_ids' and 'labels', a dict with 'prompt' and "
                f"'completion', or an (input_ids, labels) pair; got {type(row).__name__}"
                + (f" with keys {sorted(row)}" if isinstance(row, dict) else "")
                + "."
            )
        if len(ids) != len(labels):
            raise ValueError(f"input_ids and labels differ in length ({len(ids)} vs {len(labels)}).")
        rows += 1
        cut += len(ids) > keep and keep < max_length
        ids, labels = [int(i) for i in ids[:keep]], [int(i) for i in labels[:keep]]
        if any(label != -100 for label in labels[1:]):
            encoded.append((ids, labels))
    if cut:
        warnings.warn(
            f"train_gate(): {cut} of {rows} target rows are longer than this model's position limit ({limit} tokens, "
            f"its max_position_embeddings / n_positions); they were cut to their first {limit} tokens, and their "
            f"supervised tokens after that are not trained on. Pass rows of at most {limit} tokens (or "
            f"max_length={limit}) to train on whole rows.",
            stacklevel=3,
        )
    if not rows:
        raise ValueError(
            "train_gate() got no target data. A sample of the adapter's own task is what pulls the gate towards the "
            "adapter; with anchors alone the gate learns to copy the frozen model everywhere and undoes the adapter. "
            "Pass a few hundred examples of the task the adapter was trained on."
        )
    if not encoded:
        longer = f"raise max_length (now {max_length})" if keep == max_length else f"the model takes only {keep}"
        raise ValueError(
            f"train_gate() got {rows} target rows, but none of them has a supervised token: all their labels are "
            f"-100 (in the first {keep} tokens of each row; position 0's label does not count, no token predicts "
            "it), so there is nothing to train the gate on. Put the answer's token ids in labels (-100 only on the "
            "prompt), or pass {'prompt': ..., 'completion': ...} rows with the tokenizer; for answers that start "
            f"after token {keep}, {longer}."
        )
    return encoded


@torch.no_grad()
def _capture_views(model: PeftModel, tuner: IMSMModel, **inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both views' final hidden states ``[batch, seq, d]`` as the gate receives them in one IMSM forward."""
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        h_frozen = args[0] if args else kwargs["h_frozen"]
        h_adapted = args[1] if len(args) > 1 else kwargs["h_adapted"]
        captured.append((h_frozen, h_adapted))

    handle = tuner.gate.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with soft_gate():  # (both views, also for a hard-routed route gate)
            model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"Expected one IMSM gate call per forward, saw {len(captured)}.")
    return captured[0]


@dataclass
class _BackboneOutput(BaseModelOutputWithPastAndCrossAttentions):
    """A backbone output that holds the final hidden states only; every other field a causal LM's forward reads
    from it (attentions, cache, router logits of a mixture of experts, ...) is None."""

    def __getattr__(self, name: str) -> None:
        if name.startswith("_"):
            raise AttributeError(name)
        return None


class _StoredStates(nn.Module):
    """Stands in for a causal LM's backbone: its output is the given final hidden states, whatever the inputs."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden
        self.calls = 0

    def forward(self, *args: Any, **kwargs: Any) -> _BackboneOutput:
        self.calls += 1
        return _BackboneOutput(last_hidden_state=self.hidden)


def _backbone_slot(hf_model: nn.Module) -> tuple[nn.Module, str]:
    """``(parent, attribute name)`` of the backbone whose output the causal LM's forward hands to its head: the
    module transformers' ``get_decoder()`` names (else ``base_model``), as IMSM's dual pass hooks it."""
    get_decoder = getattr(hf_model, "get_decoder", None)
    try:
        backbone = get_decoder() if get_decoder is not None else None
    except (AttributeError, ValueError):
        backbone = None
    backbone = backbone if backbone is not None else getattr(hf_model, "base_model", None)
    for parent in hf_model.modules():
        for name, child in parent.named_children():
            if child is backbone:
                return parent, name
    raise ValueError(
        f"train_gate(): found no backbone module in {type(hf_model).__name__} (transformers' get_decoder() and "
        "base_model name none of its submodules), so its output head cannot be run on stored states. Train the gate "
        "with the Trainer instead: Trainer(model=retrofitted_model, ...)."
    )


def _model_logits(model: PeftModel, hidden: torch.Tensor) -> torch.Tensor:
    """``[..., vocab]`` logits of the causal LM's own head on final hidden states ``[..., d]``.

    Why this way: transformers has no head-only entry point; each ``*ForCausalLM.forward`` runs its backbone and
    then its head and logit post-processing (Gemma's final softcapping, Cohere's logit scale, Granite's logits
    scaling, ...). So the model's own forward runs here with its backbone swapped, for this call only, for a stub
    that returns ``hidden`` as the backbone's output: whatever the architecture does after its backbone is what
    gives the logits, with autograd through it (the gate's loss). Not thread-safe (the swap is on the model), like
    every training step on one model.
    """
    hf_model = model.get_base_model()
    parent, name = _backbone_slot(hf_model)
    backbone = getattr(parent, name)
    states = hidden.reshape(1, -1, hidden.shape[-1])
    stub = _StoredStates(states)
    setattr(parent, name, stub)
    try:
        logits = hf_model(inputs_embeds=states, use_cache=False).logits
    finally:
        setattr(parent, name, backbone)
    if stub.calls != 1 or logits.shape[:2] != states.shape[:2]:
        raise RuntimeError(
            f"train_gate(): the forward of {type(hf_model).__name__} did not run its head once on the output of "
            f"`{name}` (its backbone, called {stub.calls} times; logits {tuple(logits.shape)} for "
            f"{tuple(states.shape)} states), so the fast path cannot reproduce its logits. Train the gate with the "
            "Trainer instead (Trainer(model=retrofitted_model, ...)), and please report the model."
        )
    return logits.reshape(*hidden.shape[:-1], logits.shape[-1])


def _precompute_target(model, tuner, examples, batch_size, device, pad_id) -> _Tokens:
    """The stored states of the target examples: the tokens whose next token is supervised, and their labels."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("h_frozen", "h_adapted", "seq", "q_frozen", "q_adapted")}
    parts["labels"] = []
    offset = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        ids, mask = left_pad([e[0] for e in chunk], pad_id, device)
        labels, _ = left_pad([e[1] for e in chunk], -100, device)
        h_frozen, h_adapted = _capture_views(model, tuner, input_ids=ids, attention_mask=mask)
        index = build_query_index(ids.shape[0], ids.shape[1], device, attention_mask=mask, labels=labels)
        parts["q_frozen"].append(query_summary(h_frozen, index))
        parts["q_adapted"].append(query_summary(h_adapted, index))
        # position t predicts token t + 1: keep the positions whose next token is supervised
        nxt = labels[:, 1:]
        rows, cols = (nxt != -100).nonzero(as_tuple=True)
        parts["h_frozen"].append(h_frozen[rows, cols])
        parts["h_adapted"].append(h_adapted[rows, cols])
        parts["seq"].append(rows + offset)
        parts["labels"].append(nxt[rows, cols])
        offset += ids.shape[0]
    return _Tokens(**{k: torch.cat(v) for k, v in parts.items()})


def _precompute_anchors(model, tuner, ids, mask, batch_size, max_cached_logits) -> _Tokens:
    """The stored states of the anchors (every real token), and the frozen view's distribution when it fits."""
    device = model_device(model)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("h_frozen", "h_adapted", "seq", "q_frozen", "q_adapted")}
    for i in range(0, ids.shape[0], batch_size):
        chunk_ids, chunk_mask = ids[i : i + batch_size].to(device), mask[i : i + batch_size].to(device)
        h_frozen, h_adapted = _capture_views(model, tuner, input_ids=chunk_ids, attention_mask=chunk_mask)
        index = build_query_index(chunk_ids.shape[0], chunk_ids.shape[1], device, attention_mask=chunk_mask)
        parts["q_frozen"].append(query_summary(h_frozen, index))
        parts["q_adapted"].append(query_summary(h_adapted, index))
        rows, cols = chunk_mask.bool().nonzero(as_tuple=True)
        parts["h_frozen"].append(h_frozen[rows, cols])
        parts["h_adapted"].append(h_adapted[rows, cols])
        parts["seq"].append(rows + i)
    tokens = _Tokens(**{k: torch.cat(v) for k, v in parts.items()})
    vocab = model.get_output_embeddings().weight.shape[0]
    if len(tokens) * vocab <= max_cached_logits:
        tokens.frozen_logp = _frozen_logp(model, tokens.h_frozen)
    return tokens


@torch.no_grad()
def _frozen_logp(model: PeftModel, h_frozen: torch.Tensor) -> torch.Tensor:
    """The frozen view's log-probabilities: its own head (adapter off, e.g. for an adapted lm_head)."""
    with model.disable_adapter():
        return F.log_softmax(_model_logits(model, h_frozen).float(), dim=-1)


def _gate_on(gate: IMSMGate, tokens: _Tokens, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate at tokens ``idx`` and the interwoven states it gives (``[len(idx), d]`` each)."""
    h_frozen, h_adapted = tokens.h_frozen[idx], tokens.h_adapted[idx]
    seq = tokens.seq[idx]
    g = gate(h_frozen, h_adapted, tokens.q_frozen[seq], tokens.q_adapted[seq])
    return g, IMSMGate.interweave(h_frozen, h_adapted, g)


def _optimise_gate(
    model: PeftModel,
    gate: IMSMGate,
    target: _Tokens,
    anchor: _Tokens | None,
    log: GateTrainingLog,
    *,
    anchor_weight: float,
    route_weight: float,
    steps: int,
    lr: float,
    batch_tokens: int,
    anchor_batch_tokens: int,
    seed: int,
) -> None:
    """``steps`` AdamW steps on the gate alone (warmup, cosine decay): CE on ``batch_tokens`` random target tokens
    plus ``anchor_weight`` x the anchor KL on ``anchor_batch_tokens`` random anchor tokens (0: not computed), plus
    ``route_weight`` x the routing term (``-log(1 - g)`` on those target tokens, ``-log g`` on those anchor tokens; 0:
    off); losses go to ``log``."""
    params = [p for p in gate.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(1, steps))),
    )
    device = target.h_frozen.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    gate.train()
    for _ in range(steps):
        idx = torch.randint(len(target), (min(batch_tokens, len(target)),), generator=gen).to(device)
        g, mixed = _gate_on(gate, target, idx)
        task = F.cross_entropy(_model_logits(model, mixed).float(), target.labels[idx])
        loss = task
        if route_weight > 0:
            loss = loss + route_weight * gate_route_loss([(g[None], None)], to_frozen=False)
        kl = None
        if anchor is not None:
            a_idx = torch.randint(len(anchor), (min(anchor_batch_tokens, len(anchor)),), generator=gen).to(device)
            a_g, a_mixed = _gate_on(gate, anchor, a_idx)
            if route_weight > 0:
                loss = loss + route_weight * gate_route_loss([(a_g[None], None)], to_frozen=True)
            if anchor_weight > 0:
                frozen = (
                    anchor.frozen_logp[a_idx]
                    if anchor.frozen_logp is not None
                    else _frozen_logp(model, anchor.h_frozen[a_idx])
                )
                ones = torch.ones(a_idx.shape[0], device=device)
                kl = anchor_kl(frozen, _model_logits(model, a_mixed), ones)
                loss = loss + anchor_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        log.loss.append(float(loss.detach()))
        log.task_loss.append(float(task.detach()))
        if kl is not None:
            log.anchor_kl.append(float(kl.detach()))


def _mean_gate(gate: IMSMGate, tokens: _Tokens, chunk: int = 4096) -> float:
    total, count = 0.0, 0
    for i in range(0, len(tokens), chunk):
        idx = torch.arange(i, min(i + chunk, len(tokens)), device=tokens.h_frozen.device)
        g, _ = _gate_on(gate, tokens, idx)
        total += float(g.mean(dim=-1).sum())
        count += idx.numel()
    return total / max(1, count)
