"""Planner ``kl``: each tensor's format by the output KL it adds alone, at a byte budget.

1. **Sensitivity.** For every tensor the exporter lets choose (or every group it ties to one
   format) and every candidate format, the tensor alone is rounded to nearest onto that format
   (with the calibration's importance when the run uses an imatrix) and the model's next-token
   KL to the float model is measured on ``samples`` calibration windows
   (:class:`~qf_kl_planner.sensitivity.Sensitivity`: only the blocks from the changed one on are
   rerun). The table is cached per model, calibration tokens, candidates and options, so
   planning the same model at another budget measures nothing again.
2. **Allocation.** Costs are taken as additive over tensors; ``toolkit.allocate`` picks one
   format per tensor under the budget (Lagrangian over each tensor's convex hull of
   bytes → KL, then the left-over bytes).
3. **Check.** The chosen mix, every tensor rounded at once, is measured the same way: the
   manifest records the predicted (summed) and the measured KL side by side.

The run then rounds with its own quantizer (RTN, GPTQ, AWQ, HQQ…) onto the chosen formats; the
sensitivities are those of round-to-nearest.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from quantfoundry import Format, Options, Planner, PlanRequest, QuantPlan, resolve_format
from quantfoundry.errors import UsageError
from quantfoundry.toolkit import Progress, allocate, load_full_model, release, write_json_atomic

from .sensitivity import Sensitivity

VERSION = 1  # of the measurement: part of the cache key


@dataclass(frozen=True, kw_only=True)
class KLPlannerOptions(Options):
    samples: int = field(default=8, metadata={
        "help": "calibration windows the sensitivities are measured on (spread over the calibration set)"})
    positions: int = field(default=128, metadata={
        "help": "positions per window the KL is read at, evenly spaced (the output head runs on those only; "
                "0 = every position)"})
    batch_size: int = field(default=4, metadata={"help": "windows per forward pass"})
    formats: str = field(default="", metadata={
        "help": "only these candidate formats, comma-separated specs (default: every one the exporter offers)"})
    sensitivity: Literal["measured", "scaled"] = field(default="measured", metadata={
        "help": "measured: the KL of every candidate measured; scaled: one candidate's KL measured per linear, "
                "the others scaled by their output error tr(dW G dWᵀ) (about 1/5 of the runs)"})
    check: bool = field(default=True, metadata={
        "help": "measure the chosen mix (all tensors rounded at once) beside the predicted KL"})

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.positions < 0:
            raise ValueError(f"positions must be >= 0, got {self.positions}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for spec in self.allowed():
            try:
                resolve_format(spec)
            except Exception as exc:  # an unknown spec: the format registry says which exist
                raise ValueError(f"formats: {exc}") from None

    def allowed(self) -> list[str]:
        return [s.strip() for s in self.formats.split(",") if s.strip()]


def _spec(fmt: Format | None) -> str:
    return fmt.spec if fmt is not None else "float"


class KLPlanner(Planner):
    name = "kl"
    description = "each tensor's format by the output KL it adds alone (measured), at a size budget"
    Options = KLPlannerOptions

    options: KLPlannerOptions

    def plan(self, request: PlanRequest) -> QuantPlan:
        if request.calibration is None:
            raise UsageError("planner 'kl' measures on calibration text; the run has none (--calibrator text)")
        candidates = self._candidates(request)
        units = request.units()
        options = {unit: candidates[unit[0]] for unit in units}
        sizes = {unit: [sum(request.nbytes(n, f) for n in unit) for f in options[unit]] for unit in units}
        ids = self._windows(request)
        positions = self._positions(ids.shape[1])
        where = (f"{ids.shape[0]} calibration windows of {ids.shape[1]} tokens, KL read at "
                 f"{ids.shape[0] * (ids.shape[1] if positions is None else positions.numel()):,} positions")
        key = self._key(request, ids)
        table, seconds = self._cached(request, key)
        missing = {u: fs for u, fs in options.items()
                   if any(_spec(f) not in table.get(self._label(u), {}) for f in fs)}
        measured_now = bool(missing)
        sens: Sensitivity | None = None
        try:
            if missing:
                sens = self._sensitivity(request, ids)
                t0 = time.perf_counter()
                for label, row in self._measure(sens, missing, request).items():
                    table.setdefault(label, {}).update(row)
                seconds += time.perf_counter() - t0
                self._store(request, key, table, seconds)
            costs = {u: [(sizes[u][i], table[self._label(u)][_spec(f)]) for i, f in enumerate(options[u])]
                     for u in units}
            alloc = allocate(costs, request.budget.bytes, fixed=request.fixed_bytes)
            choice: dict[str, Format | None] = {}
            reasons: dict[str, str] = {}
            for unit in units:
                i = alloc.choice[unit]
                for name in unit:
                    choice[name] = options[unit][i]
                    reasons[name] = self._reason(unit, options[unit], costs[unit], i)
            predicted = sum(costs[u][alloc.choice[u]][1] for u in units)
            info: dict[str, Any] = {
                "sensitivity": ("output KL of each tensor alone" if self.options.sensitivity == "measured" else
                                "output KL of each tensor alone at one format, scaled to the others by output error")
                               + ", round-to-nearest"
                               + (" with the calibration's importance" if self._uses_importance(request) else ""),
                "measured_units": len(missing), "samples": int(ids.shape[0]), "tokens": int(ids.numel()), "positions": self.options.positions, "cached": not measured_now,
                "sensitivity_seconds": round(seconds, 1), "multiplier": alloc.multiplier,
                "predicted_kl": predicted,
                "table": {self._label(u): table[self._label(u)] for u in units}}
            if self.options.check:
                if sens is None:
                    sens = self._sensitivity(request, ids)
                with sens.changed({n: f for n, f in choice.items() if f is not None}):
                    info["measured_kl"] = sens.kl()
                request.note(f"planner 'kl': predicted KL {predicted:.4g} (sum of each tensor alone), measured "
                             f"{info['measured_kl']:.4g} with every tensor rounded at once ({where})")
        finally:
            if sens is not None:
                release(sens.model)
        request.note(f"planner 'kl': sensitivities of {len(units)} tensor group(s) x their candidates: "
                     f"{len(missing)} measured, {len(units) - len(missing)} from the cache")
        return request.choose(choice, reasons=reasons, info=info)

    # -- candidates and calibration windows ---------------------------------------------------
    def _candidates(self, request: PlanRequest) -> dict[str, tuple[Format | None, ...]]:
        allowed = self.options.allowed()
        if not allowed:
            return dict(request.candidates)
        wanted = {resolve_format(s).spec for s in allowed}
        out = {}
        for name, cands in request.candidates.items():
            kept = tuple(f for f in cands if f is None or f.spec in wanted)
            if not [f for f in kept if f is not None]:
                offered = ", ".join(_spec(f) for f in cands)
                raise UsageError(f"planner 'kl': formats={self.options.formats!r} leaves {name} no format; the "
                                 f"exporter offers it {offered}")
            out[name] = kept
        return out

    def _windows(self, request: PlanRequest) -> torch.Tensor:
        cal = request.calibration
        if cal is None:  # pragma: no cover - plan() checks
            raise UsageError("no calibration")
        if not cal.uniform:
            raise UsageError("planner 'kl' measures on windows of one length, but the calibrator gave samples of "
                             "several lengths; pass --calibrator-opt packing=true")
        n = cal.n_samples
        k = min(self.options.samples, n)
        index = torch.linspace(0, n - 1, k).round().long().unique()
        return cal.input_ids[index]

    def _positions(self, length: int) -> torch.Tensor | None:
        k = self.options.positions
        if k == 0 or k >= length:
            return None
        return torch.linspace(0, length - 1, k).round().long().unique()

    def _uses_importance(self, request: PlanRequest) -> bool:
        return bool(request.importance) or request.collects_importance

    # -- measuring -----------------------------------------------------------------------------
    def _sensitivity(self, request: PlanRequest, ids: torch.Tensor) -> Sensitivity:
        model = load_full_model(request.source, dtype=request.dtype, device=request.device)
        batches = [b.to(request.device) for b in ids.split(self.options.batch_size)]
        sens = Sensitivity(model, request.source, batches, positions=self._positions(ids.shape[1]),
                           importance=request.collects_importance and not request.importance)
        if request.importance:
            sens.importance = {n: v.to(torch.float32) for n, v in request.importance.items()}
        return sens

    def _measure(self, sens: Sensitivity, options: dict[tuple[str, ...], tuple[Format | None, ...]],
                 request: PlanRequest) -> dict[str, dict[str, float]]:
        scaled = {unit for unit in options if self.options.sensitivity == "scaled" and self._linears(sens, unit)}
        runs = sum(1 if unit in scaled else sum(f is not None for f in fs) for unit, fs in options.items())
        base = sens.kl()  # the unchanged model measured the same way (0 up to float rounding)
        table: dict[str, dict[str, float]] = {}
        with Progress(enabled=request.progress, total=runs, label="sensitivity", unit="runs") as bar:
            for unit, fs in options.items():
                grids = [f for f in fs if f is not None]
                row: dict[str, float] = {"float": 0.0} if None in fs else {}
                if unit in scaled:
                    probe = grids[len(grids) // 2]  # the middle one by size
                    kl = max(sens.measure({n: probe for n in unit}) - base, 0.0)
                    bar.advance()
                    errors = {f.spec: sum(sens.output_error(n, f) for n in unit) for f in grids}
                    for f in grids:
                        row[f.spec] = kl * errors[f.spec] / errors[probe.spec] if errors[probe.spec] > 0 else 0.0
                else:
                    for f in grids:
                        row[f.spec] = max(sens.measure({n: f for n in unit}) - base, 0.0)
                        bar.advance()
                table[self._label(unit)] = row
        return table

    @staticmethod
    def _linears(sens: Sensitivity, unit: tuple[str, ...]) -> bool:
        """True when every tensor of ``unit`` is a linear with activations (not an embedding)."""
        return all(sens.start_of([n]) != "embeddings" and isinstance(sens.model.get_submodule(n), torch.nn.Linear)
                   and not sens.tied_to_embeddings(n) for n in unit)

    @staticmethod
    def _label(unit: tuple[str, ...]) -> str:
        return "+".join(unit)

    @staticmethod
    def _reason(unit: tuple[str, ...], fs: tuple[Format | None, ...], costs: list[tuple[int, float]], i: int) -> str:
        b, c = costs[i]
        text = f"adds {c:.3g} KL alone"
        smaller = [j for j in range(len(fs)) if costs[j][0] < b]
        if smaller:
            j = max(smaller, key=lambda j: costs[j][0])
            text += f"; {_spec(fs[j])} would add {costs[j][1]:.3g} and save {b - costs[j][0]:,} B"
        if len(unit) > 1:
            text += f" (with {len(unit) - 1} tied tensor(s))"
        return text

    # -- the cache -----------------------------------------------------------------------------
    def _key(self, request: PlanRequest, ids: torch.Tensor) -> str:
        """What the measurements depend on: the model, the windows, the importance and the options
        (not the candidates: the table holds an entry per tensor group and format, and a plan with
        other candidates measures only the entries it lacks)."""
        h = hashlib.sha256()
        h.update(json.dumps({
            "version": VERSION, "model": request.fingerprint, "positions": self.options.positions,
            "sensitivity": self.options.sensitivity, "dtype": str(request.dtype),
            "device": request.device.type, "importance": self._uses_importance(request),
        }, sort_keys=True).encode())
        h.update(ids.to(torch.int64).cpu().numpy().tobytes())
        for name in sorted(request.importance):
            h.update(request.importance[name].to(torch.float32).cpu().numpy().tobytes())
        return h.hexdigest()[:24]

    def _cached(self, request: PlanRequest, key: str) -> tuple[dict[str, dict[str, float]], float]:
        if request.cache is None or not request.fingerprint:
            return {}, 0.0
        path = request.cache / f"kl-{key}.json"
        try:
            data = json.loads(path.read_text())
            return dict(data["table"]), float(data.get("seconds", 0.0))
        except (OSError, ValueError, KeyError, TypeError):
            return {}, 0.0

    def _store(self, request: PlanRequest, key: str, table: dict[str, dict[str, float]], seconds: float) -> None:
        if request.cache is None or not request.fingerprint:
            return
        request.cache.mkdir(parents=True, exist_ok=True)
        write_json_atomic(request.cache / f"kl-{key}.json", {"table": table, "seconds": seconds,
                                                              "model": request.fingerprint})
