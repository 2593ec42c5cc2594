"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import hashlib
import platform
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


def cpu_name() -> str:
    """The CPU model, for the machine line of a benchmark."""
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
