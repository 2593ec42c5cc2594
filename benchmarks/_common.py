"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def core_version() -> dict[str, Any]:
    """The commit measured, and a hash of uncommitted changes under core/ (if any)."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
    diff = git("diff", "HEAD", "--", "core")
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "core_diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:12] if diff else None}
