"""Evaluation: the quantized model, the written artifact and the original, side by side.

``metrics[key][metric]`` maps the columns ``"original"``, ``"quantized"`` (the in-memory model)
and ``"artifact"`` (the written artifact reloaded through its exporter, or served by its
engine) to values. Per-model evaluators fill every column (the original's results cached on
disk); comparing evaluators (``kl``) fill the quantized and artifact columns, against the
original through a :class:`~quantfoundry.evaluation.reference.Reference`.

``qf run`` measures the artifact as well wherever its exporter can open it, and flags every
metric where the artifact and the in-memory model differ by more than the evaluator's stated
bound (:attr:`Evaluator.agreement`): that means the export lost something.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ArtifactError, EngineUnavailable, UsageError
from ..evaluation.reference import Reference, cache_root
from ..evaluation.windows import default_text_warning
from ..files import read_manifest, write_json_atomic
from ..model.source import resolve_model
from ..options import options_to_dict
from ..roles.evaluator import Engine, EvalTarget, Evaluator
from ..roles.exporter import Exporter
from ..roles.plan import QuantPlan, TensorPlan
from .components import device_of, dtype_of, make
from .result import RunResult

Metrics = dict[str, dict[str, dict[str, Any]]]

#: strings tokenized by an engine and by the source tokenizer in the artifact check: prose,
#: code, whitespace runs, digits, accents and scripts that byte-level BPE and SentencePiece
#: split differently when a vocabulary or pre-tokenizer is exported wrong. None starts with a
#: space: there transformers' SentencePiece-Llama tokenizers and SentencePiece itself (which
#: llama.cpp follows) disagree about the dummy prefix, whatever the export.
TOKENIZER_PROBES: tuple[str, ...] = (
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "two  spaces,\ttabs\t and\n\n\n  indented newlines    trailing   ",
    "Numbers: 3.14159, 1,000,000 and 2026-11-24; 12345678901234567890",
    "Accents and scripts: café naïve Ελληνικά русский 日本語 中文 한국어 🤖👍",
    "camelCase snake_case SCREAMING_CASE don't we'll I'm <tag attr=\"x\">&amp;</tag>",
)


@dataclass
class Evaluation:
    """Evaluators keyed by a unique name (``perplexity``, or ``perplexity[path=wiki.txt]`` when
    one evaluator appears twice) and the results measured so far."""

    evaluators: dict[str, Evaluator]
    metrics: Metrics = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)
    artifact: dict[str, Any] | None = None
    #: the engine's tokenizer against the source's (``check_tokenizer``)
    tokenizer_mismatches: list[str] = field(default_factory=list)
    used_bounds: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    #: column → the kernels the quantized linears ran on ("a|b": a module whose calls went to
    #: two kernels by token count) → how many modules
    kernels: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def of(cls, evals: Sequence[Evaluator]) -> Evaluation:
        """Key each evaluator by its name, plus the options that tell apart repeats of one name."""
        keyed: dict[str, Evaluator] = {}
        for ev in evals:
            same = [options_to_dict(e.options) for e in evals if e.name == ev.name]
            key = ev.name
            if len(same) > 1:
                mine = options_to_dict(ev.options)
                keys = list(dict.fromkeys(k for o in same for k in o))
                diff = [k for k in keys if any(o.get(k) != mine.get(k) for o in same)]
                key += "[" + ",".join(f"{k}={_short(mine.get(k))}" for k in diff) + "]"
            n, base = 2, key
            while key in keyed:
                key, n = f"{base}#{n}", n + 1
            keyed[key] = ev
        return cls(keyed, metrics={k: {} for k in keyed})  # results listed in the order asked for

    def record(self, key: str, column: str, values: dict[str, Any]) -> None:
        for metric, value in values.items():
            self.metrics.setdefault(key, {}).setdefault(metric, {})[column] = value

    def measure(self, target: EvalTarget, column: str, *, which: str = "all") -> None:
        """Run the evaluators on ``target``; ``which="artifact"`` skips those with
        ``on_artifact = False``. Per-model evaluators run first (timings and memory are then
        measured before a comparing evaluator loads the original beside the target)."""
        order = sorted(self.evaluators.items(), key=lambda kv: kv[1].compares)
        for key, ev in order:
            if which == "artifact" and not ev.on_artifact:
                continue
            self.record(key, column, ev.evaluate(target))
        if target.model is not None:
            from ..roles.kernel import QuantLinear

            used = Counter("|".join(sorted(m.kernels_used)) for m in target.model.modules()
                           if isinstance(m, QuantLinear) and m.kernels_used)
            if used:
                self.kernels[column] = dict(sorted(used.items()))

    def measure_original(self, reference: Reference) -> None:
        """Per-model evaluators on the original, from the cache where allowed."""
        dev = reference.device.type
        for key, ev in self.evaluators.items():
            if ev.compares:
                continue
            if ev.cache_original:
                values = reference.metrics(ev.name, {**ev.cache_key(), "device": dev},
                                           lambda orig, ev=ev: ev.evaluate(orig))
            else:
                values = ev.evaluate(reference.target())
            self.record(key, "original", values)

    def check_tokenizer(self, engine: Engine, tokenizer: Any) -> dict[str, Any] | None:
        """Tokenize :data:`TOKENIZER_PROBES` with the engine's tokenizer and the source's; every
        string where the ids differ becomes a mismatch. ``None`` when the engine takes ids only."""
        agree = 0
        for text in TOKENIZER_PROBES:
            theirs = engine.tokenize(text)
            if theirs is None:
                return None
            ours = [int(i) for i in tokenizer(text)["input_ids"]]
            if theirs == ours:
                agree += 1
                continue
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                      min(len(ours), len(theirs)))
            self.tokenizer_mismatches.append(
                f"tokenizer: {text[:24]!r}... source ids {ours[at:at + 4]}, {engine.name} ids "
                f"{theirs[at:at + 4]} from token {at} ({len(ours)} vs {len(theirs)} tokens)")
        return {"probes": len(TOKENIZER_PROBES), "identical": agree}

    def bounds(self, engine: Engine | None = None) -> dict[str, dict[str, tuple[float, float]]]:
        """Per evaluator key, the ``(rtol, atol)`` the artifact must meet for each metric: the
        evaluator's :attr:`~Evaluator.agreement`, widened where the serving engine's own
        arithmetic moves that metric (:attr:`Engine.agreement`)."""
        wide = engine.agreement if engine is not None else {}
        out: dict[str, dict[str, tuple[float, float]]] = {}
        for key, ev in self.evaluators.items():
            out[key] = {}
            for metric, (rtol, atol) in ev.agreement.items():
                r2, a2 = wide.get(metric, (0.0, 0.0))
                out[key][metric] = (max(rtol, r2), max(atol, a2))
        return out

    def check_artifact(self, engine: Engine | None = None) -> list[str]:
        """Metrics where the artifact strays from the in-memory model beyond the bound (and
        tokenizer probes the engine splits differently)."""
        out = list(self.tokenizer_mismatches)
        self.used_bounds = self.bounds(engine)
        for key in self.evaluators:
            for metric, (rtol, atol) in self.used_bounds[key].items():
                col = self.metrics.get(key, {}).get(metric, {})
                a, b = col.get("quantized"), col.get("artifact")
                if not isinstance(a, int | float) or not isinstance(b, int | float):
                    continue
                bound = atol + rtol * abs(a)
                if abs(a - b) > bound:
                    out.append(f"{key}.{metric}: in memory {a:.6g}, artifact {b:.6g} "
                               f"(bound {bound:.3g} = {atol:g} + {rtol:g} x |in memory|)")
        self.mismatches = out
        return out

    def to_json(self, device: torch.device, reference: Reference | None) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "evaluators": {k: {"name": e.name, "options": options_to_dict(e.options)}
                           for k, e in self.evaluators.items()},
            "device": str(device),
            "precision": "float32" if reference is None else str(reference.dtype).removeprefix("torch."),
            "kernels": self.kernels,
            "reference": None if reference is None else {
                "loads": reference.loads, "cache_hits": reference.hits, "cache_misses": reference.misses,
                "cache": str(reference.cache) if reference.cache else None},
            "artifact": self.artifact,
            "artifact_check": None if self.artifact is None else {
                "ok": not self.mismatches, "mismatches": self.mismatches,
                "bounds": {f"{k}.{m}": {"rtol": r, "atol": a} for k, bs in self.used_bounds.items()
                           for m, (r, a) in bs.items()}},
        }


def _short(value: Any) -> str:
    """An option value in a key: file names without their folder, ``None`` as ``default``."""
    if value is None:
        return "default"
    text = str(value)
    return Path(text).name if "/" in text else text


def make_reference(source: Any, tokenizer: Any, device: torch.device, *, cache: bool = True,
                   info: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> Reference:
    return Reference(source, tokenizer, device, cache=cache_root() if cache else None, info=info, dtype=dtype)


def open_artifact(folder: Path, exporter: Exporter, device: torch.device, kernel: str | None,
                  dtype: torch.dtype = torch.float32, *,
                  strict: bool = False) -> tuple[torch.nn.Module | None, Engine | None, str]:
    """The artifact as a torch model (through our kernels) or an engine, and how it was opened
    (or why it could not be: a missing engine raises :class:`EngineUnavailable` when ``strict``)."""
    if exporter.can_load:
        model = exporter.load(folder, device, kernel, dtype)
        return model, None, f"exporter {exporter.name!r} reloaded through quantfoundry kernels"
    try:
        engine = exporter.engine(folder, device)
    except EngineUnavailable as e:
        if strict:
            raise
        return None, None, str(e)
    if engine is None:
        return None, None, f"exporter {exporter.name!r} can neither reload nor serve its artifact"
    return None, engine, f"served by {engine.name} {engine.version or ''}".strip()


def stored_formats(manifest: dict[str, Any], exporter: Exporter) -> dict[str, Any]:
    """Name → Format of every tensor the artifact's manifest plans to store quantized (and the
    exporter does not store dequantized)."""
    from ..formats import resolve_format

    out = {}
    for name, entry in (manifest.get("plan") or {}).items():
        spec = entry.get("format") if isinstance(entry, dict) else None
        if spec and exporter.dequantized_dtype(f"{name}.weight") is None:
            out[name] = resolve_format(spec)
    return out


def dequantized_dtypes(names: Iterable[str], exporter: Exporter) -> dict[str, torch.dtype]:
    """``name.weight`` → dtype of the quantized linears ``names`` that the exporter stores
    dequantized (:meth:`Exporter.dequantized_dtype`)."""
    out = {}
    for name in names:
        dtype = exporter.dequantized_dtype(f"{name}.weight")
        if dtype is not None:
            out[f"{name}.weight"] = dtype
    return out


def quantized_linears(model: torch.nn.Module) -> QuantPlan:
    from ..roles.kernel import QuantLinear

    plan = QuantPlan()
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            plan.add(TensorPlan(name, (mod.out_features, mod.in_features), mod.format))
    return plan


def check_evaluator_devices(evaluators: list[Evaluator], device: torch.device) -> None:
    """Refuse, before any work, an evaluator that cannot run on the run's device."""
    for ev in evaluators:
        why = ev.check_device(device)
        if why is not None:
            raise UsageError(f"evaluator {ev.name!r}: {why}")


