"""The methods of ``imsm-bench`` and how each is fine-tuned: every method gets the same data, settings and seeds.

* :class:`FinetuneSettings` (one run's hyper-parameters) and :class:`Method` (one row of the table);
* the rows: :func:`default_methods` (paper methods, ablations, post-hoc LoRA baselines), :func:`anchored_methods`
  and :func:`retrofit_methods` (one of each per anchor weight), :func:`data_anchored_methods` (anchors from given
  texts, for the default run) and :func:`routed_methods` (optional ablations);
* building and training one method: :func:`build_model` (peft or IMSM config), :func:`finetune` (the training loop),
  :class:`SelfDistillation` (the LoRA + anchor KL baseline's term), :func:`retrofit_lora` (a trained LoRA given a
  gate with ``peft_imsm.retrofit`` + ``peft_imsm.train_gate``).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import AdaLoraConfig, IA3Config, LoraConfig, get_peft_model
from tqdm.auto import tqdm

from peft_imsm import IMSMConfig, retrofit, set_anchor_data, train_gate
from peft_imsm.anchors import AnchorConfig, sample_self_anchors, tokenize_anchor_data
from peft_imsm.backbone import model_device
from peft_imsm.losses import anchor_kl

from .batching import collate

ADAPTERS = ("lora", "dora", "ia3", "adalora")


@dataclass
class FinetuneSettings:
    """Hyper-parameters shared by every method of one benchmark run."""

    adapter: str = "lora"
    target_modules: Any = "all-linear"
    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 10
    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    gate_rank: int = 8
    gate_dropout: float = 0.1
    max_length: int = 64
    anchor_samples: int = 64
    anchor_length: int = 24
    anchor_batch_size: int = 8
    route_anchor_batch_size: int = 4  # the route gate's (its router learns from every anchor on every step)
    anchor_every: int = 1  # the anchor term (IMSM's and LoRA + anchor KL's) on every k-th step, weighted k x there
    retrofit_examples: int = 256  # target examples the retrofit's gate trains on (LoRA + retrofit row)
    retrofit_anchor_samples: int = 256  # self anchors the retrofit's gate trains on


@dataclass
class Method:
    """One row of the results table.

    ``kind``: ``"base"`` (no fine-tuning), ``"lora"`` (plain wrapped adapter), ``"imsm"``; ``derive`` turns a
    trained plain-adapter model into a post-hoc variant (weight interpolation, intruder-dimension reduction) without
    training again; ``anchor_weight`` adds the anchor KL term (IMSM: through the gate; LoRA: plain self-distillation).
    """

    name: str
    kind: str
    gate_mode: str = "query"
    anchor_weight: float | None = None
    anchor_train_adapter: bool = False
    derive_from: str | None = None
    derive: Callable[[Any], Any] | None = None
    group: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def scale_lora(model: Any, factor: float = 0.5) -> Any:
    """Weight-interpolation baseline: scale the LoRA update by ``factor`` (W0 + factor * dW)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.scaling:
                module.scaling[name] *= factor
    return model


def reduce_intruders(model: Any) -> Any:
    """peft's post-hoc forgetting mitigation for LoRA (``reduce_intruder_dimension``)."""
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    reduce_intruder_dimension(model, logging_sink=None)
    return model


def hard_route(model: Any) -> Any:
    """The route gate rounded per prompt (a hard choice of one view, as users get it by default): the model with
    ``route_threshold`` set to the route gate's default, so each prompt runs the frozen view alone where ``g > 0.5``
    and the adapter alone otherwise."""
    from peft_imsm.config import ROUTE_THRESHOLD

    for config in model.peft_config.values():
        config.route_threshold = ROUTE_THRESHOLD
    return model


def _hard_route_row(trained: str, name: str) -> Method:
    return Method(name, "derived", derive_from=trained, derive=hard_route, group="anchor")


