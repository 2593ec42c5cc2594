"""Small file helpers: atomic JSON writes, streamed SHA-256, reading an artifact's manifest."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary sibling, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


#: the manifest every ``qf run`` artifact holds
MANIFEST = "quantfoundry.json"


def read_manifest(folder: Path) -> dict[str, Any]:
    """The ``quantfoundry.json`` of an artifact folder (a missing or damaged one is an
    :class:`~quantfoundry.errors.ArtifactError` saying how to get a good one)."""
    from .errors import ArtifactError

    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST}; pass a folder written by `qf run`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); the artifact is damaged: re-run `qf run`") from None


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, object)`` of every non-blank line of a JSON Lines file; a line that is
    not JSON is one :class:`~quantfoundry.errors.UsageError` naming the file and line."""
    from .errors import UsageError

    with Path(path).open(encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError:
                raise UsageError(f"{path}:{i} is not valid JSON; a .jsonl file needs one object per line") from None
