"""Paths of the data embedded in the core distribution (see data/README.md)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def _path(name: str) -> Path:
    return Path(str(files(__name__).joinpath(name)))


def default_model_path() -> Path:
    """The embedded default model (pycode-7m)."""
    return _path("pycode-7m")


def default_eval_text() -> Path:
    """The default model's evaluation text (held-out CPython source, disjoint from the calibration text)."""
    return _path("python_eval.txt")


def english_eval_text() -> Path:
    """The general-English evaluation text for every other model (a WikiText-2 test excerpt)."""
    return _path("english_eval.txt")


def is_default_model(folder: Path) -> bool:
    """True if ``folder`` is the embedded default model."""
    return Path(folder).resolve() == default_model_path().resolve()


def default_calibration_text() -> Path:
    """The default calibration text (held-out CPython source)."""
    return _path("python_calib.txt")
