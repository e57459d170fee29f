"""``imsm-sft``: TRL's SFT script (``trl sft``) with IMSM wrapped around the adapter that TRL's flags describe.

Every argument and YAML key of ``trl sft`` works unchanged (TRL's ``ScriptArguments``, ``SFTConfig``, ``ModelConfig``,
``DatasetMixtureConfig`` and ``--config recipe.yaml``), plus IMSM's own, all prefixed ``--imsm_`` (see
:class:`IMSMArguments`, or ``imsm-sft --help``)::

    imsm-sft --model_name_or_path M --dataset_name D --use_peft --lora_r 16 --output_dir out --imsm_anchor
    imsm-sft --config examples/recipes/sft_imsm_lora.yaml
    accelerate launch --num_processes 2 -m peft_imsm.sft --config recipe.yaml

:func:`run` does what ``main`` of TRL's ``trl/scripts/sft.py`` does, step by step, through TRL's public API
(``trl.get_dataset``, ``trl.get_quantization_config``, ``trl.get_peft_config``, ``trl.SFTTrainer``), except that the
trainer gets ``peft_config=IMSMConfig(adapter_config=<TRL's LoraConfig>, ...)`` and ``callbacks=[IMSMLogCallback()]``.
Nothing in ``trl`` is replaced. IMSM's flags (and ``--use_peft``) are checked before anything loads, by building that
``IMSMConfig``. Like ``trl sft``, ``accelerate launch`` options (``--num_processes 2``, ``--accelerate_config zero2``,
...; flags or YAML keys) restart it as ``accelerate launch <those options> -m peft_imsm.sft <the rest>``.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from . import IMSMConfig, IMSMLogCallback, set_anchor_data
from .anchors import user_turn_start
from .model import find_imsm_tuner

if TYPE_CHECKING:
    from peft import PeftConfig
    from transformers import TrainerCallback
    from trl import SFTTrainer, TrlParser

PROG = "imsm-sft"
# argparse would list all ~250 options of TRL's dataclasses in the usage line of every error message.
USAGE = f"{PROG} [-h] [--config RECIPE.yaml] [trl sft arguments ...] [--imsm_* arguments ...]"
_LAUNCHED_ENV = ("ACCELERATE_MIXED_PRECISION", "LOCAL_RANK", "WORLD_SIZE")  # set by `accelerate launch` / torchrun
_DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def _arg(default: Any, text: str) -> Any:
    """A dataclass field with this default and ``--help`` text."""
    return field(default=default, metadata={"help": text})


@dataclass
class IMSMArguments:
    """IMSM's arguments of ``imsm-sft``: the fields of :class:`~peft_imsm.IMSMConfig` and
    :class:`~peft_imsm.AnchorConfig` (same defaults), prefixed ``imsm_``. The wrapped adapter is TRL's own:
    ``--use_peft --lora_r --lora_alpha --lora_dropout --lora_target_modules --use_dora --use_rslora ...``."""

    imsm_gate_rank: int = _arg(8, "Rank r of IMSM's gate (W_A: 4d x r, W_B: r x d), an integer >= 1; the paper's: 8.")
    imsm_gate_mode: Literal["query", "token", "fixed"] = _arg(
        "query", "IMSM gate: 'query' (the paper's), 'token' (its 'w/o query' ablation) or 'fixed' (its 'w/o gate' "
        "ablation: a constant 0.5/0.5 mix of the frozen and the adapted view).",
    )  # fmt: skip
    imsm_gate_dropout: float = _arg(0.1, "Dropout after each gate projection, in [0, 1).")
    imsm_anchor: bool = _arg(
        False, "Add IMSM's self-anchored gate (beyond the paper; recommended): weight * KL(p_frozen || p_imsm) on a "
        "small batch of anchors every --imsm_anchor_every steps. The other --imsm_anchor_* arguments need this flag.",
    )  # fmt: skip
    imsm_anchor_source: Literal["self", "data"] = _arg(
        "self", "Where anchors come from: 'self' (sampled from the frozen model before the first step) or 'data' "
        "(the texts of --imsm_anchor_dataset).",
    )  # fmt: skip
    imsm_anchor_weight: float = _arg(1.0, "Factor of the anchor KL term in the loss; a number >= 0.")
    imsm_anchor_train_adapter: bool = _arg(
        True, "Let the adapter learn from the anchor term too ('gate+adapter', the default and recommended); false: "
        "only the gate does ('gate only': cheaper per anchored step, keeps less).",
    )  # fmt: skip
    imsm_anchor_batch_size: int = _arg(4, "Anchors per anchored step (per device).")
    imsm_anchor_every: int = _arg(
        4, "Run the anchor term on every k-th training forward only, weighted k x there (AnchorConfig.every); 4 is "
        "the recommended setting, 1 runs it on every forward (docs/anchors.md).",
    )  # fmt: skip
    imsm_anchor_num_samples: int = _arg(32, "Number of anchors sampled from the frozen model (source 'self').")
    imsm_anchor_sample_length: int = _arg(16, "New tokens per sampled anchor (source 'self').")
    imsm_anchor_start: Literal["auto", "chat", "bos", "random"] = _arg(
        "auto", "Where sampled anchors start: 'chat' (the chat template's user turn; recommended for instruct models),"
        " 'bos' (the BOS token), 'random' (random token ids) or 'auto' ('chat' with a chat template, else 'bos').",
    )  # fmt: skip
    imsm_anchor_temperature: float = _arg(1.0, "Sampling temperature of sampled anchors (source 'self'); > 0.")
    imsm_anchor_seed: int | None = _arg(None, "Seed of anchor sampling and batching; default: the training --seed.")
    imsm_anchor_max_length: int = _arg(64, "Anchor texts are truncated to this many tokens (source 'data').")
    imsm_anchor_dataset: str | None = _arg(
        None, "Anchor texts for source 'data': a .jsonl/.json/.csv/.parquet/.txt file, or a dataset name or folder.",
    )  # fmt: skip
    imsm_anchor_dataset_config: str | None = _arg(None, "Configuration name of --imsm_anchor_dataset.")
    imsm_anchor_dataset_split: str = _arg("train", "Split of --imsm_anchor_dataset.")
    imsm_anchor_dataset_column: str = _arg("text", "Column of --imsm_anchor_dataset that holds the anchor texts.")


class IMSMArgumentError(ValueError):
    """A bad ``imsm-sft`` argument; the message names the flag and what to do."""


class ParsedArguments(NamedTuple):
    """What :func:`parse_args` returns: TRL's ``(script_args, training_args, model_args, dataset_args)``, IMSM's
    arguments, and the ``accelerate launch`` options (``["--key", "value", ...]``) from YAML keys and the command line
    that no dataclass takes."""

    trl_args: tuple[Any, ...]
    imsm_args: IMSMArguments
    yaml_launch_args: list[str]
    cli_launch_args: list[str]


def make_parser(prog: str | None = PROG) -> TrlParser:
    """The parser of ``imsm-sft``: TRL's ``trl sft`` dataclasses plus :class:`IMSMArguments`."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser

    types = (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig, IMSMArguments)
    return TrlParser(types, prog=prog, usage=USAGE)


