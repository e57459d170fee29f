"""``imsm-export`` of a hard-routed route gate: a folder that vLLM serves with its own multi-LoRA, at LoRA's cost.

A route gate with a ``route_threshold`` (``IMSMConfig``; 0.5 by default) runs, per prompt, either the frozen base
model alone (router value ``g > route_threshold``) or the base + LoRA alone: the model IS one of two ordinary models
per request. So the export needs no plugin (:func:`~imsm_vllm.export_format.is_route_export`;
``peft_imsm.export.export`` sends such adapters here), and what it writes (names from
:mod:`imsm_vllm.export_format`) is:

* the base model's folder: its weights (``*.safetensors`` copied, or written from the loaded model), its
  ``config.json`` unchanged (the base architecture: vLLM's own model), ``generation_config.json``, and the tokenizer
  with its chat template (from the adapter folder when it holds one, else from the base);
* ``lora/``: a plain peft LoRA folder: ``adapter_config.json`` (the wrapped ``LoraConfig``, ``peft_type`` LORA, the
  base's path as ``base_model_name_or_path``) and ``adapter_model.safetensors`` with peft's own keys
  (``base_model.model.<module>.lora_A.weight``, ...), so that ``PeftModel.from_pretrained(base, OUT/lora)`` is the IMSM
  model's adapted view, and vLLM's ``--lora-modules NAME=OUT/lora`` serves it;
* ``router/imsm_router.safetensors``: the router's effective ``W_R`` ``[1, d]`` and ``b_R`` ``[1]`` (float32,
  ``IMSMGate.router()``: ``gate_lr_scale`` folded in);
* ``imsm_route.json``: the format version, the threshold, the LoRA's name and folder, the router file, the
  ``--max-lora-rank`` the LoRA needs, the hidden size, the base architecture, and where the export came from.

``imsm-serve OUT_DIR`` (:mod:`imsm_vllm.router`, in the vLLM environment) serves it: the routing pass (the base
model's mean final hidden state over the prompt, from a vLLM pooling server) picks the base or the LoRA per request.

How: :func:`export_route` loads the base and the IMSM adapter with peft (``peft_imsm.export``'s loader, after its
checks), takes the LoRA's state with peft's own ``get_peft_model_state_dict`` (gate keys left out) and the router
with ``IMSMGate.router()``, writes everything to a temporary folder and moves it into place (as ``export`` does).
:func:`earlier_route_export` / :func:`route_export_writes` let ``--overwrite`` recognise such a folder;
:func:`route_serve_command` is its serving command.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from imsm_vllm.client import DEFAULT_SERVE_ARGS
from imsm_vllm.export_format import (
    LORA_DIR,
    LORA_FILES,
    LORA_NAME,
    ROUTE_CONFIG_FILE,
    ROUTE_FORMAT_VERSION,
    ROUTE_THRESHOLD,
    ROUTER_BIAS,
    ROUTER_FILE,
    ROUTER_WEIGHT,
    is_route_export,
    max_lora_rank,
)

from . import export as _export


def route_threshold(adapter_config: dict) -> float | None:
    """The saved IMSM adapter's ``route_threshold`` (:data:`~imsm_vllm.export_format.ROUTE_THRESHOLD` for a route
    gate saved before the setting existed, or saved as ``"auto"``)."""
    value = adapter_config.get("route_threshold", "auto")
    if value == "auto":
        return ROUTE_THRESHOLD if adapter_config.get("gate_mode") == "route" else None
    return value


def exports_route(adapter_config: dict) -> bool:
    """Whether the saved IMSM adapter (its ``adapter_config.json``) exports to the route format."""
    return is_route_export(adapter_config.get("gate_mode", "query"), route_threshold(adapter_config))


def plain_lora_state(peft_model: Any) -> dict[str, Any]:
    """The wrapped LoRA's weights under peft's own keys (``base_model.model.<module>.lora_A.weight``, no adapter
    name), as ``save_pretrained`` of a plain LoRA model writes them; refuses anything beyond plain LoRA weights."""
    from peft import get_peft_model_state_dict

    state = {}
    for key, value in get_peft_model_state_dict(peft_model).items():
        if "imsm_gate." in key:
            continue
        if ".lora_A." not in key and ".lora_B." not in key:
            raise _export.ExportError(
                f"The IMSM adapter holds `{key}`, which is not a LoRA weight (lora_A / lora_B); the route export "
                "serves plain LoRA with vLLM. Train the adapter without it (e.g. modules_to_save unset)."
            )
        state[key] = value.detach().contiguous()
    return state


def lora_folder_config(peft_model: Any, base_dir: Path) -> Any:
    """The wrapped ``LoraConfig`` as a plain LoRA adapter's config (inference mode, the base's path)."""
    imsm = peft_model.peft_config[peft_model.active_adapter]
    lora = copy.deepcopy(imsm.adapter_config)
    lora.base_model_name_or_path = str(base_dir)
    lora.inference_mode = True
    return lora


def route_config(peft_model: Any, base_config: dict, base_dir: Path, adapter_dir: Path, rank: int) -> dict:
    """The content of ``imsm_route.json``."""
    imsm = peft_model.peft_config[peft_model.active_adapter]
    threshold = getattr(imsm, "route_threshold", ROUTE_THRESHOLD)
    return {
        "format_version": ROUTE_FORMAT_VERSION,
        "gate_mode": "route",
        "threshold": float(threshold),
        "lora_name": LORA_NAME,
        "lora_dir": LORA_DIR,
        "router_file": ROUTER_FILE,
        "lora_rank": rank,
        "max_lora_rank": max_lora_rank(rank),
        "hidden_size": int(base_config["hidden_size"]),
        "base_architecture": base_config["architectures"][0],
        "base_model": str(base_dir),
        "adapter": str(adapter_dir),
    }


def export_route(adapter_dir: Path, out_dir: Path, base_dir: Path, base_config: dict,
                 replaced: Path | None) -> Path:  # fmt: skip
    """Write the route-format folder of the IMSM adapter in ``adapter_dir`` (see the module docstring) to
    ``out_dir``. Called by ``peft_imsm.export.export`` after its checks (``replaced``: the earlier export that
    ``--overwrite`` replaces, or None). Raises ``ExportError``."""
    model, peft_model = _export._load(base_dir, adapter_dir)
    _export.lora_tensors(peft_model)  # (refuses what is not plain LoRA on the decoder layers' linear layers)
    state = plain_lora_state(peft_model)
    rank = max(value.shape[0] for key, value in state.items() if ".lora_A." in key)
    try:
        config = route_config(peft_model, base_config, base_dir, adapter_dir, rank)
    except ValueError as exc:  # (max_lora_rank: a rank vLLM cannot serve)
        raise _export.ExportError(str(exc)) from None
    W_R, b_R = peft_model.base_model.gate.router()

    tmp = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
        tmp.chmod(0o755)  # (mkdtemp makes it private; the served folder is an ordinary model folder)
        _write_base(model, base_dir, adapter_dir, tmp, out_dir)
        lora_dir = tmp / LORA_DIR
        lora_folder_config(peft_model, base_dir).save_pretrained(str(lora_dir))
        save_file(state, str(lora_dir / LORA_FILES[1]), metadata={"format": "pt"})
        router = {ROUTER_WEIGHT: W_R.contiguous(), ROUTER_BIAS: b_R.contiguous()}
        (tmp / ROUTER_FILE).parent.mkdir()
        save_file(router, str(tmp / ROUTER_FILE), metadata={"format": "pt"})
        (tmp / ROUTE_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        _export._move_into_place(tmp, out_dir, replaced)
    except OSError as exc:
        raise _export.ExportError(
            f"Writing {out_dir} failed ({type(exc).__name__}: {exc}); nothing was written. Free space or fix the "
            "permissions there, or pass another OUT_DIR."
        ) from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_base(model: Any, base_dir: Path, adapter_dir: Path, tmp: Path, out_dir: Path) -> None:
    """The base model's files into ``tmp``: weights, ``config.json`` as it is, generation config, tokenizer."""
    from transformers import AutoTokenizer

    weights = sorted(p.name for p in base_dir.iterdir() if p.suffix == ".safetensors")
    if weights:
        _export._copy_files(base_dir, tmp, (*weights, "model.safetensors.index.json"))
    else:  # (e.g. pytorch_model.bin only: write safetensors from the loaded model)
        model.save_pretrained(tmp)
    _export._copy_files(base_dir, tmp, ("config.json", "generation_config.json"))
    token_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    if not _export._copy_files(token_src, tmp, _export.TOKENIZER_FILES):
        try:
            AutoTokenizer.from_pretrained(str(token_src)).save_pretrained(str(tmp))
        except (OSError, ValueError) as exc:
            warnings.warn(
                f"imsm-export: neither {adapter_dir} nor {base_dir} holds a tokenizer ({type(exc).__name__}), so "
                f"{out_dir} has none; serve it with --tokenizer TOKENIZER_PATH added to the command, or save the "
                "tokenizer into the adapter folder (tokenizer.save_pretrained(ADAPTER_DIR)) and export again.",
                stacklevel=3,
            )


