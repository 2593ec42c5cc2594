"""What a run (``quantfoundry.run``) or an artifact evaluation (``qf eval``) returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..roles.plan import QuantPlan


@dataclass
class RunResult:
    """The artifact, the plan, the metrics (``evaluator → metric → {original, quantized,
    artifact}``), the notes, the manifest, the wall time, and the model when it was kept."""

    artifact: Path | None
    plan: QuantPlan
    metrics: dict[str, dict[str, dict[str, Any]]]
    notes: list[str]
    manifest: dict[str, Any]
    seconds: float
    model: torch.nn.Module | None = field(default=None, repr=False)
    #: one shell command that runs the artifact in its engine (``Exporter.run_command``)
    run_command: str | None = None
    #: exclusive seconds per phase of the run (``load``, ``calibrate``, ``quantize``, ``encode``,
    #: ``search``, ``export``, ``evaluate``; :mod:`quantfoundry.phases`)
    timings: dict[str, float] = field(default_factory=dict)
