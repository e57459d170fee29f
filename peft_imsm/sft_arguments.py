"""The ``--imsm_*`` arguments of ``imsm-sft`` (:mod:`peft_imsm.sft`): :class:`IMSMArguments`, the ``IMSMConfig``
they build around TRL's adapter config (:func:`wrap_peft_config`, its errors re-worded to name the flags), and the
anchor settings that need the data or the tokenizer (:func:`load_anchor_texts`, :func:`start_anchors_from_chat`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

from .anchors import user_turn_end, user_turn_start
from .config import IMSMConfig
from .model import find_imsm_tuner

if TYPE_CHECKING:
    from peft import PeftConfig

_DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def _arg(default: Any, text: str) -> Any:
    """A dataclass field with this default and ``--help`` text."""
    return field(default=default, metadata={"help": text})


@dataclass
class IMSMArguments:
    """IMSM's arguments: the fields of :class:`~peft_imsm.IMSMConfig` and :class:`~peft_imsm.AnchorConfig` (same
    defaults), prefixed ``imsm_``. The wrapped adapter is TRL's own (``--use_peft --lora_r --use_dora ...``)."""

    imsm_gate_rank: int = _arg(8, "Rank r of IMSM's gate, an integer >= 1 (the paper's: 8).")
    imsm_gate_mode: Literal["query", "token", "fixed", "route"] = _arg(
        "query",
        "The paper's gate (query), an ablation (token, fixed), or the route gate (route; needs --imsm_anchor).",
    )
    imsm_gate_dropout: float = _arg(0.1, "Dropout after each gate projection, in [0, 1).")
    imsm_gate_lr_scale: float | None = _arg(
        None, "The gate learns this many times as fast (default: 100 for route, else 1)."
    )
    imsm_route_threshold: str = _arg(
        "auto",
        "Route gate at inference: one view per prompt, the frozen one where its router value is above this number "
        "in (0, 1). auto: 0.5 for route (none for the other gates); none: the soft mix of both views.",
    )
    imsm_anchor: bool = _arg(False, "Add the anchor KL term (beyond the paper); the other --imsm_anchor_* need it.")
    imsm_anchor_source: Literal["self", "data"] = _arg("self", "Anchors sampled from the frozen model, or data texts.")
    imsm_anchor_weight: float = _arg(1.0, "Factor of the anchor KL term in the loss, >= 0.")
    imsm_anchor_train_adapter: bool = _arg(True, "true: gate+adapter learn from the anchor term; false: gate only.")
    imsm_anchor_batch_size: int | None = _arg(
        None, "Anchors per anchored step (per device); default: 2 with --imsm_gate_mode route, else 4."
    )
    imsm_anchor_every: int = _arg(4, "Anchor term on every k-th training forward, weighted k x there.")
    imsm_anchor_num_samples: int = _arg(32, "Number of anchors sampled from the frozen model (source self).")
    imsm_anchor_sample_length: int = _arg(16, "New tokens per sampled anchor (source self).")
    imsm_anchor_start: Literal["auto", "chat", "bos", "random"] = _arg(
        "auto",
        "What sampled anchors look like. chat: whole chat prompts, as AnchorConfig.from_tokenizer gives (the user-turn "
        "start, the sampled text, the end of the turn and the generation prompt; needs a chat template). auto: chat "
        "where the tokenizer has a chat template, else bos. bos: from the BOS token. random: from random token ids.",
    )
    imsm_anchor_temperature: float = _arg(1.0, "Sampling temperature of sampled anchors, > 0 (source self).")
    imsm_anchor_seed: int | None = _arg(None, "Seed of anchor sampling and batching; default: the training --seed.")
    imsm_anchor_max_length: int = _arg(64, "Anchor texts are truncated to this many tokens (source data).")
    imsm_anchor_route_weight: float | None = _arg(
        None, "Weight of the routing term; default: 1 with --imsm_gate_mode route, else 0 (off)."
    )
    imsm_anchor_dataset: str | None = _arg(None, "Anchor texts (source data): a data file or a dataset name.")
    imsm_anchor_dataset_config: str | None = _arg(None, "Configuration name of --imsm_anchor_dataset.")
    imsm_anchor_dataset_split: str = _arg("train", "Split of --imsm_anchor_dataset.")
    imsm_anchor_dataset_column: str = _arg("text", "Column of --imsm_anchor_dataset that holds the anchor texts.")


