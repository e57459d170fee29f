"""``imsm-sft``: TRL's own SFT script (``trl sft``) with IMSM wrapped around the adapter it builds.

Every argument and YAML key of ``trl sft`` in the installed TRL works unchanged (its ``ScriptArguments``,
``SFTConfig``, ``ModelConfig``, dataset-mixture arguments and ``--config recipe.yaml``, taken from TRL's own
``trl.scripts.sft.make_parser``), plus IMSM's own arguments, all prefixed ``--imsm_`` so they cannot clash with
TRL's (see :class:`IMSMArguments`, or ``imsm-sft --help``)::

    trl sft      --model_name_or_path M --dataset_name D --use_peft --lora_r 16 --output_dir out
    imsm-sft     --model_name_or_path M --dataset_name D --use_peft --lora_r 16 --output_dir out --imsm_gate_rank 8
    imsm-sft     --config examples/recipes/sft_imsm_lora.yaml
    accelerate launch --num_processes 2 -m peft_imsm.sft --config recipe.yaml

How it reuses TRL's script rather than forking it: training runs in TRL's own ``trl.scripts.sft.main``, which
loads the model, the tokenizer and the dataset, builds ``SFTTrainer``, trains, saves and pushes exactly as
``trl sft`` does. That function takes its peft config from ``trl.get_peft_config(model_args)`` (which only ever
returns a ``LoraConfig``) and builds ``trl.SFTTrainer`` without callbacks. While it runs, and only then,
:func:`_imsm_inside_trl_sft` substitutes those two names in the ``trl`` namespace: ``get_peft_config`` returns TRL's
own ``LoraConfig`` wrapped in :class:`~peft_imsm.IMSMConfig`, and ``SFTTrainer`` is a subclass that attaches
:class:`~peft_imsm.IMSMLogCallback` (IMSM's figures in the Trainer's logs) and, for ``--imsm_anchor_source data``,
gives the model its anchor texts. Nothing else of TRL is touched, and both names are restored afterwards.

Like ``trl sft``, options that belong to ``accelerate launch`` (``--num_processes 2``, ``--accelerate_config
zero2``, ...; on the command line or as YAML keys) make ``imsm-sft`` start itself through ``accelerate launch``
(as ``accelerate launch <those options> -m peft_imsm.sft <the rest>``). Without them it trains in this process.

IMSM's arguments (and ``--use_peft``, which IMSM needs: it wraps an adapter) are checked before any model, tokenizer
or dataset is loaded; a bad value or an unknown ``--imsm_*`` flag exits with a message that says what to change.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from . import AnchorConfig, IMSMConfig, IMSMLogCallback, set_anchor_data
from .anchors import ANCHOR_SOURCES, user_turn_start
from .gate import GATE_MODES
from .model import find_imsm_tuner

if TYPE_CHECKING:
    from peft import PeftConfig
    from transformers import TrainerCallback
    from trl import SFTTrainer, TrlParser

PROG = "imsm-sft"
# argparse would list all ~250 options of TRL's dataclasses in the usage line of every error message.
USAGE = f"{PROG} [-h] [--config RECIPE.yaml] [trl sft arguments ...] [--imsm_* arguments ...]"
# Environment variables set by `accelerate launch` (and torchrun) in the processes they start.
_LAUNCHED_ENV = ("ACCELERATE_MIXED_PRECISION", "LOCAL_RANK", "WORLD_SIZE")
_DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


@dataclass
class IMSMArguments:
    """IMSM's arguments of ``imsm-sft`` (the fields of :class:`~peft_imsm.IMSMConfig` and
    :class:`~peft_imsm.AnchorConfig`, prefixed ``imsm_``). The wrapped adapter is TRL's own: ``--use_peft
    --lora_r --lora_alpha --lora_dropout --lora_target_modules --use_dora --use_rslora --lora_modules_to_save``."""

    imsm_gate_rank: int = field(
        default=8,
        metadata={
            "help": "Rank r of IMSM's gate projection (W_A: 4d x r, W_B: r x d); an integer >= 1. The paper uses 8."
        },
    )
    imsm_gate_mode: Literal["query", "token", "fixed"] = field(
        default="query",
        metadata={
            "help": "IMSM gate: 'query' (the paper's query-aware gate), 'token' (the 'w/o query' ablation) or 'fixed' "
            "(the 'w/o gate' ablation: a constant 0.5/0.5 mix of the frozen and the adapted view)."
        },
    )
    imsm_gate_dropout: float = field(default=0.1, metadata={"help": "Dropout after each gate projection, in [0, 1)."})
    imsm_anchor: bool = field(
        default=False,
        metadata={
            "help": "Add IMSM's self-anchored gate (beyond the paper; recommended): weight * KL(p_frozen || p_imsm) "
            "on a small batch of anchor sequences every --imsm_anchor_every training steps, so the gate and the "
            "adapter learn what 'not the target task' looks like. The other --imsm_anchor_* arguments need this flag."
        },
    )
    imsm_anchor_source: Literal["self", "data"] = field(
        default="self",
        metadata={
            "help": "Where the anchors come from: 'self' (sampled from the frozen model before the first step, no "
            "data needed) or 'data' (the texts of --imsm_anchor_dataset)."
        },
    )
    imsm_anchor_weight: float = field(
        default=1.0, metadata={"help": "Factor of the anchor KL term in the loss; a number >= 0."}
    )
    imsm_anchor_train_adapter: bool = field(
        default=True,
        metadata={
            "help": "Let the adapter learn from the anchor term too ('gate+adapter', the default and the recommended "
            "setting); false: only the gate does ('gate only': cheaper per anchored step, keeps less)."
        },
    )
    imsm_anchor_batch_size: int = field(default=4, metadata={"help": "Anchors per anchored step (per device)."})
    imsm_anchor_every: int = field(
        default=4,
        metadata={
            "help": "Run the anchor term on every k-th training forward only, weighted k x there: the same weight on "
            "average for 1/k of its cost (AnchorConfig.every). 4 (the default) is the recommended setting; 1 runs it "
            "on every forward (measured effects: docs/anchors.md)."
        },
    )
    imsm_anchor_num_samples: int = field(
        default=32, metadata={"help": "Number of anchors sampled from the frozen model (source 'self')."}
    )
    imsm_anchor_sample_length: int = field(
        default=16, metadata={"help": "New tokens per sampled anchor (source 'self')."}
    )
    imsm_anchor_start: Literal["auto", "chat", "bos", "random"] = field(
        default="auto",
        metadata={
            "help": "Where sampled anchors start: 'chat' (the chat template's user turn, so anchors look like the "
            "prompts an instruct model answers; the recommended start for instruct models), "
            "'bos' (the BOS token), 'random' (random token ids; for models without a BOS token), or 'auto' "
            "(default: 'chat' when the tokenizer has a chat template, else 'bos')."
        },
    )
    imsm_anchor_temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature of sampled anchors (source 'self'); > 0."}
    )
    imsm_anchor_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of anchor sampling and batching (+ the process rank); default: the training --seed."},
    )
    imsm_anchor_max_length: int = field(
        default=64, metadata={"help": "Anchor texts are truncated to this many tokens (source 'data')."}
    )
    imsm_anchor_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Anchor texts for source 'data': a local .jsonl/.json/.csv/.parquet/.txt file, or a dataset "
            "name or folder for datasets.load_dataset."
        },
    )
    imsm_anchor_dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration name of --imsm_anchor_dataset (load_dataset's `name`)."}
    )
    imsm_anchor_dataset_split: str = field(default="train", metadata={"help": "Split of --imsm_anchor_dataset."})
    imsm_anchor_dataset_column: str = field(
        default="text", metadata={"help": "Column of --imsm_anchor_dataset that holds the anchor texts."}
    )


# The anchor arguments that only mean something with --imsm_anchor (all but the on/off flag itself).
_ANCHOR_FIELDS = tuple(f.name for f in fields(IMSMArguments) if f.name.startswith("imsm_anchor_"))


class IMSMArgumentError(ValueError):
    """A bad ``imsm-sft`` argument; the message names the flag and what to do."""


def make_parser(prog: str | None = PROG) -> TrlParser:
    """TRL's own ``trl sft`` parser's dataclasses (from ``trl.scripts.sft.make_parser``) plus :class:`IMSMArguments`."""
    from trl import TrlParser
    from trl.scripts.sft import make_parser as trl_make_parser

    trl_types = tuple(trl_make_parser().dataclass_types)
    return TrlParser((*trl_types, IMSMArguments), prog=prog, usage=USAGE)


def is_launched() -> bool:
    """Whether this process was started by ``accelerate launch`` (or torchrun)."""
    return any(name in os.environ for name in _LAUNCHED_ENV)


def _unknown_imsm_flag_error(unknown: Sequence[str]) -> str | None:
    names = [f"--{f.name}" for f in fields(IMSMArguments)]
    bad = [s for s in unknown if s.startswith("--imsm")]
    if not bad:
        return None
    lines = []
    for flag in bad:
        key = "--" + flag.split("=", 1)[0][2:].replace("-", "_")
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        lines.append(f"unknown IMSM argument {key}{hint}")
    return "; ".join(lines) + f". The IMSM arguments are: {' '.join(names)} (see {PROG} --help)."


def check_arguments(model_args: Any, imsm_args: IMSMArguments) -> None:
    """Check IMSM's arguments and ``--use_peft``; raises :class:`IMSMArgumentError` naming the flag to change.

    Runs before anything is loaded. Values from a YAML recipe get here without argparse's checks, so every check is
    done here again.
    """
    a = imsm_args
    if not getattr(model_args, "use_peft", False):
        raise IMSMArgumentError(
            "IMSM wraps a peft adapter, but --use_peft is not set. Add --use_peft (YAML: `use_peft: true`) and the "
            "LoRA settings as for `trl sft` (--lora_r, --lora_alpha, --lora_target_modules, --use_dora, ...)."
        )
    if isinstance(a.imsm_gate_rank, bool) or not isinstance(a.imsm_gate_rank, int) or a.imsm_gate_rank < 1:
        raise IMSMArgumentError(
            f"--imsm_gate_rank must be an integer >= 1 (the paper uses 8), got {a.imsm_gate_rank!r}."
        )
    if a.imsm_gate_mode not in GATE_MODES:
        raise IMSMArgumentError(
            f"--imsm_gate_mode {a.imsm_gate_mode!r} is not a gate mode; choose one of {', '.join(GATE_MODES)}."
        )
    if not isinstance(a.imsm_gate_dropout, (int, float)) or not 0.0 <= float(a.imsm_gate_dropout) < 1.0:
        raise IMSMArgumentError(f"--imsm_gate_dropout must be in [0, 1), got {a.imsm_gate_dropout!r}.")
    if not a.imsm_anchor:
        defaults = IMSMArguments()
        changed = [f"--{n}" for n in _ANCHOR_FIELDS if getattr(a, n) != getattr(defaults, n)]
        if changed:
            raise IMSMArgumentError(
                f"{', '.join(changed)} set, but the anchor term is off. Add --imsm_anchor (YAML: `imsm_anchor: "
                "true`) to use it, or remove these arguments."
            )
        return
    if a.imsm_anchor_source not in ANCHOR_SOURCES:
        raise IMSMArgumentError(
            f"--imsm_anchor_source {a.imsm_anchor_source!r} is not an anchor source; choose one of "
            f"{', '.join(ANCHOR_SOURCES)}."
        )
    if isinstance(a.imsm_anchor_weight, bool) or not isinstance(a.imsm_anchor_weight, (int, float)):
        raise IMSMArgumentError(f"--imsm_anchor_weight must be a number >= 0, got {a.imsm_anchor_weight!r}.")
    if a.imsm_anchor_weight < 0:
        raise IMSMArgumentError(
            f"--imsm_anchor_weight must be >= 0 (it multiplies a KL divergence that the loss minimises), got "
            f"{a.imsm_anchor_weight!r}."
        )
    for name in ("batch_size", "every", "num_samples", "sample_length", "max_length"):
        value = getattr(a, f"imsm_anchor_{name}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise IMSMArgumentError(f"--imsm_anchor_{name} must be an integer >= 1, got {value!r}.")
    if a.imsm_anchor_source == "data" and not a.imsm_anchor_dataset:
        raise IMSMArgumentError(
            "--imsm_anchor_source data needs anchor texts: set --imsm_anchor_dataset to a .jsonl/.json/.csv/.parquet/"
            ".txt file or a dataset name (and --imsm_anchor_dataset_column, default 'text')."
        )
    if a.imsm_anchor_source == "self" and a.imsm_anchor_dataset:
        raise IMSMArgumentError(
            "--imsm_anchor_dataset is only read with --imsm_anchor_source data (the default source 'self' samples "
            "anchors from the frozen model). Add --imsm_anchor_source data, or remove --imsm_anchor_dataset."
        )
    # Anything AnchorConfig checks beyond the above (e.g. the temperature).
    try:
        anchor_config(imsm_args, seed=0)
    except (TypeError, ValueError) as err:
        raise IMSMArgumentError(f"Invalid --imsm_anchor_* settings: {err}") from err


def anchor_config(imsm_args: IMSMArguments, seed: int) -> AnchorConfig | None:
    """The :class:`~peft_imsm.AnchorConfig` the arguments describe (None without ``--imsm_anchor``)."""
    a = imsm_args
    if not a.imsm_anchor:
        return None
    return AnchorConfig(
        source=a.imsm_anchor_source,
        weight=float(a.imsm_anchor_weight),
        batch_size=a.imsm_anchor_batch_size,
        every=a.imsm_anchor_every,
        num_samples=a.imsm_anchor_num_samples,
        sample_length=a.imsm_anchor_sample_length,
        start=a.imsm_anchor_start if a.imsm_anchor_start in ("bos", "random") else "bos",  # chat: set by the trainer
        temperature=float(a.imsm_anchor_temperature),
        seed=seed if a.imsm_anchor_seed is None else a.imsm_anchor_seed,
        train_adapter=bool(a.imsm_anchor_train_adapter),
        max_length=a.imsm_anchor_max_length,
    )


def wrap_peft_config(adapter_config: PeftConfig | None, imsm_args: IMSMArguments, seed: int = 0) -> IMSMConfig:
    """Wrap the adapter config TRL built from its own flags (``trl.get_peft_config(model_args)``) in ``IMSMConfig``."""
    if adapter_config is None:
        raise IMSMArgumentError("IMSM wraps a peft adapter, but --use_peft is not set. Add --use_peft.")
    return IMSMConfig(
        adapter_config=adapter_config,
        gate_rank=imsm_args.imsm_gate_rank,
        gate_mode=imsm_args.imsm_gate_mode,
        gate_dropout=float(imsm_args.imsm_gate_dropout),
        anchor=anchor_config(imsm_args, seed),
    )


def load_anchor_texts(imsm_args: IMSMArguments) -> Any:
    """The ``datasets.Dataset`` of anchor texts of ``--imsm_anchor_dataset`` (None unless source is 'data')."""
    a = imsm_args
    if not a.imsm_anchor or a.imsm_anchor_source != "data":
        return None
    from datasets import load_dataset

    path = a.imsm_anchor_dataset
    builder = _DATA_FILE_BUILDERS.get(os.path.splitext(path)[1].lower()) if os.path.isfile(path) else None
    try:
        if builder is not None:
            data = load_dataset(builder, data_files=path, split=a.imsm_anchor_dataset_split)
        else:
            data = load_dataset(path, name=a.imsm_anchor_dataset_config, split=a.imsm_anchor_dataset_split)
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


@contextlib.contextmanager
def _imsm_inside_trl_sft(
    imsm_args: IMSMArguments,
    seed: int,
    anchor_texts: Any = None,
    callbacks: Sequence[TrainerCallback] = (),
    trainers: list | None = None,
) -> Iterator[None]:
    """The one patch of TRL: while TRL's ``trl.scripts.sft.main`` runs, it finds IMSM's ``get_peft_config`` and
    ``SFTTrainer`` in the ``trl`` namespace.

    Why: that function imports both from ``trl`` when it runs; its ``get_peft_config`` only ever returns a
    ``LoraConfig`` and its ``SFTTrainer`` gets no callbacks, so without this IMSM cannot be used from TRL's script.
    The substitutes wrap TRL's own objects (TRL's ``LoraConfig`` inside ``IMSMConfig``; a subclass of TRL's
    ``SFTTrainer``); the originals are restored on exit. ``trainers`` (if given) receives the trainer.
    """
    import trl

    trl_get_peft_config = trl.get_peft_config
    trl_sft_trainer = trl.SFTTrainer

    def get_peft_config(model_args: Any) -> IMSMConfig:
        return wrap_peft_config(trl_get_peft_config(model_args), imsm_args, seed)

    class IMSMSFTTrainer(trl_sft_trainer):
        """TRL's ``SFTTrainer`` with IMSM's log callback (and anchor texts, for ``--imsm_anchor_source data``)."""

        def __init__(self, *args: Any, callbacks: list | None = None, **kwargs: Any) -> None:
            callbacks = [*(callbacks or []), IMSMLogCallback(), *extra_callbacks]
            super().__init__(*args, callbacks=callbacks, **kwargs)
            tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
            _start_anchors_from_chat(self.model, tokenizer, imsm_args)
            if anchor_texts is not None:
                set_anchor_data(self.model, anchor_texts, tokenizer, column=imsm_args.imsm_anchor_dataset_column)
            if trainers is not None:
                trainers.append(self)

    extra_callbacks = list(callbacks)
    trl.get_peft_config = get_peft_config
    trl.SFTTrainer = IMSMSFTTrainer
    try:
        yield
    finally:
        trl.get_peft_config = trl_get_peft_config
        trl.SFTTrainer = trl_sft_trainer


def _start_anchors_from_chat(model: Any, tokenizer: Any, imsm_args: IMSMArguments) -> None:
    """``--imsm_anchor_start chat`` (or ``auto`` with a chat template): self anchors start from the tokenizer's
    user turn. Set on the model's anchor config before the first training step samples them (and saved with it)."""
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
    find_imsm_tuner(model).anchor_config.start_tokens = user_turn_start(tokenizer)  # (as AnchorConfig.from_tokenizer)


