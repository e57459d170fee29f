"""``imsm-sft``: TRL's SFT script (``trl sft``) with IMSM wrapped around the adapter that TRL's flags describe.

Every argument and YAML key of ``trl sft`` works unchanged, plus IMSM's own, prefixed ``--imsm_``
(:class:`~peft_imsm.sft_arguments.IMSMArguments`; in detail in docs/reference.md)::

    imsm-sft --model_name_or_path M --dataset_name D --use_peft --lora_r 16 --output_dir out --imsm_anchor
    imsm-sft --config examples/recipes/sft_imsm_lora.yaml
    accelerate launch --num_processes 2 -m peft_imsm.sft --config recipe.yaml

:func:`parse_args` checks every argument before anything loads, IMSM's once: ``wrap_peft_config`` builds the
``IMSMConfig`` around the adapter config of TRL's flags, re-wording its errors to name the flags;
:func:`check_output_dir_is_safe` refuses an ``--output_dir`` whose files TRL would overwrite (the base model's
folder, the working folder or one of its parents). :func:`run` does
what ``main`` of TRL's ``trl/scripts/sft.py`` does, through TRL's public API, except that ``SFTTrainer`` gets that
``peft_config`` and ``callbacks=[IMSMLogCallback()]``; nothing in ``trl`` is replaced. As ``trl sft`` does,
:func:`main` hands ``accelerate launch`` options (``--num_processes 2``, ``--accelerate_config zero2``, ...; flags or
YAML keys) to ``accelerate launch <those options> -m peft_imsm.sft <the rest>``.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Any, NamedTuple

from . import IMSMConfig, IMSMLogCallback, set_anchor_data
from .extras import require
from .output_dirs import OutputDirError, check_not_protected
from .sft_arguments import (
    IMSMArgumentError,
    IMSMArguments,
    load_anchor_texts,
    start_anchors_from_chat,
    wrap_peft_config,
)

if TYPE_CHECKING:
    from transformers import TrainerCallback
    from trl import SFTTrainer, TrlParser

PROG = "imsm-sft"
# argparse would list all ~250 options of TRL's dataclasses in the usage line of every error message.
USAGE = f"{PROG} [-h] [--config RECIPE.yaml] [trl sft arguments ...] [--imsm_* arguments ...]"
DESCRIPTION = "TRL's `trl sft` with IMSM around its adapter. The --imsm_* arguments: docs/reference.md (imsm-sft)."
_LAUNCHED_ENV = ("ACCELERATE_MIXED_PRECISION", "LOCAL_RANK", "WORLD_SIZE")  # set by `accelerate launch` / torchrun


class ParsedArguments(NamedTuple):
    """What :func:`parse_args` returns; the launch options are the arguments (YAML keys, command line) that no
    dataclass takes, for ``accelerate launch``."""

    trl_args: tuple[Any, ...]  # (script_args, training_args, model_args, dataset_args)
    imsm_args: IMSMArguments
    peft_config: IMSMConfig  # built from imsm_args around trl.get_peft_config(model_args)
    yaml_launch_args: list[str]
    cli_launch_args: list[str]


def make_parser() -> TrlParser:
    """The parser of ``imsm-sft``: TRL's ``trl sft`` dataclasses plus :class:`IMSMArguments`."""
    require("trl", PROG)
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser

    types = (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig, IMSMArguments)
    return TrlParser(types, prog=PROG, usage=USAGE, description=DESCRIPTION)


def parse_args(argv: Sequence[str] | None = None) -> ParsedArguments:
    """Parse and check ``imsm-sft``'s arguments (command line and ``--config`` YAML) before anything loads; a bad one
    exits with status 2 and a message, as argparse does. In a process that ``accelerate launch`` started, leftover
    YAML keys (the launcher's) are dropped and an unknown command-line argument is an error."""
    require("trl", PROG)
    from trl import get_peft_config

    parser = make_parser()
    launched = any(name in os.environ for name in _LAUNCHED_ENV)
    try:
        *trl_args, imsm_args, yaml_rest, cli_rest = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
        names = [f"--{f.name}" for f in fields(IMSMArguments)]
        unknown = [
            f"--{s[2:].split('=')[0].replace('-', '_')}" for s in yaml_rest + cli_rest if s.startswith("--imsm")
        ]
        if unknown:
            close = {flag: difflib.get_close_matches(flag, names, n=1, cutoff=0.6) for flag in unknown}
            said = [f"unknown IMSM argument {f}" + (f" (did you mean {c[0]}?)" if c else "") for f, c in close.items()]
            raise IMSMArgumentError(
                f"{'; '.join(said)}. The IMSM arguments are: {' '.join(names)} (see {PROG} --help)."
            )
        if launched and cli_rest:
            raise IMSMArgumentError(
                f"unrecognized arguments: {' '.join(cli_rest)}. {PROG} takes the arguments of `trl sft` and the "
                f"--imsm_* arguments (see {PROG} --help); options of `accelerate launch` go before `-m peft_imsm.sft`."
            )
        _, training_args, model_args, _ = trl_args
        check_output_dir_is_safe(training_args.output_dir, model_args.model_name_or_path)
        peft_config = wrap_peft_config(get_peft_config(model_args), imsm_args, training_args.seed)
    except (TypeError, ValueError) as err:  # also a YAML file that is not a mapping, or a value TRL's classes refuse
        parser.error(str(err))
    return ParsedArguments(tuple(trl_args), imsm_args, peft_config, [] if launched else yaml_rest, cli_rest)