def is_launched() -> bool:
    """Whether this process was started by ``accelerate launch`` (or torchrun)."""
    return any(name in os.environ for name in _LAUNCHED_ENV)


# IMSMConfig's and AnchorConfig's messages name their fields; imsm-sft names the flag instead. (argparse has made a
# command-line value a number already, hence "must be >= 0" rather than "must be a number >= 0".)
_FLAG_MESSAGES = (
    (r"^Unknown gate_mode (.*?);", r"--imsm_gate_mode \1 is not a gate mode;"),
    (r"^anchor source must be .*?, got (.*?)\.$", r"--imsm_anchor_source \1 is not a source: use self or data."),
    (
        r"^anchor start must be .*?, got (.*?)\.$",
        r"--imsm_anchor_start \1 is not a start: use auto, chat, bos, random.",
    ),
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
    """The :class:`~peft_imsm.IMSMConfig` of IMSM's flags around the adapter config TRL built from its own flags
    (``trl.get_peft_config(model_args)``, None without ``--use_peft``); ``seed``: the anchors' unless
    ``--imsm_anchor_seed``. The one check of IMSM's flags: raises :class:`IMSMArgumentError` naming the flag."""
    a = imsm_args
    if adapter_config is None:
        raise IMSMArgumentError(
            "IMSM wraps a peft adapter, but --use_peft is not set. Add --use_peft (YAML: `use_peft: true`) and the "
            "LoRA settings as for `trl sft` (--lora_r, --lora_alpha, --lora_target_modules, --use_dora, ...)."
        )
    anchor_fields = [f.name for f in fields(a) if f.name.startswith("imsm_anchor_")]
    changed = [f"--{name}" for name in anchor_fields if getattr(a, name) != getattr(IMSMArguments(), name)]
    if not a.imsm_anchor and changed:
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
    anchor = {n[len("imsm_anchor_") :]: getattr(a, n) for n in anchor_fields if "_dataset" not in n}
    anchor.update(
        weight=_float(a.imsm_anchor_weight),
        temperature=_float(a.imsm_anchor_temperature),
        # auto / chat: 'bos' until the tokenizer is loaded, then _start_anchors_from_chat sets the user turn's tokens.
        start={"auto": "bos", "chat": "bos"}.get(a.imsm_anchor_start, a.imsm_anchor_start),
        seed=seed if a.imsm_anchor_seed is None else a.imsm_anchor_seed,
    )
    try:
        return IMSMConfig(
            adapter_config=adapter_config, gate_rank=a.imsm_gate_rank, gate_mode=a.imsm_gate_mode,
            gate_dropout=_float(a.imsm_gate_dropout), anchor=anchor if a.imsm_anchor else None,
        )  # fmt: skip
    except (TypeError, ValueError) as err:
        raise IMSMArgumentError(_flag_message(str(err))) from err


def parse_args(argv: Sequence[str] | None = None, parser: TrlParser | None = None) -> ParsedArguments:
    """Parse and check ``imsm-sft``'s arguments (command line and ``--config`` YAML), before anything is loaded.

    Arguments that no dataclass takes are ``accelerate launch`` options, as for ``trl sft``; in a process that
    ``accelerate launch`` started, an unknown command-line argument is an error and leftover YAML keys (used by the
    launcher already) are dropped. An unknown ``--imsm_*`` argument is always an error. A bad argument exits with
    status 2 and a message, as argparse does.
    """
    from trl import get_peft_config

    parser = parser or make_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        *parsed, yaml_rest, cli_rest = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
        *trl_args, imsm_args = parsed
        names = [f"--{f.name}" for f in fields(IMSMArguments)]
        unknown = [
            "--" + s.split("=")[0][2:].replace("-", "_") for s in [*yaml_rest, *cli_rest] if s.startswith("--imsm")
        ]
        if unknown:
            close = {flag: difflib.get_close_matches(flag, names, n=1, cutoff=0.6) for flag in unknown}
            said = [f"unknown IMSM argument {f}" + (f" (did you mean {c[0]}?)" if c else "") for f, c in close.items()]
            raise IMSMArgumentError(
                f"{'; '.join(said)}. The IMSM arguments are: {' '.join(names)} (see {PROG} --help)."
            )
        if is_launched() and cli_rest:
            raise IMSMArgumentError(
                f"unrecognized arguments: {' '.join(cli_rest)}. {PROG} takes the arguments of `trl sft` and the "
                f"--imsm_* arguments (see {PROG} --help); options of `accelerate launch` go before `-m peft_imsm.sft`."
            )
        _, training_args, model_args, _ = trl_args
        wrap_peft_config(get_peft_config(model_args), imsm_args, training_args.seed)
    except (TypeError, ValueError) as err:  # also a YAML file that is not a mapping, or a value TRL's classes refuse
        parser.error(str(err))
    return ParsedArguments(tuple(trl_args), imsm_args, [] if is_launched() else list(yaml_rest), list(cli_rest))


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


def _start_anchors_from_chat(model: Any, tokenizer: Any, imsm_args: IMSMArguments) -> None:
    """``--imsm_anchor_start chat`` (or ``auto`` with a chat template): self anchors start from the tokenizer's user
    turn (as ``AnchorConfig.from_tokenizer``), set on the model's anchor config before the first step samples them."""
    a = imsm_args
    if not a.imsm_anchor or a.imsm_anchor_source != "self" or a.imsm_anchor_start not in ("auto", "chat"):
        return
    if not getattr(tokenizer, "chat_template", None):
        if a.imsm_anchor_start == "chat":
            raise IMSMArgumentError(
                "--imsm_anchor_start chat needs a tokenizer with a chat template, and this model's has none. Use "
                "--imsm_anchor_start bos (or auto), or give the tokenizer a chat template."
            )
        return
    find_imsm_tuner(model).anchor_config.start_tokens = user_turn_start(tokenizer)


def run(trl_args: Sequence[Any], imsm_args: IMSMArguments, callbacks: Sequence[TrainerCallback] = ()) -> SFTTrainer:
    """Train, save (and push) as ``main`` of TRL's ``trl/scripts/sft.py`` does, with IMSM; returns the trainer.

    ``trl_args``: ``(script_args, training_args, model_args, dataset_args)`` as :func:`parse_args` returns them;
    ``callbacks``: ``TrainerCallback`` objects to attach besides :class:`~peft_imsm.IMSMLogCallback`.
    """
    from accelerate.logging import get_logger
    from datasets import load_dataset
    from trl import SFTTrainer, get_dataset, get_peft_config, get_quantization_config

    script_args, training_args, model_args, dataset_args = trl_args
    peft_config = wrap_peft_config(get_peft_config(model_args), imsm_args, training_args.seed)
    anchor_texts = load_anchor_texts(imsm_args)  # before the model, so that a bad anchor dataset fails early
    model_init_kwargs = dict(
        revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation, dtype=model_args.dtype,
    )  # fmt: skip
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    if dataset_args.datasets:
        if script_args.dataset_name:
            get_logger(__name__).warning(
                "Both `datasets` and `dataset_name` are provided. The `datasets` argument will be used to load the "
                "dataset and `dataset_name` will be ignored."
            )
        dataset = get_dataset(dataset_args)
    elif script_args.dataset_name:
        dataset = load_dataset(
            script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
        )
    else:
        raise ValueError("Either `datasets` or `dataset_name` must be provided.")
    trainer = SFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=peft_config,
        callbacks=[IMSMLogCallback(), *callbacks],
    )
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    _start_anchors_from_chat(trainer.model, tokenizer, imsm_args)
    if anchor_texts is not None:
        set_anchor_data(trainer.model, anchor_texts, tokenizer, column=imsm_args.imsm_anchor_dataset_column)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("✅ Training completed.")
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"💾 Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"🤗 Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")
    trainer.end()  # (TRL's main does this on transformers >= 5.18; peft-imsm needs >= 5.20)
    return trainer