def default_methods(anchor_weights: tuple[float, ...] = (1.0,)) -> list[Method]:
    """The default run's rows: the paper's methods and ablations, post-hoc LoRA baselines, and per anchor weight
    the anchored methods (LoRA + anchor KL, IMSM + self anchors on the gate alone and on gate+adapter) and the
    retrofit of the trained LoRA."""
    methods = [
        Method("base model", "base", group="reference"),
        Method("LoRA", "lora", group="paper"),
        Method("LoRA x0.5 (weight interpolation)", "derived", derive_from="LoRA", derive=scale_lora, group="baseline"),
        Method(
            "LoRA + intruder reduction (peft)",
            "derived",
            derive_from="LoRA",
            derive=reduce_intruders,
            group="baseline",
        ),
        Method("IMSM", "imsm", "query", group="paper"),
        Method("IMSM w/o query", "imsm", "token", group="paper"),
        Method("IMSM w/o gate", "imsm", "fixed", group="paper"),
    ]
    return methods + anchored_methods(anchor_weights) + retrofit_methods(anchor_weights)


def anchored_methods(weights: tuple[float, ...]) -> list[Method]:
    """Per anchor weight: LoRA + anchor KL (self-distillation), IMSM + self anchors [gate] and [gate+adapter], the
    fixed-gate ablation of the last (``IMSM w/o gate + self anchors [adapter]``: the gate held at 0.5, so the
    anchor term trains the adapter through a constant 50/50 mix; what the learned gate adds is the difference), and
    the route gate (``gate_mode="route"``: a per-query router over the frozen view's query summary, trained by the
    routing term) with gate+adapter anchoring."""
    methods = []
    for w in weights:
        methods += [
            Method(f"LoRA + anchor KL (w={w:g})", "lora", anchor_weight=w, group="anchor"),
            Method(f"IMSM + self anchors [gate] (w={w:g})", "imsm", anchor_weight=w, group="anchor"),
            Method(
                f"IMSM + self anchors [gate+adapter] (w={w:g})",
                "imsm",
                anchor_weight=w,
                anchor_train_adapter=True,
                group="anchor",
            ),  # fmt: skip
            Method(
                f"IMSM w/o gate + self anchors [adapter] (w={w:g})",
                "imsm",
                "fixed",
                anchor_weight=w,
                anchor_train_adapter=True,
                group="anchor",
            ),  # fmt: skip
            Method(
                f"IMSM route gate + self anchors [gate+adapter] (w={w:g})",
                "imsm",
                "route",
                anchor_weight=w,
                anchor_train_adapter=True,
                group="anchor",
            ),  # fmt: skip
        ]
    return methods


def routed_methods(weights: tuple[float, ...]) -> list[Method]:
    """Per anchor weight, the anchored query gate with the routing term (``AnchorConfig(route_weight=1)``: the gate
    trained towards the frozen view on the anchors and towards the adapter on the target), with the anchor term
    training the gate only and gate+adapter; and the route gate's ablations: the anchor term training the router
    only ([gate]), the router at the adapter's learning rate (``gate_lr_scale=1``) or 300x it, the trained
    route gate rounded per prompt (:func:`hard_route`, a hard choice of one view), and a two-phase schedule: the
    trained LoRA, frozen, retrofitted with a route gate (:func:`retrofit_lora`; at ``train_gate``'s default learning
    rate, and at 5e-3 and 1e-3). Run only when named in ``--methods``."""
    methods = []
    for w in weights:
        methods += [
            _hard_route_row(f"IMSM route gate + self anchors [gate+adapter] (w={w:g})",
                            f"IMSM route gate (hard choice) + self anchors [gate+adapter] (w={w:g})"),
            Method(f"IMSM route gate + self anchors [gate] (w={w:g})", "imsm", "route", anchor_weight=w,
                   anchor_train_adapter=False, group="anchor"),
            *(Method(f"IMSM route gate (gate lr x{k:g}) + self anchors [gate+adapter] (w={w:g})", "imsm", "route",
                     anchor_weight=w, anchor_train_adapter=True, group="anchor", extra={"gate_lr_scale": float(k)})
              for k in (1, 300)),
            Method(f"LoRA + retrofit route gate [gate] (w={w:g})", "derived", "route", anchor_weight=w,
                   derive_from="LoRA", group="retrofit", extra={"retrofit": True}),
            *(Method(f"LoRA + retrofit route gate (lr {lr:g}) [gate] (w={w:g})", "derived", "route", anchor_weight=w,
                     derive_from="LoRA", group="retrofit", extra={"retrofit": True, "retrofit_lr": lr})
              for lr in (5e-3, 1e-3)),
        ]  # fmt: skip
        for label, train_adapter in (("gate", False), ("gate+adapter", True)):
            for scale in (1, 10, 30):
                suffix = f" (gate lr x{scale})" if scale != 1 else ""
                methods.append(
                    Method(f"IMSM + self anchors + routing{suffix} [{label}] (w={w:g})", "imsm", anchor_weight=w,
                           anchor_train_adapter=train_adapter, group="anchor",
                           extra={"route_weight": 1.0, "gate_lr_scale": float(scale)})
                )  # fmt: skip
    return methods


