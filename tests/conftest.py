"""Session set-up of the test suite: offline, one torch thread, and the fixture that finds the paper's benchmark sets.

Shared helpers (tiny models, adapter configs, batches) are in ``helpers.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import peft_imsm  # noqa: F401  (registers IMSM with peft)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: threads only add overhead, and oversubscribe a shared 2-core machine


@pytest.fixture
def benchmarks_dir() -> Path:
    path = Path(
        os.environ.get(
            "IMSM_BENCHMARKS_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "imsm-benchmarks"
        )
    )
    if not path.is_dir():
        pytest.skip(f"benchmark sets not found at {path} (set IMSM_BENCHMARKS_DIR)")
    return path
