"""``quantfoundry.run``: one run of the pipeline, the Python API under ``qf run``."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import default_model_path
from ..errors import IncompatiblePlanError, UsageError
from ..formats import resolve_format
from ..options import parse_options
from ..plugins import get_plugin_manager
from ..roles.calibrator import CalibrationSet, Calibrator
from ..roles.evaluator import EvalTarget, Evaluator
from ..roles.exporter import Exporter
from ..roles.format import QuantizedWeight
from ..roles.plan import QuantPlan
from ..roles.quantizer import QuantContext, Quantizer
from .blockwise import quantize_outside_blocks, run_blocks, run_whole_model
from .capture import capture_inputs
from .evaluate import Evaluation, make_reference, open_artifact
from .kernels import select_kernel
from .manifest import build_manifest, write_json_atomic
from .materialize import materialize_outside_blocks, trim_memory
from .progress import Progress
from .source import ModelSource, resolve_model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Spec = tuple[str, Mapping[str, Any]]


@dataclass
class RunResult:
    """What :func:`run` returns: the artifact, the plan, the metrics and the notes."""

    artifact: Path | None
    plan: QuantPlan
    metrics: dict[str, dict[str, dict[str, Any]]]
    notes: list[str]
    manifest: dict[str, Any]
    seconds: float
    model: torch.nn.Module | None = field(default=None, repr=False)


def make(role: str, name: str, options: Mapping[str, Any] | None = None) -> Any:
    """Instantiate the registered component ``name`` of ``role`` with parsed options."""
    cls = get_plugin_manager().registry(role).get(name)
    return cls(parse_options(cls.Options, options or {}, owner=f"{role} {cls.name!r}"))


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    return dev


def run(
    model: str | Path | None = None, *,
    quantizer: str | list[Spec] = "rtn",
    quantizer_options: Mapping[str, Any] | None = None,
    format: str | None = None,
    format_options: Mapping[str, Any] | None = None,
    exporter: str = "qf",
    exporter_options: Mapping[str, Any] | None = None,
    calibrator: str | None = None,
    calibrator_options: Mapping[str, Any] | None = None,
    evaluators: list[Spec] | list[str] | None = None,
    kernel: str | None = None,
    kernel_options: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    batch_size: int = 8,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
    overwrite: bool = False,
    keep_model: bool = False,
    artifact_eval: bool = True,
    cache: bool = True,
    imatrix: bool = False,
    progress: bool = True,
) -> RunResult:
    """Quantize ``model`` (a folder or hub id; default: the embedded pycode-7m) and export it.

    Every component and option is checked before the model is touched; the artifact is
    written to a temporary folder, verified, then renamed to ``out``. Returns a
    :class:`RunResult` whose ``metrics`` map ``evaluator → metric → {original, quantized,
    artifact}``: with evaluators and an ``out`` folder, the written artifact is opened again
    (``artifact_eval``) and every metric it does not reproduce within the evaluator's bound is
    a ``MISMATCH`` note. ``cache`` keeps the original model's results on disk
    (``$QF_CACHE_DIR``), so comparing variants of one model runs the original once.
    ``imatrix`` collects an importance matrix (mean squared input activation per input
    channel of every planned linear) from the calibration text in the block pass and hands it
    to the quantizer (``QuantContext.importance``), as llama.cpp's imatrix.
    """
    t_start = time.perf_counter()
    get_plugin_manager()
    dev = _device(device)
    if dtype not in _DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    compute_dtype = _DTYPES[dtype]
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")

    # -- components and options, all checked before any work ---------------------------
    stage_specs: list[Spec] = [(quantizer, quantizer_options or {})] if isinstance(quantizer, str) else list(quantizer)
    if not stage_specs:
        raise UsageError("at least one quantizer is needed (e.g. --quantizer rtn)")
    stages: list[Quantizer] = [make("quantizer", n, o) for n, o in stage_specs]
    for s in stages[:-1]:
        if s.rounds:
            raise UsageError(f"quantizer {s.name!r} rounds weights, so it must be the last stage")
    if not stages[-1].rounds:
        raise UsageError(f"the last stage {stages[-1].name!r} only transforms; add a rounding quantizer after it")
    exp: Exporter = make("exporter", exporter, exporter_options)
    spec = format or exp.default_format
    requested = resolve_format(spec, format_options) if spec else None
    needs_calib = any(s.needs_calibration for s in stages) or imatrix
    if imatrix and any(s.scope == "model" for s in stages):
        raise UsageError("an imatrix is collected block by block; a whole-model quantizer cannot use it")
    cal: Calibrator | None = None
    if needs_calib or calibrator or calibrator_options:
        cal = make("calibrator", calibrator or "text", calibrator_options)
    evals: list[Evaluator] = []
    for ev in evaluators or []:
        name, opts = (ev, {}) if isinstance(ev, str) else ev
        evals.append(make("evaluator", name, opts))
    if any(s.scope == "model" for s in stages) and len(stages) > 1:
        raise UsageError("a whole-model quantizer cannot be chained with other stages")

    out_path = Path(out) if out is not None else None
    if out_path is not None and out_path.exists() and not overwrite:
        raise UsageError(f"{out_path} already exists; pass --overwrite or choose another --out")

    # -- load, guard, plan -------------------------------------------------------------
    source = resolve_model(model if model is not None else default_model_path(), allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code, revision=revision, check_weights=False)
    # NaN/Inf guard: the tensors outside the decoder blocks now; each block's as the block loop
    # reads them (in its prefetch thread), so the checkpoint is read once, not twice
    source.check_finite([n for n, (dt, _shape) in source.tensor_info.items()
                         if dt.is_floating_point and source.block_index(n) is None])
    # the manifest's model hash reads every weight file once: in the background, while the
    # blocks are quantized (hashlib and file reads release the GIL)
    hashing = threading.Thread(target=_warm_hash, args=(source,), name="qf-sha256", daemon=True)
    hashing.start()
    exp.collects_importance = imatrix
    plan = exp.plan(source, requested)
    _check_plan(plan, stages, exp, dev, kernel, kernel_options)
    ctx = QuantContext(device=dev, source=source)
    brought = exp.importance(source)
    if brought:
        if imatrix:
            raise UsageError(f"exporter {exp.name!r} brings an importance matrix and --imatrix asks to collect "
                             "one: choose one of them")
        ctx.importance.update(brought)
        ctx.note(f"importance of {len(brought)} linear(s) from exporter {exp.name!r}")
    for line in summarize_plan(plan):
        ctx.note(line)

    if imatrix:
        ctx.note("imatrix: importance (mean squared input activation per channel) collected from the "
                 "calibration text before each block is quantized")
    if cal is not None and not needs_calib:
        ctx.note(f"calibrator {cal.name!r} not used: {', '.join(s.name for s in stages)} needs no calibration")
        cal = None
    tokenizer = source.tokenizer() if (cal is not None or evals) else None
    calibration: CalibrationSet | None = cal.load(tokenizer) if cal is not None else None
    if calibration is not None:
        for line in calibration.info.get("warnings", []):
            ctx.note(line)

    # -- quantize, block by block, streaming into the exporter ------------------------------
    keep = keep_model or bool(evals)
    model_obj = source.skeleton(compute_dtype)
    tmp = None
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.parent / f".{out_path.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    try:
        if tmp is not None:
            exp.begin(tmp, source, plan)
        if keep or needs_calib:  # embeddings feed the calibration; evaluation needs the head
            materialize_outside_blocks(model_obj, source, dtype=compute_dtype, device=dev)
        inputs = layer_kwargs = None
        if calibration is not None and needs_calib and stages[-1].scope != "model":
            ids = calibration.input_ids.to(dev)
            batches = list(ids.split(batch_size))
            arch = source.architecture
            inputs, layer_kwargs = capture_inputs(model_obj, model_obj.get_submodule(arch.layers),
                                                  model_obj.get_submodule(arch.final_norm), batches)
        if stages[-1].scope == "model":
            run_whole_model(model_obj, source, plan, stages[-1], ctx,
                            calibration=calibration.input_ids if calibration is not None else None,
                            exporter=exp if tmp is not None else None, dtype=compute_dtype,
                            kernel_name=kernel, kernel_options=dict(kernel_options or {}))
        else:
            with Progress(enabled=progress, total=source.num_layers, label="quantizing") as bar:
                run_blocks(model_obj, source, plan, stages, ctx, inputs=inputs, layer_kwargs=layer_kwargs,
                           collect_importance=imatrix,
                           exporter=exp if tmp is not None else None, keep=keep, dtype=compute_dtype,
                           kernel_name=kernel, kernel_options=dict(kernel_options or {}),
                           on_block=lambda i, n, s: bar.advance())
            outside = quantize_outside_blocks(model_obj, source, plan, ctx, kernel_name=kernel,
                                              kernel_options=dict(kernel_options or {}))
            if tmp is not None:
                _export_outside_blocks(exp, source, outside)
        del inputs, layer_kwargs
        hashing.join()
        manifest = build_manifest(source=source, stages=stages, requested=requested, exporter=exp, plan=plan,
                                  calibration=calibration, notes=ctx.notes, evaluation={})
        if tmp is not None:
            if imatrix and ctx.importance and calibration is not None:
                exp.collected_importance(dict(ctx.importance), {
                    "source": calibration.source, "tokens": int(calibration.input_ids.numel()),
                    "samples": int(calibration.input_ids.shape[0]), "seq_len": int(calibration.input_ids.shape[1])})
            manifest.update(exp.finish(manifest) or {})
            write_json_atomic(tmp / "quantfoundry.json", manifest)
            exp.verify(tmp)
            if out_path.exists():
                shutil.rmtree(out_path)
            tmp.rename(out_path)
            tmp = None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

    # -- evaluate: in memory, the written artifact, the original ----------------------------
    metrics: dict[str, dict[str, dict[str, Any]]] = {}
    if evals:
        evaluation = Evaluation.of(evals)
        linears = source.linear_shapes()
        info = {"quantized_linears": [n for n in plan.quantized() if n in linears], "calibration": manifest.get("calibration"),
                "progress": progress}
        reference = make_reference(source, tokenizer, dev, cache=cache, info=info)
        _float_params_to_float32(model_obj)  # evaluation runs in float32 whatever the block dtype was
        engine = None
        try:
            evaluation.measure(EvalTarget(model_obj, tokenizer, source, "quantized", dev,
                                          float_dtype=source.storage_dtype, info=info, reference=reference),
                               "quantized")
            if out_path is not None and artifact_eval:
                if not keep_model:
                    model_obj = None
                    trim_memory()
                art_model, engine, how = open_artifact(out_path, exp, dev, kernel)
                if art_model is None and engine is None:
                    ctx.note(f"artifact not evaluated: {how}")
                else:
                    evaluation.measure(EvalTarget(art_model, tokenizer, source, "artifact", dev,
                                                  float_dtype=source.storage_dtype,
                                                  info={**info, "artifact_path": str(out_path)},
                                                  engine=engine, reference=reference), "artifact", which="artifact")
                    del art_model
                    evaluation.artifact = {"path": str(out_path), "opened": how}
                    if engine is not None and (tok := evaluation.check_tokenizer(engine, tokenizer)):
                        evaluation.artifact["tokenizer"] = tok
                    for line in evaluation.check_artifact(engine):
                        ctx.note(f"MISMATCH between the artifact and the in-memory model: {line}; "
                                 "the export lost something")
            evaluation.measure_original(reference)
        finally:
            reference.release()
            if engine is not None:
                engine.close()
        metrics = evaluation.metrics
        manifest["evaluation"] = evaluation.to_json(dev, reference)
        manifest["notes"] = list(ctx.notes)
        if out_path is not None:
            write_json_atomic(out_path / "quantfoundry.json", manifest)
    seconds = time.perf_counter() - t_start
    return RunResult(out_path, plan, metrics, ctx.notes, manifest, seconds,
                     model=model_obj if keep_model else None)


def _warm_hash(source: ModelSource) -> None:
    """Compute (and cache) the source's hash; a failure is left for the manifest to raise."""
    try:
        _ = source.sha256
    except Exception:  # noqa: BLE001 - re-raised by the main thread's own access
        pass