def evaluate_artifact(path: str | Path, *, original: str | None = None,
                      evaluators: list[tuple[str, dict[str, Any]]], kernel: str | None = None,
                      device: str = "cpu", dtype: str = "float32", update_manifest: bool = True,
                      cache: bool = True, progress: bool = False) -> RunResult:
    """``qf eval``: open the artifact at ``path`` and evaluate it beside its original model."""
    t0 = time.perf_counter()
    folder = Path(path)
    manifest = read_manifest(folder)
    evaluation = Evaluation.of([make("evaluator", n, o) for n, o in evaluators])
    source_path = original or manifest.get("source", {}).get("path")
    if not source_path:
        raise ArtifactError(f"{folder}'s manifest names no source model; pass --original")
    source = resolve_model(source_path, check_weights=False)
    dev = device_of(device)
    check_evaluator_devices(list(evaluation.evaluators.values()), dev)
    exp: Exporter = make("exporter", manifest["exporter"]["name"], manifest["exporter"].get("options", {}))
    eval_dtype = dtype_of(dtype)
    model, engine, how = open_artifact(folder, exp, dev, kernel, eval_dtype, strict=True)
    if model is None and engine is None:
        raise UsageError(f"{how}; install the plugin that provides its engine")
    plan = quantized_linears(model) if model is not None else QuantPlan()
    tokenizer = source.tokenizer()
    info = {"quantized_linears": list(plan.quantized()), "artifact_path": str(folder),
            "stored_formats": stored_formats(manifest, exp),
            "stored_float_dtypes": dequantized_dtypes(manifest.get("plan") or {}, exp),
            "calibration": manifest.get("calibration"), "progress": progress}
    reference = make_reference(source, tokenizer, dev, cache=cache, info=info, dtype=eval_dtype)
    target = EvalTarget(model, tokenizer, source, "artifact", dev, float_dtype=source.storage_dtype,
                        info=info, engine=engine, reference=reference)
    evaluation.artifact = {"path": str(folder), "opened": how}
    try:
        evaluation.measure(target, "artifact")
        if engine is not None and (tok := evaluation.check_tokenizer(engine, tokenizer)):
            evaluation.artifact["tokenizer"] = tok
        del target, model
        evaluation.measure_original(reference)
    finally:
        reference.release()
        if engine is not None:
            engine.close()
    result = evaluation.to_json(dev, reference)
    result.pop("artifact_check")
    result["tokenizer_mismatches"] = list(evaluation.tokenizer_mismatches)
    if update_manifest:
        manifest["artifact_evaluation"] = result
        write_json_atomic(folder / "quantfoundry.json", manifest)
    warning = default_text_warning(list(evaluation.evaluators.values()), source)
    return RunResult(folder, plan, evaluation.metrics, [warning] if warning else [], manifest,
                     time.perf_counter() - t0)
