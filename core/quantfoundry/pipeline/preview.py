"""``qf calib``: what the quantizer will see — the calibration samples, counted and shown,
before any model weight is read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import default_model_path
from ..model.source import load_tokenizer
from ..plugins import get_plugin_manager
from ..roles.calibrator import CalibrationSet
from .components import make


@dataclass
class CalibrationPreview:
    calibrator: str
    plugin: str
    model: str
    calibration: CalibrationSet
    tokenizer: Any

    def histogram(self, bins: int = 8) -> list[tuple[int, int, int]]:
        """``(low, high, count)`` of the sample lengths in ``bins`` equal-width bins."""
        lengths = self.calibration.sample_lengths().tolist()
        lo, hi = min(lengths), max(lengths)
        if lo == hi:
            return [(lo, hi, len(lengths))]
        width = -(-(hi - lo + 1) // bins)
        edges = [(lo + i * width, min(hi, lo + (i + 1) * width - 1)) for i in range(bins) if lo + i * width <= hi]
        return [(a, b, sum(a <= n <= b for n in lengths)) for a, b in edges]

    def sample_text(self, index: int) -> str:
        """Sample ``index`` decoded with its special tokens: exactly what the model reads."""
        return self.tokenizer.decode(self.calibration.samples()[index].tolist(), skip_special_tokens=False)

    def to_json(self) -> dict[str, Any]:
        c = self.calibration
        return {"calibrator": self.calibrator, "plugin": self.plugin, "model": self.model, "source": c.source,
                "sha256": c.sha256, **c.describe(),
                "histogram": [{"low": a, "high": b, "count": n} for a, b, n in self.histogram()],
                "info": {k: v for k, v in c.info.items()}}


def preview_calibration(model: str | Path | None = None, calibrator: str | None = None,
                        calibrator_options: dict[str, Any] | None = None, *, trust_remote_code: bool = False,
                        revision: str | None = None) -> CalibrationPreview:
    """Load the calibration of a run with ``model``'s tokenizer (no weight is read or downloaded)."""
    name = calibrator or "text"
    cal = make("calibrator", name, calibrator_options)  # options and their files checked first
    where = model if model is not None else default_model_path()
    tokenizer = load_tokenizer(where, trust_remote_code=trust_remote_code, revision=revision)
    entry = get_plugin_manager().registry("calibrator").entries[cal.name]
    plugin = f"{entry.distribution} {entry.version}" if entry.distribution else "built-in"
    return CalibrationPreview(cal.name, plugin, str(where), cal.load(tokenizer), tokenizer)