def summarize_plan(plan: QuantPlan, show: int = 3) -> list[str]:
    """One line per distinct fallback or keep-in-float reason, naming a few tensors."""
    groups: dict[str, list[str]] = {}
    for e in plan.fallbacks().values():
        groups.setdefault(f"fallback {e.requested.spec} -> {e.format.spec} ({e.reason.split(':')[0]})", []).append(e.name)
    for e in plan.kept_float().values():
        groups.setdefault(f"kept in float ({e.reason})", []).append(e.name)
    lines = []
    for what, names in groups.items():
        more = f", ... (+{len(names) - show})" if len(names) > show else ""
        lines.append(f"{what}: {len(names)} tensor(s): {', '.join(names[:show])}{more}")
    return lines


def _check_plan(plan: QuantPlan, stages: list[Quantizer], exp: Exporter, dev: torch.device,
                kernel: str | None, kernel_options: Mapping[str, Any] | None) -> None:
    for fmt in plan.formats():
        for s in stages:
            reason = s.check_format(fmt)
            if reason:
                raise IncompatiblePlanError(f"quantizer {s.name!r} cannot round onto {fmt.spec}: {reason}")
        reason = exp.check_format(fmt)
        if reason:
            raise IncompatiblePlanError(
                f"exporter {exp.name!r} cannot store {fmt.spec}: {reason}; it stores {exp.storable()}")
        select_kernel(fmt, dev, kernel, dict(kernel_options or {}))
    for s in stages:
        avoid = s.permutes_columns()
        if avoid and not exp.stores_permutation:
            raise IncompatiblePlanError(
                f"quantizer {s.name!r} stores weights in a permuted column order, which exporter "
                f"{exp.name!r} cannot hold; {avoid}")
    if not plan.quantized():
        raise IncompatiblePlanError("the plan quantizes no tensor: every linear was kept in float "
                                    "(see the reasons with `qf run ... --dry-run`)")


def _export_outside_blocks(exp: Exporter, source: ModelSource, quantized: dict[str, QuantizedWeight]) -> None:
    prefix = source.architecture.layers + "."
    for name in sorted(source.tensor_info):
        if not name.startswith(prefix):
            exp.write(name, quantized[name].to("cpu") if name in quantized else source.read([name])[name])


def _float_params_to_float32(model: torch.nn.Module) -> None:
    """Upcast float parameters (not QuantLinear codes or grid parameters, which stay as stored)."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


def load(path: str | Path, *, device: str | torch.device = "cpu", kernel: str | None = None,
         dtype: str = "float32") -> torch.nn.Module:
    """Reload an artifact written by ``qf run`` (through the exporter its manifest names)."""
    from .manifest import read_manifest

    folder = Path(path)
    manifest = read_manifest(folder)
    exp: Exporter = make("exporter", manifest["exporter"]["name"], {})
    if dtype not in _DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    try:
        return exp.load(folder, _device(device), kernel, _DTYPES[dtype])
    except NotImplementedError as exc:
        raise UsageError(f"{exc}; evaluate it with the engine that serves it") from None