def earlier_route_export(folder: Path) -> str | None:
    """None when ``folder`` is a route-format folder that ``imsm-export`` wrote (its ``imsm_route.json`` has a
    ``format_version`` and the router file and LoRA folder are there); else what is missing."""
    try:
        section = json.loads((folder / ROUTE_CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return f"its {ROUTE_CONFIG_FILE} cannot be read"
    if not isinstance(section, dict) or "format_version" not in section:
        return f"its {ROUTE_CONFIG_FILE} has no format_version"
    if not (folder / ROUTER_FILE).is_file():
        return f"it holds no {ROUTER_FILE}"
    if not (folder / LORA_DIR).is_dir():
        return f"it holds no {LORA_DIR}/ folder"
    return None


def route_export_writes(entry: Path) -> bool:
    """Whether a route-format export writes ``entry`` beyond the base model's files: the route config, and the LoRA
    and router folders when they hold only what the export writes there."""
    if entry.is_symlink():
        return False
    if entry.name == ROUTE_CONFIG_FILE:
        return entry.is_file()
    own = {LORA_DIR: (*LORA_FILES, "README.md"), Path(ROUTER_FILE).parent.name: (Path(ROUTER_FILE).name,)}
    if entry.name in own and entry.is_dir():
        return all(p.name in own[entry.name] and p.is_file() and not p.is_symlink() for p in entry.iterdir())
    return False


def route_serve_command(out_dir: str | os.PathLike) -> str:
    """The command that serves a route-format folder: ``imsm-serve`` (:mod:`imsm_vllm.router`) in the vLLM
    environment, with the settings of ``imsm_vllm.client`` (given to both of its vLLM servers) and vLLM's defaults
    otherwise (prefix caching on)."""
    args = [str(out_dir), "--port", "8000", *DEFAULT_SERVE_ARGS]
    return "VLLM_CPU_KVCACHE_SPACE=2 imsm-serve " + shlex.join(args)
