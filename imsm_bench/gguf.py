"""``imsm-bench --model`` accepts a GGUF file: convert it once to a Hugging Face folder and reuse that folder after.

transformers reads GGUF files (``from_pretrained(folder, gguf_file=NAME)``) by dequantizing every tensor, which takes
a while; training needs a plain float model anyway. So the first run converts the file (model and tokenizer,
``save_pretrained``) into ``<cache>/converted/<name>-<key>`` and every later run loads that folder. ``key`` is a hash
of the file's name, size and modification time: replacing the file gives a new conversion.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

GGUF_SUFFIX = ".gguf"


def default_cache_root() -> Path:
    """``$PEFT_IMSM_CACHE`` or ``~/.cache/peft_imsm`` (the same root as the skills LM's cache)."""
    return Path(os.environ.get("PEFT_IMSM_CACHE") or Path.home() / ".cache" / "peft_imsm")


def find_gguf(path: str | os.PathLike[str]) -> Path | None:
    """The GGUF file ``path`` stands for: ``path`` itself if it ends in ``.gguf``, or the only ``.gguf`` file of a
    folder that holds no ``config.json`` (a Hugging Face folder wins over a GGUF file next to it); None otherwise.

    Raises ``FileNotFoundError`` for a ``.gguf`` path that does not exist and ``ValueError`` for a folder with several
    GGUF files (name the one to use).
    """
    p = Path(path)
    if p.suffix.lower() == GGUF_SUFFIX:
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file not found: {p}")
        return p
    if not p.is_dir() or (p / "config.json").exists():
        return None
    found = sorted(q for q in p.iterdir() if q.suffix.lower() == GGUF_SUFFIX and q.is_file())
    if len(found) > 1:
        names = ", ".join(q.name for q in found)
        raise ValueError(f"{p} holds several GGUF files ({names}); pass the one to use: --model {p / found[0].name}")
    return found[0] if found else None


def conversion_key(gguf: Path) -> str:
    """A short hash of the file's name, size and modification time (cheap: the file is not read)."""
    stat = gguf.stat()
    text = f"{gguf.name}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def converted_dir(gguf: Path, cache_root: str | os.PathLike[str] | None = None) -> Path:
    """Where the conversion of ``gguf`` lives: ``<cache_root>/converted/<file stem>-<conversion_key>``."""
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return root / "converted" / f"{gguf.stem}-{conversion_key(gguf)}"


def convert_gguf(
    gguf: str | os.PathLike[str], cache_root: str | os.PathLike[str] | None = None, progress: bool = True
) -> Path:
    """Return a Hugging Face folder (model in float32 + tokenizer) for ``gguf``, converting it on the first call.

    The conversion is written to a temporary folder next to the target and renamed at the end, so an interrupted
    conversion never leaves a half-written folder that a later run would load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    target = converted_dir(gguf, cache_root)
    if (target / "config.json").exists():
        if progress:
            print(f"imsm-bench: using the converted {gguf.name} in {target}", file=sys.stderr)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    steps = ["load + dequantize the GGUF tensors", "tokenizer", "save_pretrained"]
    with tqdm(total=len(steps), desc=f"convert {gguf.name}", disable=not progress, leave=True) as bar:
        bar.set_postfix_str(steps[0])
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        bar.update()
        bar.set_postfix_str(steps[1])
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        bar.update()
        bar.set_postfix_str(steps[2])
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "CONVERTED_FROM").write_text(f"{gguf.resolve()}\n")
            if (target / "config.json").exists():  # another process finished first
                shutil.rmtree(tmp)
            else:
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        bar.update()
    if progress:
        print(f"imsm-bench: converted {gguf} -> {target} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return target


def resolve_model_path(
    name_or_path: str, cache_root: str | os.PathLike[str] | None = None, progress: bool = True
) -> str:
    """``name_or_path`` unchanged for a Hugging Face folder or hub id; the converted folder for a GGUF file (or a
    folder holding one)."""
    gguf = find_gguf(name_or_path)
    return str(convert_gguf(gguf, cache_root, progress)) if gguf is not None else name_or_path