class IMSMArgumentError(ValueError):
    """A bad ``imsm-sft`` argument; the message names the flag and what to do."""


# IMSMConfig's and AnchorConfig's messages name their fields; imsm-sft names the flag instead. (argparse has made a
# command-line value a number already, hence "must be >= 0" rather than "must be a number >= 0".)
_FLAG_MESSAGES = (
    (r"^Unknown gate_mode (.*?);", r"--imsm_gate_mode \1 is not a gate mode;"),
    (r"^anchor source must .*, got (.*)\.$", r"--imsm_anchor_source \1 is not a source: use self or data."),
    (r"^anchor start must .*, got (.*)\.$", r"--imsm_anchor_start \1 is not a start: use auto, chat, bos, random."),
    (r"^(anchor )?(\w+) must be (?:a number )?", lambda m: f"--imsm_{'anchor_' if m[1] else ''}{m[2]} must be "),
)


def _flag_message(message: str) -> str:
    """A message of IMSMConfig / AnchorConfig about one of their fields, re-worded to name its ``--imsm_*`` flag."""
    for pattern, replacement in _FLAG_MESSAGES:
        worded, found = re.subn(pattern, replacement, message, count=1)
        if found:
            return worded
    return message


def _float(value: Any) -> Any:
    """An int as a float (YAML's ``2`` is the command line's ``2.0``); anything else unchanged, for the checks."""
    return float(value) if type(value) is int else value


def wrap_peft_config(adapter_config: PeftConfig | None, imsm_args: IMSMArguments, seed: int = 0) -> IMSMConfig:
    """The :class:`~peft_imsm.IMSMConfig` of IMSM's flags around TRL's adapter config (None without ``--use_peft``);
    ``seed``: the anchors' unless ``--imsm_anchor_seed``. Raises :class:`IMSMArgumentError` naming the flag."""
    a = imsm_args
    anchor_fields = [f.name for f in fields(a) if f.name.startswith("imsm_anchor_")]
    changed = [f"--{name}" for name in anchor_fields if getattr(a, name) != getattr(IMSMArguments(), name)]
    if adapter_config is None:
        raise IMSMArgumentError(
            "IMSM wraps a peft adapter, but --use_peft is not set. Add --use_peft (YAML: `use_peft: true`) and the "
            "LoRA settings as for `trl sft` (--lora_r, --lora_alpha, --lora_target_modules, --use_dora, ...)."
        )
    if a.imsm_gate_mode == "route" and not a.imsm_anchor:
        raise IMSMArgumentError(
            "--imsm_gate_mode route learns which prompts are general from the anchors: add --imsm_anchor (YAML: "
            "`imsm_anchor: true`), or use --imsm_gate_mode query."
        )
    if changed and not a.imsm_anchor:
        raise IMSMArgumentError(
            f"{', '.join(changed)} set, but the anchor term is off. Add --imsm_anchor (YAML: `imsm_anchor: true`) to "
            "use it, or remove these arguments."
        )
    if a.imsm_anchor and a.imsm_anchor_source == "data" and not a.imsm_anchor_dataset:
        raise IMSMArgumentError(
            "--imsm_anchor_source data needs anchor texts: set --imsm_anchor_dataset to a .jsonl/.json/.csv/.parquet/"
            ".txt file or a dataset name (and --imsm_anchor_dataset_column, default 'text')."
        )
    if a.imsm_anchor and a.imsm_anchor_source == "self" and a.imsm_anchor_dataset:
        raise IMSMArgumentError(
            "--imsm_anchor_dataset is only read with --imsm_anchor_source data (the default source 'self' samples "
            "anchors from the frozen model). Add --imsm_anchor_source data, or remove --imsm_anchor_dataset."
        )
    anchor = {name[len("imsm_anchor_") :]: getattr(a, name) for name in anchor_fields if "_dataset" not in name}
    anchor.update(
        weight=_float(a.imsm_anchor_weight),
        temperature=_float(a.imsm_anchor_temperature),
        route_weight=_float(a.imsm_anchor_route_weight),
        # auto / chat: 'bos' until the tokenizer is loaded, then start_anchors_from_chat sets the user turn's tokens.
        start={"auto": "bos", "chat": "bos"}.get(a.imsm_anchor_start, a.imsm_anchor_start),
        seed=seed if a.imsm_anchor_seed is None else a.imsm_anchor_seed,
    )
    try:
        return IMSMConfig(
            adapter_config=adapter_config, gate_rank=a.imsm_gate_rank, gate_mode=a.imsm_gate_mode,
            gate_dropout=_float(a.imsm_gate_dropout), gate_lr_scale=_float(a.imsm_gate_lr_scale),
            route_threshold=_route_threshold(a.imsm_route_threshold), anchor=anchor if a.imsm_anchor else None,
        )  # fmt: skip
    except (TypeError, ValueError) as err:
        raise IMSMArgumentError(_flag_message(str(err))) from err


