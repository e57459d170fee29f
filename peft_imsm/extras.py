"""Optional dependencies (the extras of pyproject.toml): :func:`require` imports one, or raises an ImportError that
says what needs it and which extra installs it. A leaf module (standard library only).

The core (``import peft_imsm``, ``get_peft_model`` with ``IMSMConfig``, forward / generate / save / load,
``retrofit``, ``train_gate``, the HF ``Trainer``) needs none of them. ``trl`` (TRL and datasets): ``imsm-sft`` and
``SFTTrainer``. ``plot`` (matplotlib): ``GateMap.plot`` and imsm-bench's ``results.png``. ``eval`` (lm-eval):
``imsm-eval``, which checks for it itself.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> (its name for people, the extra of peft-imsm that installs it)
OPTIONAL: dict[str, tuple[str, str]] = {
    "trl": ("TRL", "trl"),
    "datasets": ("datasets", "trl"),
    "matplotlib": ("matplotlib", "plot"),
}


def install_hint(module: str) -> str:
    """The install line of the extra that provides ``module``."""
    return f'pip install "peft-imsm[{OPTIONAL[module][1]}]"'


def require(module: str, needed_by: str) -> ModuleType:
    """Import the optional dependency ``module`` and return it; if it cannot be imported, raise an ImportError that
    names ``needed_by`` (what needs it) and the extra to install."""
    name, extra = OPTIONAL[module]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{needed_by} needs {name}, which could not be imported ({err}). Install it with: {install_hint(module)} "
            f'(in a checkout: pip install -e ".[{extra}]")'
        ) from err
