"""Train the gate of a retrofitted IMSM model on stored hidden states (``peft_imsm.train_gate``).

With the adapter frozen (:func:`peft_imsm.retrofit`), neither view changes while the gate trains, so both views'
final hidden states on the training and anchor examples are computed once (one inference pass over them) and the
gate is trained on those states alone: each step costs the gate and the output head on a batch of stored token
states, not a pass through the model.

Training data: a (small) sample of the adapter's own task, plus anchors (the IMSM config's ``anchor`` section; self
anchors by default). Without target data nothing pulls the gate towards the adapter: the anchors alone teach it to
copy the frozen model everywhere, which undoes the adapter. :func:`train_gate` refuses to run without target data.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from .anchors import anchor_kl
from .gate import IMSMGate
from .model import IMSMModel, find_imsm_tuner, prepare_anchors, set_anchor_data
from .padding import left_pad
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
    train_data: Iterable[Any],
    tokenizer: Any = None,
    *,
    steps: int = 200,
    lr: float = 5e-3,
    batch_tokens: int = 512,
    anchor_batch_tokens: int | None = None,
    anchor_weight: float | None = None,
    anchor_texts: Sequence[str] | None = None,
    max_length: int = 512,
    forward_batch_size: int = 16,
    max_cached_logits: int = 2**26,
    seed: int = 0,
) -> GateTrainingLog:
    """Train only the gate of an IMSM model, on stored hidden states: about one inference pass plus seconds.

    1. Anchors: the model's ``IMSMConfig.anchor`` section (self anchors are sampled from the frozen view, as in
       Trainer training; ``"data"`` anchors come from ``anchor_texts`` or an earlier :func:`set_anchor_data`).
    2. One no-grad pass of the model over ``train_data`` and the anchors stores, at every token that carries a loss,
       both views' final hidden states, each sequence's query summaries (the same query rule as in training), the
       next token (target data) and the frozen view's distribution (anchors).
    3. ``steps`` AdamW steps on the gate alone: ``CE(head(interwoven state), next token)`` on ``batch_tokens``
       random supervised target tokens, plus ``anchor_weight * KL(p_frozen || p_imsm)`` on ``anchor_batch_tokens``
       random anchor tokens: the loss that Trainer training with this config optimises, per token instead of per
       sequence. The wrapped adapter is never touched (exact: both views are fixed while only the gate trains).

    Args:
        model: an IMSM ``PeftModel`` (e.g. from :func:`retrofit`).
        train_data: a sample of the adapter's own task: dicts with ``input_ids`` and ``labels`` (``-100`` on the
            prompt), or with ``prompt`` and ``completion`` strings (needs ``tokenizer``; the completion and an eos
            token are supervised), or ``(input_ids, labels)`` pairs.
        tokenizer: the model's tokenizer (for ``prompt``/``completion`` data and ``anchor_texts``).
        steps, lr: gate optimisation steps and AdamW learning rate.
        batch_tokens: target tokens per step; ``anchor_batch_tokens`` anchor tokens per step (default: the same).
        anchor_weight: overrides ``IMSMConfig.anchor.weight``.
        anchor_texts: anchor texts for ``anchor.source="data"``.
        max_length: truncation of tokenized ``prompt``/``completion`` examples.
        forward_batch_size: sequences per no-grad forward in step 2.
        max_cached_logits: store the frozen view's anchor distribution when it has at most this many entries
            (anchor tokens x vocabulary); else it is recomputed from the stored frozen hidden states at each step.
        seed: seed of the token sampling.

    Returns:
        A :class:`GateTrainingLog` (timings, losses, final mean gate on target and anchor tokens).

    Raises:
        ValueError: without target data (nothing would pull the gate towards the adapter), or when the gate has
            no parameters (``gate_mode="fixed"``).
    """
    start = time.perf_counter()
    tuner = _imsm_tuner(model)
    gate = tuner.gate
    if gate.mode == "fixed":
        raise ValueError("gate_mode='fixed' has no gate parameters to train (it is the constant 0.5/0.5 average).")
    examples = _encode_target(train_data, tokenizer, max_length)
    if not examples:
        raise ValueError(
            "train_gate() got no target data. A sample of the adapter's own task is what pulls the gate towards the "
            "adapter; with anchors alone the gate learns to copy the frozen model everywhere and undoes the adapter. "
            "Pass a few hundred examples of the task the adapter was trained on."
        )
    config = tuner.anchor_config
    weight = anchor_weight if anchor_weight is not None else (config.weight if config is not None else 0.0)
    if config is None or weight == 0:
        warnings.warn(
            "train_gate() without anchors (IMSMConfig.anchor is None or its weight is 0): the gate learns from target "
            "data only, where the adapted view is always the better one, so it will lean on the adapter everywhere "
            "and protect nothing. Retrofit with anchors (the default AnchorConfig()) to keep general skills.",
            stacklevel=2,
        )
    was_training = model.training
    model.eval()
    device = _device(model)
    try:
        t0 = time.perf_counter()
        anchor_ids = anchor_mask = None
        if config is not None and weight > 0:
            if config.source == "data" and anchor_texts is not None:
                set_anchor_data(model, list(anchor_texts), tokenizer)
            prepare_anchors(model)
            anchors = tuner.anchor_set()
            anchor_ids, anchor_mask = anchors.input_ids, anchors.attention_mask
        seconds_anchors = time.perf_counter() - t0
        t0 = time.perf_counter()
        target = _precompute_target(model, tuner, examples, forward_batch_size, device, _pad_id(tokenizer))
        anchor = None
        if anchor_ids is not None:
            anchor = _precompute_anchors(model, tuner, anchor_ids, anchor_mask, forward_batch_size, max_cached_logits)
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
        )
        _optimise_gate(model, gate, target, anchor, weight, steps, lr, batch_tokens, anchor_batch_tokens, seed, log)
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


def _device(model: nn.Module) -> torch.device:
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    return weight.device if weight is not None else next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pad_id(tokenizer: Any) -> int:
    if tokenizer is None:
        return 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad or 0)


def _encode_target(data: Iterable[Any], tokenizer: Any, max_length: int) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` per example with at least one supervised next token."""
    if data is None:
        return []
    encoded = []
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
        ids, labels = [int(i) for i in ids[:max_length]], [int(i) for i in labels[:max_length]]
        if any(label != -100 for label in labels[1:]):
            encoded.append((ids, labels))
    return encoded


