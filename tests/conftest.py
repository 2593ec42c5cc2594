from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest_plugins = ["quantfoundry.testing"]

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("QF_SHARED", ROOT.parent / "shared"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"the shared/ folder is missing at {SHARED}; set QF_SHARED")
    return SHARED
