"""``quantfoundry.json``: what a run did, enough to reproduce and to reload it."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..options import options_to_dict

if TYPE_CHECKING:  # pragma: no cover
    from ..roles.calibrator import CalibrationSet
    from ..roles.exporter import Exporter
    from ..roles.format import Format
    from ..roles.plan import QuantPlan
    from ..roles.quantizer import Quantizer
    from .source import ModelSource

MANIFEST = "quantfoundry.json"
SCHEMA_VERSION = 1


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def plugin_versions() -> dict[str, str | None]:
    from ..plugins import get_plugin_manager

    pm = get_plugin_manager()
    out: dict[str, str | None] = {}
    for name in pm.plugin_names():
        dist, version = pm.distribution_of(name)
        out[name] = f"{dist} {version}" if dist else f"quantfoundry {_version('quantfoundry')} (built-in)"
    return out


def build_manifest(*, source: ModelSource, stages: list[Quantizer], requested: Format | None,
                   exporter: Exporter, plan: QuantPlan, calibration: CalibrationSet | None,
                   notes: list[str], evaluation: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "source": {
            "path": str(source.path),
            "architecture": source.hf_class,
            "architecture_map": source.architecture.name,
            "sha256": source.sha256,
            "dtype": str(source.storage_dtype).removeprefix("torch."),
        },
        "quantizer": [{"name": s.name, "options": options_to_dict(s.options)} for s in stages],
        "format": requested.to_json() if requested else None,
        "exporter": {"name": exporter.name, "options": options_to_dict(exporter.options)},
        "calibration": None if calibration is None else {
            "source": calibration.source, "sha256": calibration.sha256,
            "shape": list(calibration.input_ids.shape), **{k: v for k, v in calibration.info.items()
                                                           if k != "warnings"}},
        "plan": plan.to_json(),
        "notes": list(notes),
        "evaluation": evaluation,
        "versions": {
            "quantfoundry": _version("quantfoundry"), "torch": torch.__version__,
            "transformers": _version("transformers"), "safetensors": _version("safetensors"),
            "python": platform.python_version(),
        },
        "plugins": plugin_versions(),
    }


def read_manifest(folder: Path) -> dict[str, Any]:
    from ..errors import ArtifactError

    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST}; pass a folder written by `qf run`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); the artifact is damaged: re-run `qf run`") from None


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary sibling, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