@torch.no_grad()
def _capture_views(
    model: PeftModel, tuner: IMSMModel, **inputs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both views' final hidden states ``[batch, seq, d]`` as the gate receives them in one IMSM forward, and the
    model's logits at the last position ``[batch, 1, vocab]``."""
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        h_frozen = args[0] if args else kwargs["h_frozen"]
        h_adapted = args[1] if len(args) > 1 else kwargs["h_adapted"]
        captured.append((h_frozen, h_adapted))

    handle = tuner.gate.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        out = model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"Expected one IMSM gate call per forward, saw {len(captured)}.")
    return captured[0][0], captured[0][1], out.logits


def _model_logits(model: PeftModel, hidden: torch.Tensor) -> torch.Tensor:
    """The causal LM's output head on final hidden states, with its logit post-processing.

    Written out here because transformers has no head-only entry point (each ``*ForCausalLM.forward`` applies these
    steps after its backbone) and the fast gate training works on stored token states, not on sequences.
    :func:`_check_head` compares the result with the model's own forward on the first batch and refuses a model
    whose head does something else."""
    hf_model = model.get_base_model()
    logits = hf_model.get_output_embeddings()(hidden)
    scale = getattr(hf_model, "logit_scale", None)  # Cohere
    if isinstance(scale, (int, float)):
        logits = logits * scale
    text_config = hf_model.config.get_text_config()
    scaling = getattr(text_config, "logits_scaling", None)  # Granite
    if scaling:
        logits = logits / scaling
    cap = getattr(text_config, "final_logit_softcapping", None)  # Gemma 2/3
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _check_head(model: PeftModel, tuner: IMSMModel, h_frozen, h_adapted, mask, logits) -> None:
    """The stored states must give back the model's own last-position logits (catches unknown head processing)."""
    index = build_query_index(h_frozen.shape[0], h_frozen.shape[1], h_frozen.device, attention_mask=mask)
    qb, qt = query_summary(h_frozen, index), query_summary(h_adapted, index)
    hb, ht = h_frozen[:, -1], h_adapted[:, -1]
    mixed = IMSMGate.interweave(hb, ht, tuner.gate(hb, ht, qb, qt))
    mine = _model_logits(model, mixed).float()
    theirs = logits[:, -1].float()
    tol = 1e-4 if mixed.dtype == torch.float32 else 3e-2
    if not torch.allclose(mine, theirs, rtol=tol, atol=tol * max(1.0, float(theirs.abs().max()))):
        raise RuntimeError(
            f"train_gate(): the output head of {type(model.get_base_model()).__name__} post-processes its logits in a "
            f"way the fast path does not reproduce (max difference {float((mine - theirs).abs().max()):.3g}). Train "
            "the gate with the Trainer instead (Trainer(model=retrofitted_model, ...)), and please report the model."
        )


