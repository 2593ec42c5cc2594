"""The original model as a reference: loaded at most once, its results cached on disk.

Cache layout (``$QF_CACHE_DIR``, default ``~/.cache/quantfoundry``; ``QF_NO_CACHE=1`` turns it
off)::

    reference/<model fingerprint>/<kind>-<key hash>.safetensors   tensors (e.g. KL's top-k log-probs)
    reference/<model fingerprint>/<kind>-<key hash>.json          metrics (e.g. perplexity of the original)
    fingerprints.json                                             weight-file SHA-256 by (path, size, mtime)

The fingerprint hashes the weights' bytes (memoized per file by path, size and mtime, so a
large model is hashed once), ``config.json`` and the tokenizer files; the key hashes what the
evaluator says identifies its result (text hash, protocol, window, options, device type). A
changed text or model is a different file, never a stale hit.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..files import write_json_atomic
from ..memory import trim_memory
from ..model.materialize import load_full_model
from ..roles.evaluator import EvalTarget, Metric

_TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                    "special_tokens_map.json", "vocab.json", "merges.txt")


def cache_root() -> Path | None:
    """The cache folder, or ``None`` when ``QF_NO_CACHE=1``."""
    if os.environ.get("QF_NO_CACHE", "") not in ("", "0"):
        return None
    root = os.environ.get("QF_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "quantfoundry"


def _key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _file_sha256(path: Path, memo: dict[str, Any]) -> str:
    st = path.stat()
    entry = memo.get(str(path.resolve()))
    if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return str(entry["sha256"])
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    memo[str(path.resolve())] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}
    return h.hexdigest()


def model_fingerprint(source: Any, cache: Path | None) -> str:
    """SHA-256 of a model's weight files (memoized per file under ``cache`` by size and mtime),
    config and tokenizer files: the key of what is cached about it."""
    memo_path = cache / "fingerprints.json" if cache else None
    memo: dict[str, Any] = {}
    if memo_path is not None and memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, json.JSONDecodeError):
            memo = {}
    h = hashlib.sha256()
    for file in sorted(set(source.weight_map.values())):
        h.update(_file_sha256(Path(file), memo).encode())
    for name in _TOKENIZER_FILES:
        p = Path(source.path) / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes())
    if memo_path is not None:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(memo_path, memo)
    return h.hexdigest()[:32]


class Reference:
    """The original model behind a comparison, and the cache of what was computed on it.

    :param source: the original model.
    :param tokenizer: its tokenizer.
    :param device: where the original runs.
    :param cache: the cache root, or ``None`` for no disk cache.
    :param dtype: the dtype the original runs in (the evaluation's: float32, or the deployment's
        bfloat16/float16); part of every cache key but float32's.
    """

    def __init__(self, source: Any, tokenizer: Any, device: torch.device, *, cache: Path | None = None,
                 info: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32):
        self.source = source
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.cache = cache
        self.info = dict(info or {})
        self._target: EvalTarget | None = None
        self._fingerprint: str | None = None
        #: how many times the original was loaded, and cache hits/misses (shown in the manifest)
        self.loads = 0
        self.hits = 0
        self.misses = 0

    # -- the model ------------------------------------------------------------------------
    def target(self) -> EvalTarget:
        """The original model in ``dtype`` on ``device`` (loaded on first use)."""
        if self._target is None:
            model = load_full_model(self.source, dtype=self.dtype, device=self.device)
            self.loads += 1
            self._target = EvalTarget(model, self.tokenizer, self.source, "original", self.device,
                                      float_dtype=self.source.storage_dtype, info=self.info)
        return self._target

    def release(self) -> None:
        """Drop the original model (the cache stays)."""
        self._target = None
        trim_memory()

    # -- identity -------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """SHA-256 of the weights (memoized per file), the config and the tokenizer files."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.source, self.cache)
        return self._fingerprint

    def _path(self, kind: str, key: dict[str, Any], suffix: str) -> Path | None:
        if self.cache is None:
            return None
        if self.dtype != torch.float32:
            key = {**key, "dtype": str(self.dtype).removeprefix("torch.")}
        return self.cache / "reference" / self.fingerprint() / f"{kind}-{_key_hash(key)}{suffix}"

    # -- cached results ---------------------------------------------------------------------
    def tensors(self, kind: str, key: dict[str, Any],
                compute: Callable[[EvalTarget], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``compute(original)``'s tensors, from the cache when ``key`` was computed before."""
        from safetensors.torch import load_file, save_file

        path = self._path(kind, key, ".safetensors")
        if path is not None and path.is_file():
            try:
                out = load_file(str(path))
                self.hits += 1
                return out
            except Exception as exc:  # a damaged cache file is recomputed, never trusted
                warnings.warn(f"ignoring damaged cache file {path}: {exc}", stacklevel=2)
        self.misses += 1
        out = compute(self.target())
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            save_file({k: v.contiguous().cpu() for k, v in out.items()}, str(tmp),
                      metadata={"key": json.dumps(key, sort_keys=True, default=str)})
            tmp.replace(path)
        return out

    def metrics(self, kind: str, key: dict[str, Any],
                compute: Callable[[EvalTarget], dict[str, Metric]]) -> dict[str, Metric]:
        """``compute(original)``'s metrics, from the cache when ``key`` was computed before."""
        path = self._path(kind, key, ".json")
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text())
                self.hits += 1
                return dict(data["metrics"])
            except (OSError, json.JSONDecodeError, KeyError, TypeError):
                pass
        self.misses += 1
        out = compute(self.target())
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, {"key": key, "metrics": out})
        return out