def launch(argv: Sequence[str], yaml_launch_args: Sequence[str], cli_launch_args: Sequence[str]) -> None:
    """Start ``python -m peft_imsm.sft`` through ``accelerate launch`` with the launch options, as ``trl sft`` does
    (``--accelerate_config NAME`` resolves to TRL's bundled accelerate configs)."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    script_argv, rest = [], iter(cli_launch_args)  # argv without the (ordered) command-line launch options
    current = next(rest, None)
    for item in argv:
        if current is not None and item == current:
            current = next(rest, None)
        else:
            script_argv.append(item)
    launch_argv = resolve_accelerate_config_argument([*yaml_launch_args, *cli_launch_args])
    launch_command(launch_command_parser().parse_args([*launch_argv, "-m", "peft_imsm.sft", *script_argv]))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``imsm-sft`` and ``python -m peft_imsm.sft``: parse and check, then launch or train."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parsed = parse_args(argv)
    if parsed.yaml_launch_args or parsed.cli_launch_args:
        return launch(argv, parsed.yaml_launch_args, parsed.cli_launch_args)
    try:
        run(parsed.trl_args, parsed.imsm_args)
    except IMSMArgumentError as err:  # e.g. an --imsm_anchor_dataset that does not load (before the model loads)
        sys.stderr.write(f"{PROG}: error: {err}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