def data_anchored_methods(weights: tuple[float, ...], texts: tuple[str, ...], what: str,
                          held_out: tuple[str, tuple[str, ...], str] | None = None) -> tuple[list[Method], list[Method]]:  # fmt: skip
    """Per anchor weight, the route gate with DATA anchors (``AnchorConfig(source="data")``, ``texts``: prompts of
    the base model's general skills, described by ``what``), and, as optional rows, LoRA + anchor KL on the same
    texts and (``held_out = (name, texts, what)``) the route gate on anchors that leave one kind of prompt out.
    Returns ``(rows, optional rows)``."""
    extra = {"anchor_texts": tuple(texts), "anchor_texts_are": what}
    rows = [Method(f"IMSM route gate + data anchors [gate+adapter] (w={w:g})", "imsm", "route", anchor_weight=w,
                   anchor_train_adapter=True, group="anchor", extra=extra) for w in weights]  # fmt: skip
    optional = [Method(f"LoRA + data anchor KL (w={w:g})", "lora", anchor_weight=w, group="anchor", extra=extra)
                for w in weights]  # fmt: skip
    optional += [
        _hard_route_row(row.name, row.name.replace("route gate +", "route gate (hard choice) +")) for row in rows
    ]
    if held_out is not None:
        name, held_texts, held_what = held_out
        optional += [Method(f"IMSM route gate + data anchors without {name} [gate+adapter] (w={w:g})", "imsm", "route",
                            anchor_weight=w, anchor_train_adapter=True, group="anchor",
                            extra={"anchor_texts": tuple(held_texts), "anchor_texts_are": held_what})
                     for w in weights]  # fmt: skip
    return rows, optional


def retrofit_methods(weights: tuple[float, ...]) -> list[Method]:
    """Per anchor weight: the trained LoRA retrofitted with a gate (:func:`retrofit_lora`), rows derived from "LoRA"
    (each retrofit's gate is initialised from its seed alone, so its figures do not depend on the other rows)."""
    return [Method(f"LoRA + retrofit [gate] (w={w:g})", "derived", anchor_weight=w, derive_from="LoRA",
                   group="retrofit", extra={"retrofit": True}) for w in weights]  # fmt: skip


RETROFIT_METHOD = "LoRA + retrofit [gate] (w=1)"
"""The retrofit row of the default weight."""


def retrofit_lora(
    model: Any, tokenizer: Any, train: list[tuple[list[int], list[int]]], settings: FinetuneSettings, seed: int,
    method: Method,
) -> tuple[Any, Any]:  # fmt: skip
    """The trained plain-LoRA ``model`` retrofitted with an IMSM gate of ``method.gate_mode``, trained gate-only on
    stored hidden states
    (``peft_imsm.train_gate``) on ``settings.retrofit_examples`` of the target's training examples and
    ``settings.retrofit_anchor_samples`` self anchors.
    Returns the model and the :class:`~peft_imsm.GateTrainingLog` (its ``seconds_total`` counts everything
    from the trained LoRA to the retrofitted model: building, anchor sampling, the stored pass, gate training)."""
    start = time.perf_counter()
    anchor = AnchorConfig(weight=method.anchor_weight, num_samples=settings.retrofit_anchor_samples,
                          sample_length=settings.anchor_length, seed=seed,
                          start_tokens=method.extra.get("start_tokens"),
                          end_tokens=method.extra.get("end_tokens"))  # fmt: skip
    torch.manual_seed(seed)  # the gate's initialisation: the same whichever rows were derived before this one
    model = retrofit(model, gate_rank=settings.gate_rank, gate_mode=method.gate_mode, gate_dropout=0.0, anchor=anchor,
                     route_threshold=method.extra.get("route_threshold"))  # fmt: skip
    lr = method.extra.get("retrofit_lr")  # (None: train_gate's default for the gate mode)
    log = train_gate(model, train[: settings.retrofit_examples], tokenizer, steps=settings.steps, lr=lr, seed=seed)
    log.seconds_total = time.perf_counter() - start
    model.eval()
    return model, log


