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

How: :func:`export` loads the base model and the adapter with peft (so the weights and scalings are exactly what
``PeftModel.from_pretrained`` gives), :func:`check_exportable` refuses what the plugin cannot run (each error says
the cause, the value and what to do), :func:`lora_tensors` / :func:`gate_tensors` collect the tensors, and the files
are written to a temporary folder renamed to ``OUT_DIR`` at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

FORMAT_VERSION = 1
ARCHITECTURE = "IMSMLlamaForCausalLM"
ADAPTER_FILE = "imsm_adapter.safetensors"
# Base architectures the plugin implements (the Llama layer layout: fused qkv, SwiGLU MLP, RMSNorm, rotary).
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
# Linear layers of a decoder layer that the plugin can give a LoRA update, by their Hugging Face names.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt",
)  # fmt: skip


class ExportError(ValueError):
    """An adapter or base model that ``imsm-export`` cannot turn into a vLLM folder (the message says why)."""


def read_adapter_config(adapter_dir: Path) -> dict:
    """``adapter_config.json`` of an IMSM adapter folder, checked to be IMSM wrapping LoRA."""
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise ExportError(
            f"{adapter_dir} holds no adapter_config.json: it is not a saved peft adapter. Pass the folder that "
            "`model.save_pretrained(...)` of an IMSM model wrote (adapter_config.json + adapter_model.safetensors)."
        )
    config = json.loads(path.read_text())
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
    return config


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
            key = f"imsm.lora.{name}"
            out[f"{key}.lora_A"] = module.lora_A[adapter_name].weight.detach().float().contiguous()
            out[f"{key}.lora_B"] = module.lora_B[adapter_name].weight.detach().float().contiguous()
            out[f"{key}.scaling"] = torch.tensor([float(module.scaling[adapter_name])], dtype=torch.float32)
    if not out:
        raise ExportError("The IMSM adapter's LoRA adapts no layer of the base model: nothing to export.")
    return out


def gate_tensors(peft_model: Any) -> dict[str, torch.Tensor]:
    """``imsm.gate.W_A`` / ``imsm.gate.W_B`` (``imsm.gate.W_R`` / ``imsm.gate.b_R`` for ``gate_mode="route"``), the
    active gate's effective weights (``IMSMGate.projections`` / ``router``: with ``gate_lr_scale`` folded in); none
    for ``gate_mode="fixed"``."""
    gate = peft_model.base_model.gate
    router = gate.router()
    if router is not None:
        return {"imsm.gate.W_R": router[0].contiguous(), "imsm.gate.b_R": router[1].contiguous()}
    projections = gate.projections()
    if projections is None:
        return {}
    W_A, W_B = projections
    return {"imsm.gate.W_A": W_A.contiguous(), "imsm.gate.W_B": W_B.contiguous()}


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


def export(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, base: str | None = None,
           overwrite: bool = False) -> Path:  # fmt: skip
    """Write the vLLM folder of the IMSM adapter in ``adapter_dir`` to ``out_dir`` (see the module docstring).

    Args:
        adapter_dir: a folder written by ``save_pretrained`` of an IMSM model (IMSM wrapping LoRA).
        out_dir: the folder to write; it must not exist or be empty (or ``overwrite``).
        base: the base model's folder (default: the adapter's ``base_model_name_or_path``).

    Returns the written folder. Raises :class:`ExportError` for what cannot be exported.
    """
    from peft import PeftModel  # (IMSM is registered with peft: this module's package, peft_imsm, did it)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    adapter_config = read_adapter_config(adapter_dir)
    base_dir = _local_folder(_resolve_base(adapter_config, base))
    if not (base_dir / "config.json").is_file():
        raise ExportError(f"The base model folder {base_dir} holds no config.json; pass a Hugging Face model folder.")
    base_config = json.loads((base_dir / "config.json").read_text())
    check_exportable(adapter_config, base_config)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty; pass a new folder (or --overwrite to replace it).")

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="auto")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    tmp.chmod(0o755)  # (mkdtemp makes it private; the served folder is an ordinary model folder)
    try:
        weights = sorted(p.name for p in base_dir.iterdir() if p.suffix == ".safetensors")
        if weights:
            _copy_files(base_dir, tmp, (*weights, "model.safetensors.index.json"))
        else:  # (e.g. pytorch_model.bin only: write safetensors from the loaded model)
            model.save_pretrained(tmp)
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
        imsm = peft_model.peft_config[peft_model.active_adapter]
        tensors = lora_tensors(peft_model)
        tensors.update(gate_tensors(peft_model))
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt", "imsm_format": str(FORMAT_VERSION)})

        lora = adapter_config["adapter_config"]
        targets = sorted({k.split(".")[-2] for k in tensors if k.startswith("imsm.lora.") and k.endswith(".lora_A")})
        config = dict(base_config)
        config["architectures"] = [ARCHITECTURE]
        config["imsm"] = {
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
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _copy_files(base_dir, tmp, ("generation_config.json",))
        token_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
        if not _copy_files(token_src, tmp, TOKENIZER_FILES):
            try:
                AutoTokenizer.from_pretrained(str(token_src)).save_pretrained(str(tmp))
            except (OSError, ValueError) as exc:
                warnings.warn(
                    f"imsm-export: neither {adapter_dir} nor {base_dir} holds a tokenizer ({type(exc).__name__}), so "
                    f"{out_dir} has none; serve it with `vllm serve {out_dir} --tokenizer TOKENIZER_PATH`, or save "
                    "the tokenizer into the adapter folder (tokenizer.save_pretrained(ADAPTER_DIR)) and export again.",
                    stacklevel=2,
                )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="imsm-export",
        description="Write a folder that `vllm serve` serves (with the imsm_vllm plugin) from a saved IMSM adapter.",
    )
    parser.add_argument("adapter_dir", help="the IMSM adapter folder (save_pretrained of an IMSM model, LoRA inside)")
    parser.add_argument("out_dir", help="the folder to write (then: vllm serve OUT_DIR)")
    parser.add_argument(
        "--base", default=None, help="base model folder (default: the adapter's base_model_name_or_path)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    args = parser.parse_args(argv)
    try:
        out = export(args.adapter_dir, args.out_dir, base=args.base, overwrite=args.overwrite)
    except ExportError as exc:
        print(f"imsm-export: error: {exc}", file=sys.stderr)
        return 2
    print(f"imsm-export: wrote {out}; serve it with: vllm serve {out} --dtype float32")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