class ParsedArguments(NamedTuple):
    """What :func:`parse_args` returns."""

    trl_args: tuple[Any, ...]
    """The dataclasses of TRL's ``trl sft`` parser (``ScriptArguments, SFTConfig, ModelConfig,
    DatasetMixtureConfig``), in the order of TRL's ``main``."""
    imsm_args: IMSMArguments
    yaml_launch_args: list[str]
    """YAML keys that no dataclass takes, as ``["--key", "value", ...]``: ``trl sft`` gives them to ``accelerate
    launch``."""
    cli_launch_args: list[str]
    """Command-line arguments that no dataclass takes (idem)."""


def parse_args(argv: Sequence[str] | None = None, parser: TrlParser | None = None) -> ParsedArguments:
    """Parse ``imsm-sft``'s arguments (command line and ``--config`` YAML) and check them.

    Arguments that none of the dataclasses takes are ``accelerate launch`` options, as for ``trl sft``; in a process
    that ``accelerate launch`` started, an unknown command-line argument is an error and leftover YAML keys (already
    used by the launcher) are dropped. An unknown ``--imsm_*`` argument is always an error. Exits with status 2 and a
    message on a bad argument, as argparse does.
    """
    parser = parser or make_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        *parsed, config_remaining, cli_remaining = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except ValueError as err:  # e.g. a YAML file that is not a mapping, or a bad value TRL's dataclasses refuse
        parser.error(str(err))
    *trl_args, imsm_args = parsed
    message = _unknown_imsm_flag_error([*config_remaining, *cli_remaining])
    if message:
        parser.error(message)
    if is_launched():
        if cli_remaining:
            parser.error(
                f"unrecognized arguments: {' '.join(cli_remaining)}. {PROG} takes the arguments of `trl sft` and the "
                f"--imsm_* arguments (see {PROG} --help); options of `accelerate launch` go before `-m peft_imsm.sft`."
            )
        # YAML keys that `trl sft` gives to `accelerate launch`: this process was launched, they are used already.
        config_remaining = []
    model_args = next(a for a in trl_args if hasattr(a, "use_peft"))
    try:
        check_arguments(model_args, imsm_args)
        # Build the whole config once now (TRL's LoraConfig from TRL's flags, wrapped): its own checks fail here too,
        # before anything is loaded, rather than inside TRL's script.
        from trl import get_peft_config

        wrap_peft_config(get_peft_config(model_args), imsm_args)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    return ParsedArguments(tuple(trl_args), imsm_args, list(config_remaining), list(cli_remaining))