def _route_threshold(value: str | None) -> float | str | None:
    """``--imsm_route_threshold``: "auto", "none" or a number (IMSMConfig checks its range)."""
    if value is None or str(value).lower() == "none":
        return None
    if str(value).lower() == "auto":
        return "auto"
    try:
        return float(value)
    except ValueError:
        raise IMSMArgumentError(
            f"--imsm_route_threshold must be auto, none or a number strictly between 0 and 1, got {value!r}."
        ) from None


def load_anchor_texts(imsm_args: IMSMArguments) -> Any:
    """The ``datasets.Dataset`` of ``--imsm_anchor_dataset`` (None unless source 'data'), checked for its column."""
    from datasets import load_dataset

    a, path = imsm_args, imsm_args.imsm_anchor_dataset
    if not a.imsm_anchor or a.imsm_anchor_source != "data":
        return None
    builder = _DATA_FILE_BUILDERS.get(os.path.splitext(path)[1].lower()) if os.path.isfile(path) else None
    source = {"path": builder, "data_files": path} if builder else {"path": path, "name": a.imsm_anchor_dataset_config}
    try:
        data = load_dataset(**source, split=a.imsm_anchor_dataset_split)
    except Exception as err:  # noqa: BLE001 - any loading error: say which argument it came from
        raise IMSMArgumentError(f"--imsm_anchor_dataset {path!r} could not be loaded: {err}") from err
    if a.imsm_anchor_dataset_column not in data.column_names:
        raise IMSMArgumentError(
            f"--imsm_anchor_dataset {path!r} has no column {a.imsm_anchor_dataset_column!r} (its columns: "
            f"{', '.join(data.column_names)}); set --imsm_anchor_dataset_column."
        )
    if len(data) == 0:
        raise IMSMArgumentError(f"--imsm_anchor_dataset {path!r} (split {a.imsm_anchor_dataset_split!r}) is empty.")
    return data


def start_anchors_from_chat(model: Any, tokenizer: Any, imsm_args: IMSMArguments) -> None:
    """``--imsm_anchor_start chat`` (or ``auto`` with a chat template): self anchors are whole chat prompts, from the
    tokenizer's user-turn start to its generation prompt (as ``AnchorConfig.from_tokenizer``), set on the model's
    anchor config before the first step samples them."""
    a = imsm_args
    if not a.imsm_anchor or a.imsm_anchor_source != "self" or a.imsm_anchor_start not in ("auto", "chat"):
        return
    if getattr(tokenizer, "chat_template", None):
        anchor_config = find_imsm_tuner(model).anchor_config
        anchor_config.start_tokens, anchor_config.end_tokens = user_turn_start(tokenizer), user_turn_end(tokenizer)
    elif a.imsm_anchor_start == "chat":
        raise IMSMArgumentError(
            "--imsm_anchor_start chat needs a tokenizer with a chat template, and this model's has none. Use "
            "--imsm_anchor_start bos (or auto), or give the tokenizer a chat template."
        )
