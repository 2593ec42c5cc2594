"""``quantfoundry.json``: what a run did, enough to reproduce and to reload it."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..deploy.merge import merge_marker
from ..options import options_to_dict
from ..roles.quantizer import Quantizer, Transform

if TYPE_CHECKING:  # pragma: no cover
    from ..model.source import ModelSource
    from ..roles.calibrator import CalibrationSet
    from ..roles.exporter import Exporter
    from ..roles.format import Format
    from ..roles.plan import QuantPlan

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


def build_manifest(*, source: ModelSource, stages: list[Quantizer | Transform], stage_specs: list[tuple[str, Any]],
                   requested: Format | None, exporter: Exporter, plan: QuantPlan,
                   calibration: CalibrationSet | None, notes: list[str], evaluation: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a run (``quantfoundry.json``); ``quantizer`` lists the recipe's stages as
    named, each with its options and whether it ran as a transform or as the rounding stage."""
    return {
        "schema": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "source": {
            "path": str(source.path),
            "architecture": source.hf_class,
            "architecture_map": source.architecture.name,
            "sha256": source.sha256,
            "dtype": str(source.storage_dtype).removeprefix("torch."),
            **({"merge": marker} if (marker := merge_marker(Path(str(source.path)))) is not None else {}),
        },
        "quantizer": [{"name": name, "options": options_to_dict(s.options),
                       "role": "transform" if isinstance(s, Transform) else "quantizer"}
                      for (name, _), s in zip(stage_specs, stages, strict=True)],
        "format": requested.to_json() if requested else None,
        "exporter": {"name": exporter.name, "options": options_to_dict(exporter.options)},
        "calibration": None if calibration is None else {
            "source": calibration.source, "sha256": calibration.sha256,
            "shape": list(calibration.input_ids.shape), **calibration.describe(),
            **{k: v for k, v in calibration.info.items() if k not in ("warnings", "preview")}},
        "plan": plan.to_json(),
        **({"planner": dict(plan.planner)} if plan.planner is not None else {}),
        "notes": list(notes),
        "evaluation": evaluation,
        "versions": {
            "quantfoundry": _version("quantfoundry"), "torch": torch.__version__,
            "transformers": _version("transformers"), "safetensors": _version("safetensors"),
            "python": platform.python_version(),
        },
        "plugins": plugin_versions(),
    }