def run(
    trl_args: Sequence[Any],
    imsm_args: IMSMArguments,
    callbacks: Sequence[TrainerCallback] = (),
) -> SFTTrainer:
    """Run TRL's SFT script (``trl.scripts.sft.main``) with IMSM; returns the trainer after training and saving.

    Args:
        trl_args: ``(script_args, training_args, model_args, dataset_args)`` as :func:`parse_args` returns them.
        imsm_args: IMSM's arguments (checked again here).
        callbacks: extra ``TrainerCallback`` objects to attach besides :class:`~peft_imsm.IMSMLogCallback`.
    """
    from trl.scripts.sft import main as trl_sft_main

    training_args = next(a for a in trl_args if hasattr(a, "output_dir"))
    model_args = next(a for a in trl_args if hasattr(a, "use_peft"))
    check_arguments(model_args, imsm_args)
    anchor_texts = load_anchor_texts(imsm_args)  # before the model, so a bad anchor dataset fails early
    trainers: list = []
    with _imsm_inside_trl_sft(imsm_args, training_args.seed, anchor_texts, callbacks, trainers):
        trl_sft_main(*trl_args)
    if not trainers:
        raise RuntimeError("TRL's SFT script did not build its SFTTrainer through trl.SFTTrainer; IMSM was not used.")
    return trainers[0]