def adapter_config(settings: FinetuneSettings) -> Any:
    common = dict(target_modules=settings.target_modules, task_type="CAUSAL_LM")
    if settings.adapter == "lora":
        return LoraConfig(r=settings.r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout, **common)
    if settings.adapter == "dora":
        return LoraConfig(r=settings.r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                          use_dora=True, **common)  # fmt: skip
    if settings.adapter == "ia3":
        return IA3Config(feedforward_modules=[], **common)
    if settings.adapter == "adalora":
        return AdaLoraConfig(init_r=settings.r, target_r=max(1, settings.r // 2), lora_alpha=settings.lora_alpha,
                             total_step=settings.steps, tinit=settings.steps // 10, tfinal=settings.steps // 5,
                             deltaT=max(1, settings.steps // 20), **common)  # fmt: skip
    raise ValueError(f"Unknown adapter {settings.adapter!r}; choose one of {', '.join(ADAPTERS)}.")


def build_model(base: Any, method: Method, settings: FinetuneSettings, seed: int, tokenizer: Any = None) -> Any:
    """The peft model of ``method`` on ``base`` (``tokenizer``: for methods with data anchors)."""
    torch.manual_seed(seed)
    config = adapter_config(settings)
    if method.kind == "lora":
        return get_peft_model(base, config)
    anchor = None
    texts = method.extra.get("anchor_texts")
    if method.anchor_weight is not None:
        anchor = AnchorConfig(
            source="data" if texts else "self",
            weight=method.anchor_weight, num_samples=settings.anchor_samples, sample_length=settings.anchor_length,
            batch_size=settings.route_anchor_batch_size if method.gate_mode == "route" else settings.anchor_batch_size,
            every=settings.anchor_every, seed=seed,
            train_adapter=method.anchor_train_adapter,
            start_tokens=method.extra.get("start_tokens"), end_tokens=method.extra.get("end_tokens"),
            route_weight=method.extra.get("route_weight"),
        )  # fmt: skip
    imsm = IMSMConfig(adapter_config=config, gate_rank=settings.gate_rank, gate_mode=method.gate_mode,
                      gate_dropout=settings.gate_dropout, gate_scalar=method.extra.get("gate_scalar", False),
                      gate_lr_scale=method.extra.get("gate_lr_scale"),
                      route_threshold=method.extra.get("route_threshold"),
                      anchor=anchor)  # fmt: skip
    model = get_peft_model(base, imsm)
    if anchor is not None and texts:
        set_anchor_data(model, list(texts), tokenizer)
    return model


def finetune(
    base: Any,
    tokenizer: Any,
    method: Method,
    train: list[tuple[list[int], list[int]]],
    settings: FinetuneSettings,
    seed: int,
    progress: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Train one method on ``train`` (same batches for every method of a seed). Returns the model and its log."""
    device = model_device(base)
    model = build_model(base, method, settings, seed, tokenizer)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / settings.warmup_steps)
        * 0.5 * (1 + math.cos(math.pi * min(step, settings.steps) / settings.steps)),
    )  # fmt: skip
    distill = None
    if method.kind == "lora" and method.anchor_weight is not None:
        distill = SelfDistillation(model, method, settings, seed, device, tokenizer)
    rng = random.Random(seed)
    order: list[int] = []
    log: dict[str, Any] = {"loss": [], "anchor_kl": []}
    start = time.perf_counter()
    adalora = settings.adapter == "adalora"
    bar = tqdm(range(settings.steps), desc=f"train {method.name} (seed {seed})", disable=not progress, leave=False)
    for step in bar:
        if len(order) < settings.batch_size:
            more = list(range(len(train)))
            rng.shuffle(more)
            order += more
        batch = collate([train[i] for i in order[: settings.batch_size]], tokenizer.pad_token_id, device)
        order = order[settings.batch_size :]
        loss, kl = training_loss(model, batch, distill, step)
        if kl is not None:
            log["anchor_kl"].append(float(kl.detach()))
        loss.backward()
        optimizer.step()
        if adalora:
            _adalora_tuner(model).update_and_allocate(step)
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        log["loss"].append(float(loss.detach()))
        if method.kind == "imsm" and method.anchor_weight is not None:
            stats = model.base_model.pop_training_stats()
            if "anchor_kl" in stats:  # (not on the steps that AnchorConfig.every skips)
                log["anchor_kl"].append(stats["anchor_kl"])
        if step % 10 == 0:
            bar.set_postfix(loss=f"{log['loss'][-1]:.3f}")
    log["seconds"] = time.perf_counter() - start
    model.eval()
    return model, log


class SelfDistillation:
    """The LoRA + anchor KL baseline's term: ``KL(p_frozen || p_model)`` on self anchors sampled from the base model
    (``settings.anchor_*``, ``seed``, ``method.extra["start_tokens"]`` / ``["end_tokens"]``), whose frozen logits are computed once. As
    ``AnchorConfig.every`` does for IMSM, the term is due on every ``settings.anchor_every``-th step only, and
    :attr:`scale` (``method.anchor_weight * anchor_every``) is the factor it takes in the loss there."""

    def __init__(self, model: Any, method: Method, settings: FinetuneSettings, seed: int, device: Any,
                 tokenizer: Any = None) -> None:  # fmt: skip
        self.model, self.batch_size, self.device = model, settings.anchor_batch_size, device
        self.every = settings.anchor_every
        self.scale = method.anchor_weight * settings.anchor_every
        texts = method.extra.get("anchor_texts")
        if texts:  # (data anchors: tokenized as IMSM's AnchorConfig(source="data") does)
            self.anchors = tokenize_anchor_data(list(texts), tokenizer, seed=seed)
        else:
            config = AnchorConfig(num_samples=settings.anchor_samples, sample_length=settings.anchor_length,
                                  seed=seed, start_tokens=method.extra.get("start_tokens"),
                                  end_tokens=method.extra.get("end_tokens"))  # fmt: skip
            with model.disable_adapter():
                self.anchors = sample_self_anchors(model.get_base_model(), config, device)
        self.frozen_logits = frozen_anchor_logits_of(model, self.anchors, self.batch_size, device)

    def kl_at(self, step: int) -> torch.Tensor | None:
        """The KL of training step ``step`` (0-based), or None on the steps that ``anchor_every`` skips."""
        return self.kl(step // self.every) if step % self.every == 0 else None

    def kl(self, draw: int) -> torch.Tensor:
        """The (differentiable) KL on anchor batch number ``draw``, at the anchors' full padded width."""
        rows = self.anchors.rows(draw, self.batch_size)
        ids = self.anchors.input_ids[rows].to(self.device)
        mask = self.anchors.attention_mask[rows].to(self.device)
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return anchor_kl(self.frozen_logits[rows].to(self.device), logits, mask)


def training_loss(
    model: Any, batch: dict[str, torch.Tensor], distill: SelfDistillation | None, step: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The loss of training step ``step`` (0-based): the model's own (an anchored IMSM's includes its anchor term),
    plus, for LoRA + anchor KL, ``distill.scale * KL`` on the steps where it is due. Returns the loss and that KL
    (None when not due or without ``distill``)."""
    loss = model(**batch, use_cache=False).loss
    kl = distill.kl_at(step) if distill is not None else None
    if kl is not None:
        loss = loss + distill.scale * kl
    return loss, kl


@torch.no_grad()
def frozen_anchor_logits_of(model: Any, anchors: Any, batch_size: int, device: Any) -> torch.Tensor:
    """``[num_anchors, length, vocab]`` (on the CPU) the base model's logits on every anchor, computed once, in eval
    mode and at the anchors' full padded width (as IMSM's anchor term computes its frozen side): the KL target of the
    LoRA + anchor KL baseline does not change during training, so it is not recomputed at every step."""
    was_training = model.training
    model.eval()
    parts = []
    try:
        with model.disable_adapter():
            for start in range(0, len(anchors), batch_size):
                ids = anchors.input_ids[start : start + batch_size].to(device)
                mask = anchors.attention_mask[start : start + batch_size].to(device)
                parts.append(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(parts)


def _adalora_tuner(model: Any) -> Any:
    tuner = model.base_model
    return tuner.__dict__.get("adapter_tuner", tuner)