def check_output_dir_is_safe(output_dir: str | None, model_name_or_path: str | None) -> None:
    """Refuse an ``--output_dir`` whose files TRL would overwrite: TRL writes its model card (``README.md``), the
    tokenizer and the adapter into ``output_dir`` (replacing files of those names), so not the base model's folder,
    nor the working folder, one of its parents, the home folder or a root. Anything else is TRL's usual output folder
    (it only adds files there, and with ``--save_total_limit`` deletes its own older ``checkpoint-*`` folders)."""
    if not output_dir:
        return
    base = model_name_or_path if model_name_or_path and os.path.isdir(model_name_or_path) else None
    try:
        check_not_protected(output_dir, {"base model folder (--model_name_or_path)": base}, name="--output_dir",
                            nested=False)  # fmt: skip
    except OutputDirError as exc:
        raise OutputDirError(
            f"{exc} (TRL writes README.md, the tokenizer and the adapter into --output_dir, replacing files of those "
            "names.)"
        ) from None


def run(
    trl_args: Sequence[Any],
    imsm_args: IMSMArguments,
    peft_config: IMSMConfig,
    callbacks: Sequence[TrainerCallback] = (),
) -> SFTTrainer:
    """Train, save (and push) as ``main`` of TRL's ``trl/scripts/sft.py`` does, with IMSM; returns the trainer.

    The arguments as :func:`parse_args` returns them; ``callbacks``: ``TrainerCallback`` objects to attach besides
    :class:`~peft_imsm.IMSMLogCallback`.
    """
    require("trl", PROG)
    require("datasets", PROG)
    from accelerate.logging import get_logger
    from datasets import load_dataset
    from trl import SFTTrainer, get_dataset, get_quantization_config

    script_args, training_args, model_args, dataset_args = trl_args
    anchor_texts = load_anchor_texts(imsm_args)  # before the model, so that a bad anchor dataset fails early
    model_init_kwargs = dict(
        revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation, dtype=model_args.dtype,
    )  # fmt: skip
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    if dataset_args.datasets and script_args.dataset_name:
        get_logger(__name__).warning(
            "Both `datasets` and `dataset_name` are provided. The `datasets` argument will be used to load the "
            "dataset and `dataset_name` will be ignored."
        )
    if dataset_args.datasets:
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
    start_anchors_from_chat(trainer.model, tokenizer, imsm_args)
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


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``imsm-sft`` and ``python -m peft_imsm.sft``: parse and check, then launch or train."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        require("trl", PROG)
    except ImportError as err:  # (a command: the message, not a traceback)
        raise SystemExit(f"{PROG}: error: {err}") from None
    parsed = parse_args(argv)
    if parsed.yaml_launch_args or parsed.cli_launch_args:  # as `trl sft`; --accelerate_config NAME: TRL's configs
        from accelerate.commands.launch import launch_command, launch_command_parser
        from trl.cli.accelerate_config import resolve_accelerate_config_argument

        script_argv, launch_options = [], iter(parsed.cli_launch_args)  # argv less the (ordered) launch options
        option = next(launch_options, None)
        for item in argv:
            if option is not None and item == option:
                option = next(launch_options, None)
            else:
                script_argv.append(item)
        launch_argv = resolve_accelerate_config_argument(parsed.yaml_launch_args + parsed.cli_launch_args)
        return launch_command(launch_command_parser().parse_args([*launch_argv, "-m", "peft_imsm.sft", *script_argv]))
    try:
        run(parsed.trl_args, parsed.imsm_args, parsed.peft_config)
    except IMSMArgumentError as err:  # e.g. an --imsm_anchor_dataset that does not load (before the model loads)
        sys.stderr.write(f"{PROG}: error: {err}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