def _precompute_target(model, tuner, examples, batch_size, device, pad_id) -> _Tokens:
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("hb", "ht", "seq", "qb", "qt", "y")}
    offset = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        ids, mask = left_pad([e[0] for e in chunk], pad_id, device)
        labels, _ = left_pad([e[1] for e in chunk], -100, device)
        h_frozen, h_adapted, logits = _capture_views(model, tuner, input_ids=ids, attention_mask=mask)
        if i == 0:
            _check_head(model, tuner, h_frozen, h_adapted, mask, logits)
        index = build_query_index(ids.shape[0], ids.shape[1], device, attention_mask=mask, labels=labels)
        parts["qb"].append(query_summary(h_frozen, index))
        parts["qt"].append(query_summary(h_adapted, index))
        # position t predicts token t + 1: keep the positions whose next token is supervised
        nxt = labels[:, 1:]
        rows, cols = (nxt != -100).nonzero(as_tuple=True)
        parts["hb"].append(h_frozen[rows, cols])
        parts["ht"].append(h_adapted[rows, cols])
        parts["seq"].append(rows + offset)
        parts["y"].append(nxt[rows, cols])
        offset += ids.shape[0]
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return _Tokens(cat["hb"], cat["ht"], cat["seq"], cat["qb"], cat["qt"], labels=cat["y"])


def _precompute_anchors(model, tuner, ids, mask, batch_size, max_cached_logits) -> _Tokens:
    device = _device(model)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("hb", "ht", "seq", "qb", "qt")}
    for i in range(0, ids.shape[0], batch_size):
        chunk_ids, chunk_mask = ids[i : i + batch_size].to(device), mask[i : i + batch_size].to(device)
        h_frozen, h_adapted, _ = _capture_views(model, tuner, input_ids=chunk_ids, attention_mask=chunk_mask)
        index = build_query_index(chunk_ids.shape[0], chunk_ids.shape[1], device, attention_mask=chunk_mask)
        parts["qb"].append(query_summary(h_frozen, index))
        parts["qt"].append(query_summary(h_adapted, index))
        rows, cols = chunk_mask.bool().nonzero(as_tuple=True)
        parts["hb"].append(h_frozen[rows, cols])
        parts["ht"].append(h_adapted[rows, cols])
        parts["seq"].append(rows + i)
    cat = {k: torch.cat(v) for k, v in parts.items()}
    tokens = _Tokens(cat["hb"], cat["ht"], cat["seq"], cat["qb"], cat["qt"])
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
    hb, ht = tokens.h_frozen[idx], tokens.h_adapted[idx]
    seq = tokens.seq[idx]
    g = gate(hb, ht, tokens.q_frozen[seq], tokens.q_adapted[seq])
    return g, IMSMGate.interweave(hb, ht, g)


def _optimise_gate(model, gate, target, anchor, weight, steps, lr, batch_tokens, anchor_batch_tokens, seed, log):
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
    anchor_batch_tokens = anchor_batch_tokens or batch_tokens
    gate.train()
    for _ in range(steps):
        idx = torch.randint(len(target), (min(batch_tokens, len(target)),), generator=gen).to(device)
        _, mixed = _gate_on(gate, target, idx)
        task = F.cross_entropy(_model_logits(model, mixed).float(), target.labels[idx])
        loss = task
        kl = None
        if anchor is not None:
            a_idx = torch.randint(len(anchor), (min(anchor_batch_tokens, len(anchor)),), generator=gen).to(device)
            _, a_mixed = _gate_on(gate, anchor, a_idx)
            frozen = (
                anchor.frozen_logp[a_idx]
                if anchor.frozen_logp is not None
                else _frozen_logp(model, anchor.h_frozen[a_idx])
            )
            ones = torch.ones(a_idx.shape[0], device=device)
            kl = anchor_kl(frozen, _model_logits(model, a_mixed), ones)
            loss = loss + weight * kl
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
