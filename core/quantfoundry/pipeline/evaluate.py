"""``qf eval``: run evaluators on a written artifact against its original model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..errors import ArtifactError
from ..roles.plan import QuantPlan, TensorPlan
from .manifest import read_manifest, write_json_atomic
from .run import RunResult, _device, _evaluate, load, make
from .source import resolve_model


def evaluate_artifact(path: str | Path, *, original: str | None = None,
                      evaluators: list[tuple[str, dict[str, Any]]], kernel: str | None = None,
                      device: str = "cpu", dtype: str = "float32", update_manifest: bool = True) -> RunResult:
    """Load the artifact at ``path`` through its exporter and evaluate it beside the original."""
    t0 = time.perf_counter()
    folder = Path(path)
    manifest = read_manifest(folder)
    evals = [make("evaluator", n, o) for n, o in evaluators]
    source_path = original or manifest.get("source", {}).get("path")
    if not source_path:
        raise ArtifactError(f"{folder}'s manifest names no source model; pass --original")
    source = resolve_model(source_path, check_weights=False)
    dev = _device(device)
    model = load(folder, device=dev, kernel=kernel, dtype=dtype)
    plan = QuantPlan()
    from ..roles.kernel import QuantLinear

    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            plan.add(TensorPlan(name, (mod.out_features, mod.in_features), mod.format))
    metrics = _evaluate(evals, model, source, source.tokenizer(), dev, list(plan.quantized()))
    if update_manifest:
        manifest.setdefault("artifact_evaluation", {}).update(metrics)
        write_json_atomic(folder / "quantfoundry.json", manifest)
    return RunResult(folder, plan, metrics, [], manifest, time.perf_counter() - t0)
