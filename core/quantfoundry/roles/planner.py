"""Planner: *which* format each tensor gets, to hit a size budget (mixed precision).

The exporter plans first (one format for every tensor, its fallbacks, what stays in float) and
says which formats each tensor may take instead (:meth:`Exporter.mix_candidates`); a planner
then chooses among them for a :class:`Budget` and returns the :class:`QuantPlan` the run
quantizes and the exporter writes (:meth:`Exporter.adopt_plan`). The pipeline calls it between
the exporter's plan and the plan check, so every later check sees the planner's choice::

    class MyPlanner(Planner):
        name = "my-planner"

        def plan(self, request: PlanRequest) -> QuantPlan:
            ...  # measure request.candidates on request.calibration, fit request.budget
            return request.choose({name: fmt, ...}, reasons={...}, info={...})

Sizes are exact: each candidate's bytes are :meth:`Format.nbytes` of the tensor's shape, the
tensors a planner does not choose count as the artifact stores them (``request.fixed_bytes``).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .component import Component
from .format import Format
from .plan import QuantPlan, TensorPlan

if TYPE_CHECKING:  # pragma: no cover
    from ..model.source import ModelSource
    from .calibrator import CalibrationSet

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int | float) -> int:
    """``3.9GB`` / ``512MiB`` / ``123456`` (a plain number is bytes) → bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"size {text!r}: write a number of bytes or one with a unit "
                             "(3.9GB, 512MB, 4GiB)")
        value, unit = float(m.group(1)), m.group(2).lower()
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return int(value * _UNITS[unit])


@dataclass(frozen=True)
class Budget:
    """The artifact's tensor bytes a plan may use: every tensor of the model as the artifact
    stores it (quantized ones at their format's exact bytes, float ones at their stored dtype).
    Metadata (headers, tokenizer) is not counted. ``bpw``: the same budget said in bits per
    weight of the whole model (``8 * bytes / parameters``, llama.cpp's convention)."""

    bytes: int
    parameters: int
    asked: str = ""

    @classmethod
    def of(cls, parameters: int, *, target_bpw: float | None = None,
           target_size: str | int | None = None) -> Budget:
        if (target_bpw is None) == (target_size is None):
            raise ValueError("give one of target_bpw and target_size")
        if target_bpw is not None:
            if not 0 < float(target_bpw) <= 32:
                raise ValueError(f"target_bpw must be in (0, 32], got {target_bpw}")
            return cls(int(float(target_bpw) * parameters / 8), parameters, f"{float(target_bpw):g} bpw")
        return cls(parse_size(target_size), parameters, str(target_size))  # type: ignore[arg-type]

    @property
    def bpw(self) -> float:
        return 8 * self.bytes / self.parameters


@dataclass
class PlanRequest:
    """What a planner gets.

    :param source: the model (shapes, config; weights readable).
    :param plan: the exporter's own plan: the starting point, with what stays in float and why.
    :param candidates: tensor name → the formats the exporter can store for it (cheapest
        first); ``None`` among them means "kept in float" where the exporter stores that.
    :param ties: groups of candidate tensors that must share one format (the engine fuses them).
    :param budget: bytes the artifact's tensors may take.
    :param fixed_bytes: bytes of the tensors that are not candidates (norms, kept-float ones).
    :param float_bytes: tensor name → its bytes when kept in float (for a ``None`` candidate).
    :param calibration: the run's calibration tokens, when the planner needs them.
    :param importance: mean squared input per channel by linear name, when the exporter brings
        an importance matrix (llama.cpp's imatrix), for rounding candidates as the run will.
    :param collects_importance: the run collects an importance matrix from the calibration
        (``--imatrix``) and its quantizer rounds with it.
    :param device: where measurements run; ``dtype``: the run's compute dtype.
    :param fingerprint: identifies the model's weights and tokenizer (a cache key).
    :param cache: a folder for the planner's cached measurements, or ``None`` (no disk cache).
    :param note: adds a line to the run's notes; ``progress``: show progress bars.
    """

    source: ModelSource
    plan: QuantPlan
    candidates: dict[str, tuple[Format | None, ...]]
    budget: Budget
    fixed_bytes: int
    float_bytes: dict[str, int]
    ties: list[tuple[str, ...]] = field(default_factory=list)
    calibration: CalibrationSet | None = None
    importance: Mapping[str, torch.Tensor] = field(default_factory=dict)
    collects_importance: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    fingerprint: str = ""
    cache: Path | None = None
    note: Callable[[str], None] = print
    progress: bool = False

    def nbytes(self, name: str, fmt: Format | None) -> int:
        """Exact bytes of tensor ``name`` stored as ``fmt`` (``None``: in float)."""
        if fmt is None:
            return self.float_bytes[name]
        return fmt.nbytes(self.plan.entries[name].shape)

    def choose(self, choice: Mapping[str, Format | None], *, reasons: Mapping[str, str] | None = None,
               info: dict[str, Any] | None = None) -> QuantPlan:
        """The exporter's plan with ``choice`` applied (every candidate tensor must be chosen,
        among its candidates); ``info`` goes to the manifest's ``planner`` section."""
        missing = sorted(set(self.candidates) - set(choice))
        if missing:
            raise ValueError(f"the planner chose no format for {missing[0]} (and {len(missing) - 1} more)")
        for tie in self.ties:
            chosen = {choice[n] for n in tie}
            if len(chosen) > 1:
                raise ValueError(f"the planner gave {', '.join(tie)} different formats, but the engine fuses them")
        plan = QuantPlan(kv_cache=self.plan.kv_cache)
        for name, entry in self.plan.entries.items():
            if name not in self.candidates:
                plan.add(entry)
                continue
            fmt = choice[name]
            if fmt not in self.candidates[name]:
                raise ValueError(f"the planner chose {fmt.spec if fmt else 'float'} for {name}, which the "
                                 "exporter did not offer")
            reason = (reasons or {}).get(name, "")
            plan.add(TensorPlan(name, entry.shape, fmt, reason=reason if fmt is not None else
                                (reason or "kept in float by the planner"), input_quant=entry.input_quant))
        plan.planner = dict(info or {})
        return plan

    def total_bytes(self, choice: Mapping[str, Format | None]) -> int:
        return self.fixed_bytes + sum(self.nbytes(n, f) for n, f in choice.items())

    def smallest_bytes(self) -> int:
        """The artifact's tensor bytes with every candidate at its smallest format."""
        return self.fixed_bytes + sum(min(self.nbytes(n, f) for f in fs) for n, fs in self.candidates.items())

    def largest_bytes(self) -> int:
        """The artifact's tensor bytes with every candidate at its largest format."""
        return self.fixed_bytes + sum(max(self.nbytes(n, f) for f in fs) for n, fs in self.candidates.items())

    def units(self) -> list[tuple[str, ...]]:
        """The candidate tensors grouped into what is chosen together: each tie, then every
        other tensor alone (in plan order)."""
        tied = {n for tie in self.ties for n in tie}
        return [tuple(t) for t in self.ties] + [(n,) for n in self.candidates if n not in tied]


class Planner(Component, ABC):
    """Base class of mixed-precision planners (``--planner NAME``)."""

    #: True if it measures on calibration text (the run then loads it before planning)
    needs_calibration: ClassVar[bool] = True

    @abstractmethod
    def plan(self, request: PlanRequest) -> QuantPlan:
        """Choose a format for every tensor of ``request.candidates`` so that the artifact's
        tensors fit ``request.budget``; return :meth:`PlanRequest.choose` of the choice, with a
        reason per tensor (shown by ``qf run --dry-run``) and what the manifest should record."""