def launch(argv: Sequence[str], yaml_launch_args: Sequence[str], cli_launch_args: Sequence[str]) -> None:
    """Start ``python -m peft_imsm.sft`` through ``accelerate launch`` with the launch options, as ``trl sft`` does
    (TRL's ``--accelerate_config NAME`` resolves to TRL's bundled accelerate configs)."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    script_argv = _subtract_subsequence(list(argv), list(cli_launch_args))
    launch_argv = resolve_accelerate_config_argument([*yaml_launch_args, *cli_launch_args])
    launch_command(launch_command_parser().parse_args([*launch_argv, "-m", "peft_imsm.sft", *script_argv]))


def _subtract_subsequence(items: list[str], subsequence: list[str]) -> list[str]:
    """``items`` without the ordered ``subsequence`` (the command-line launch options; YAML ones are not in argv)."""
    rest, it = [], iter(subsequence)
    current = next(it, None)
    for item in items:
        if current is not None and item == current:
            current = next(it, None)
        else:
            rest.append(item)
    return rest


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``imsm-sft`` and ``python -m peft_imsm.sft``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parsed = parse_args(argv)
    if parsed.yaml_launch_args or parsed.cli_launch_args:
        launch(argv, parsed.yaml_launch_args, parsed.cli_launch_args)
        return
    try:
        run(parsed.trl_args, parsed.imsm_args)
    except IMSMArgumentError as err:  # e.g. an --imsm_anchor_dataset that does not load (before the model loads)
        sys.stderr.write(f"{PROG}: error: {err}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
