"""One run of the pipeline as four named stages over one :class:`RunState`::

    state = resolve(RunRequest(...))   # components and options, all checked; no model touched
    load_and_plan(state)               # the source model, its guards, the plan, calibration
    quantize_and_export(state)         # block by block into the journal, then the artifact
    evaluate(state)                    # the in-memory model, the written artifact, the original

:func:`quantfoundry.run` is exactly these four calls.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

import torch

from ..data import default_model_path
from ..deploy.targets import target
from ..distributed import env_rank, env_world, local_device, parse_devices
from ..errors import IncompatiblePlanError, QFError, UsageError
from ..evaluation.reference import cache_root, model_fingerprint
from ..evaluation.windows import default_text_warning
from ..files import write_json_atomic
from ..formats import resolve_format
from ..memory import trim_memory
from ..model.blocks import BlockStream
from ..model.experts import ROUTINGS
from ..model.materialize import materialize, materialize_outside_blocks
from ..model.source import ModelSource, resolve_model
from ..phases import phase
from ..plugins import get_plugin_manager
from ..progress import Progress
from ..roles.activation import ActQuant
from ..roles.block import QuantContext
from ..roles.calibrator import CalibrationSet
from ..roles.evaluator import EvalTarget
from ..roles.exporter import Exporter
from ..roles.format import Format, QuantizedWeight
from ..roles.plan import QuantPlan
from ..roles.planner import Budget, Planner, PlanRequest
from ..roles.quantizer import Quantizer, Transform
from ..toolkit.kernels import select_kernel, select_kernels, swap_in
from . import artifact
from .activations import attach_input_quant, calibrate_kv, restore_kv, simulated_inputs
from .components import device_of, dtype_of, exporter_and_format, make
from .evaluate import Evaluation, check_evaluator_devices, dequantized_dtypes, make_reference, open_artifact
from .interrupt import EvaluationInterrupted, RunInterrupted, StopAtBlockBoundary
from .journal import BlockRecord, Journal
from .manifest import build_manifest
from .quantize import (
    block_importance,
    module_entries,
    quantize_outside_blocks,
    restore_block,
    run_block,
    set_dequantized,
    stored,
    swap_in_block,
)
from .resume import open_journal
from .state import RunRequest, RunState, Spec, loaded

__all__ = ["RunRequest", "RunState", "evaluate", "load_and_plan", "quantize_and_export", "resolve"]


# -- 1. resolve ---------------------------------------------------------------------------------

def resolve(request: RunRequest) -> RunState:
    """Every component by name and every option parsed and checked, before the model is touched."""
    get_plugin_manager()
    devices = parse_devices(request.devices) if request.devices else None
    dev = devices[0] if devices else local_device(device_of(request.device))
    world, rank = (len(devices), 0) if devices else (env_world(), env_rank())
    if rank != 0:  # a worker: rank 0 writes the artifact, evaluates and reports
        request = replace(request, out=None, evaluators=[], progress=False, overwrite=False,
                          report=lambda _line: None)
    dtype = dtype_of(request.dtype)
    dtype_of(request.eval_dtype)  # checked before any work
    if request.batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {request.batch_size}")
    if request.expert_routing not in ROUTINGS:
        raise UsageError(f"expert routing must be one of {', '.join(ROUTINGS)}, got {request.expert_routing!r}")
    if request.expert_min_tokens < 0:
        raise UsageError(f"expert_min_tokens must be >= 0, got {request.expert_min_tokens}")
    request, target_note = _target(request)
    quantizer_spec = request.quantizer if request.quantizer is not None else "rtn"
    specs: list[Spec] = [(quantizer_spec, request.quantizer_options or {})] \
        if isinstance(quantizer_spec, str) else list(quantizer_spec)
    if not specs:
        raise UsageError("at least one quantizer is needed (e.g. --quantizer rtn)")
    transforms, quantizer = _recipe(specs)
    exporter, exporter_options, format, preset_note = exporter_and_format(
        request.exporter, request.exporter_options, request.format, request.format_options)
    exp: Exporter = make("exporter", exporter, exporter_options)
    spec = format or exp.default_format
    requested = resolve_format(spec, request.format_options) if spec else None
    if request.imatrix and quantizer.scope == "model":
        raise UsageError("an imatrix is collected block by block; a whole-model quantizer cannot use it")
    if request.resume and quantizer.scope == "model":
        raise UsageError(f"quantizer {quantizer.name!r} works on the whole model at once: there are no "
                         "finished blocks to resume from; drop --resume")
    acts = _activations(request, exp, requested)
    if acts is not None and not acts.dynamic and quantizer.scope == "model":
        raise UsageError(f"static activation scales are calibrated block by block, and quantizer {quantizer.name!r} "
                         f"works on the whole model: use {acts.dtype} (dynamic per-token scales)")
    kv = _kv_cache(request, exp, quantizer)
    planner = _planner(request)
    needs_calib = quantizer.needs_calibration or any(t.needs_calibration for t in transforms) or request.imatrix \
        or (acts is not None and not acts.dynamic) or kv is not None \
        or (planner is not None and planner.needs_calibration)
    cal = None
    if needs_calib or request.calibrator or request.calibrator_options:
        cal = make("calibrator", request.calibrator or "text", request.calibrator_options)
    evals = [make("evaluator", *((ev, {}) if isinstance(ev, str) else ev)) for ev in request.evaluators or []]
    check_evaluator_devices(evals, dev)
    out = Path(request.out) if request.out is not None else None
    if request.resume and out is None:
        raise UsageError("--resume continues a run that writes an artifact; pass --out")
    if world > 1:
        _check_distributed(request, transforms, quantizer, acts, kv, world)
    state = RunState(request, dev, dtype, specs, transforms, quantizer, exp, requested, cal, evals, out, acts, kv,
                     planner, world=world, rank=rank)
    if target_note:
        state.say(target_note)
    if preset_note:
        state.say(preset_note)
    if out is not None:
        artifact.check_writable(out)
        for line in artifact.clean_dead_runs(out):
            state.say(line)
        if out.exists() and not request.overwrite:
            raise UsageError(f"{out} already exists; pass --overwrite or choose another --out")
    return state


def _check_distributed(request: RunRequest, transforms: list[Transform], quantizer: Quantizer,
                       acts: ActQuant | None, kv: ActQuant | None, world: int) -> None:
    """What a run across ``world`` processes cannot do, refused before any work."""
    where = f"a run across {world} processes"
    if quantizer.scope == "model":
        raise UsageError(f"quantizer {quantizer.name!r} works on the whole model at once; {where} shards block "
                         "work: run it on one device (--device)")
    if quantizer.refines_model():
        raise UsageError(f"quantizer {quantizer.name!r} fine-tunes the whole model after the blocks, which {where} "
                         "does not do: run it on one device (--device)")
    for stage in (*transforms, quantizer):
        if stage.needs_calibration and not stage.shards_calibration:
            raise UsageError(f"{stage.name!r} measures its calibration inputs outside the toolkit's collectors, "
                             f"so {where} cannot shard them: run it on one device (--device)")
    if (acts is not None and not acts.dynamic) or kv is not None:
        raise UsageError(f"static activation and KV-cache scales are not reduced over processes yet; {where} "
                         "cannot calibrate them: run it on one device (--device), or use dynamic activations")
    if request.resume:
        raise UsageError(f"{where} does not resume; the journal it left is a one-device run's: resume it on one "
                         "device (same command with --device instead of --devices) — the artifact is the same")


def _activations(request: RunRequest, exp: Exporter, requested: Format | None) -> ActQuant | None:
    """The run's activation scheme: ``--activations``, else the exporter's own; checked against
    the exporter before any work."""
    own = exp.activations()
    if request.activations is None:
        if request.act_observer != "absmax" and (own is None or own.dynamic):
            raise UsageError("--act-observer calibrates static activation scales; add --activations int8-static "
                             "or fp8-static")
        if own is not None and request.act_observer != own.observer:
            own = ActQuant(own.dtype, dynamic=own.dynamic, observer=request.act_observer)  # type: ignore[arg-type]
        act = own
    else:
        try:
            act = ActQuant.from_spec(request.activations, request.act_observer)
        except ValueError as exc:
            raise UsageError(f"--activations: {exc}") from None
        if own is not None and own.spec != act.spec:
            raise UsageError(f"exporter {exp.name!r} is set up for {own.spec} activations and --activations asks "
                             f"for {act.spec}: change one of them")
        if act.dynamic and request.act_observer != "absmax":
            raise UsageError(f"--act-observer calibrates static scales, and {act.spec} computes its scales per "
                             f"token at run time; use {act.dtype}-static")
    if act is None:
        return None
    reason = exp.check_activations(act, requested)
    if reason:
        raise IncompatiblePlanError(f"exporter {exp.name!r} cannot store {act.spec} activations: {reason}")
    return act


def _target(request: RunRequest) -> tuple[RunRequest, str | None]:
    """The request with the target engine's exporter, format and quantizer where none was given,
    and the line that says what was chosen and why."""
    if request.target is None:
        return request, None
    t = target(request.target)
    chosen = {}
    if request.exporter is None:
        chosen["exporter"] = t.exporter
    if request.format is None and (request.exporter in (None, t.exporter)):
        chosen["format"] = t.format
    if request.quantizer is None:
        chosen["quantizer"] = t.quantizer
    if not chosen:
        return request, f"--target {t.name}: every choice was given explicitly"
    what = ", ".join(f"--{k} {v}" for k, v in chosen.items())
    return replace(request, **chosen), f"--target {t.name}: {what} — {t.why}"


def _planner(request: RunRequest) -> Planner | None:
    """The run's planner with its budget checked (``--planner`` needs one of ``--target-bpw`` and
    ``--target-size``, and they need a planner)."""
    targets = request.target_bpw is not None or request.target_size is not None
    if request.planner is None:
        if targets:
            raise UsageError("--target-bpw/--target-size give a planner its budget; add --planner kl")
        if request.planner_options:
            raise UsageError("--planner-opt sets a planner's options; add --planner NAME")
        return None
    if request.target_bpw is not None and request.target_size is not None:
        raise UsageError("give one budget: --target-bpw or --target-size, not both")
    if not targets:
        raise UsageError(f"planner {request.planner!r} needs a budget: --target-bpw 4.5 or --target-size 3.9GB")
    try:
        Budget.of(1, target_bpw=request.target_bpw, target_size=request.target_size)
    except ValueError as exc:
        raise UsageError(f"--target-{'bpw' if request.target_bpw is not None else 'size'}: {exc}") from None
    planner: Planner = make("planner", request.planner, request.planner_options)
    return planner


def _kv_cache(request: RunRequest, exp: Exporter, quantizer: Quantizer) -> ActQuant | None:
    """The run's KV-cache scheme (``--kv-cache fp8``), checked against the exporter before any work."""
    if request.kv_cache is None:
        return None
    if request.kv_cache.strip().lower() != "fp8":
        raise UsageError(f"--kv-cache: unknown scheme {request.kv_cache!r}; use fp8 (vLLM's fp8 KV cache: keys and "
                         "values in e4m3 with one static scale each per layer)")
    if quantizer.scope == "model":
        raise UsageError(f"KV-cache scales are calibrated block by block, and quantizer {quantizer.name!r} works on "
                         "the whole model; drop --kv-cache")
    act = ActQuant("fp8", dynamic=False)
    reason = exp.check_kv_cache(act)
    if reason:
        raise IncompatiblePlanError(f"exporter {exp.name!r} cannot store an fp8 KV cache: {reason}")
    return act


def _recipe(specs: list[Spec]) -> tuple[list[Transform], Quantizer]:
    """The stages named in order: transforms (or quantizers offering one), then one quantizer."""
    *before, (last_name, last_opts) = specs
    last = make("quantizer", last_name, last_opts)
    if isinstance(last, Transform):
        raise UsageError(f"the last stage {last.name!r} only transforms; add a rounding quantizer after it "
                         "(e.g. --quantizer rtn)")
    transforms: list[Transform] = []
    for name, opts in before:
        stage = make("quantizer", name, opts)
        if isinstance(stage, Quantizer):
            offered = stage.as_transform()
            if offered is None:
                raise UsageError(f"quantizer {stage.name!r} rounds weights and offers no transform, so it must be "
                                 f"the last stage; put transforms (e.g. awq, smoothquant) before {last.name!r}")
            stage = offered
        transforms.append(stage)
    if last.scope == "model" and transforms:
        raise UsageError(f"the whole-model quantizer {last.name!r} cannot follow block transforms")
    return transforms, last


# -- 2. load and plan ---------------------------------------------------------------------------

def load_and_plan(state: RunState, *, dry_run: bool = False) -> None:
    """Load and guard the source model, make and check the plan, load the calibration tokens
    (``dry_run``: no weight is read and nothing calibrated — the plan only)."""
    r = state.request
    model = r.model if r.model is not None else default_model_path()
    if r.force_requantize:
        model = _dequantized_input(state, Path(model))
    source = resolve_model(model, allow_pickle=r.allow_pickle,
                           trust_remote_code=r.trust_remote_code, revision=r.revision, check_weights=False)
    state.source = source
    if not dry_run:
        # NaN/Inf guard: the tensors outside the decoder blocks now; each block's as the block loop
        # reads them (in its prefetch thread), so the checkpoint is read once, not twice
        source.check_finite([n for n, (dt, _shape) in source.tensor_info.items()
                             if dt.is_floating_point and source.block_index(n) is None])
    plan = state.exporter.plan(source, state.requested, collects_importance=r.imatrix)
    if state.planner is not None:
        plan = _mixed_plan(state, source, plan)
    if state.activations is not None:
        for entry in plan.quantized().values():
            if source.block_index(entry.name) is not None:
                entry.input_quant = state.activations
    _check_plan(plan, state)
    state.plan = plan
    if state.out is not None and not dry_run:
        artifact.check_free_space(state.out, 2 * _artifact_bytes(source, plan))
    ctx = QuantContext(device=state.device, source=source, notes=state.notes, progress=r.progress)
    state.ctx = ctx
    brought = state.exporter.importance(source)
    if brought:
        if r.imatrix:
            raise UsageError(f"exporter {state.exporter.name!r} brings an importance matrix and --imatrix asks "
                             "to collect one: choose one of them")
        ctx.importance.update(brought)
        ctx.note(f"importance of {len(brought)} linear(s) from exporter {state.exporter.name!r}")
    for line in summarize_plan(plan):
        ctx.note(line)
    plan.kv_cache = state.kv_cache
    if state.kv_cache is not None:
        ctx.note("KV cache: fp8 (e4m3) keys (after RoPE) and values, one static scale each per layer (absmax "
                 "observer), simulated in the block loop and in evaluation")
    if state.activations is not None:
        ctx.note(f"activations: {state.activations.describe()}, on the inputs of "
                 f"{len(plan.activations())} quantized linear(s) (simulated in the block loop and in evaluation)")
    state.passthrough = _passthrough(source)
    if state.passthrough:
        names = [n for ns in state.passthrough.values() for n in ns]
        ctx.note(f"{len(names)} checkpoint tensor(s) inside the blocks are no parameter of the model "
                 f"(written as stored): {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")
    if dry_run:
        return
    # the manifest's model hash reads every weight file once: in the background, while the
    # blocks are quantized (hashlib and file reads release the GIL)
    if state.rank == 0:  # a worker writes no manifest
        state.hashing = threading.Thread(target=_warm_hash, args=(source,), name="qf-sha256", daemon=True)
        state.hashing.start()
    if r.imatrix:
        ctx.note("imatrix: importance (mean squared input activation per channel) collected from the "
                 "calibration text before each block is quantized")
    if state.calibrator is not None and not state.needs_calibration:
        if state.planner is None or not state.planner.needs_calibration:
            ctx.note(f"calibrator {state.calibrator.name!r} not used: "
                     f"{', '.join(n for n, _ in state.stage_specs)} needs no calibration")
        state.calibrator = None
    if (state.calibrator is not None or state.evaluators) and state.tokenizer is None:
        state.tokenizer = source.tokenizer()
    if state.calibrator is not None and state.calibration is None:
        _load_calibration(state)
    if state.world > 1:
        if state.calibration is not None and state.needs_calibration:
            batches = len(list(state.calibration.batches(r.batch_size)))
            if batches < state.world:
                raise UsageError(f"{batches} calibration batch(es) for {state.world} processes: each process needs "
                                 "one at least; lower --batch-size or raise the calibrator's n_samples")
            ctx.note(f"{state.world} processes: {batches} calibration batches of {r.batch_size} sharded over them "
                     "(batch i on rank i mod world), statistics reduced over the ranks")
        else:
            ctx.note(f"{state.world} processes, but nothing is calibrated: each rounds the same weights")


def _dequantized_input(state: RunState, path: Path) -> Path:
    """``--force-requantize``: a quantized input dequantized into a float checkpoint (cached by the
    input's path, size and time), and notes saying what the report can and cannot measure."""
    import hashlib

    from ..deploy.requantize import dequantize, quantized_input

    found = quantized_input(path)
    if found is None:
        state.say(f"--force-requantize: {path} is not quantized; it is used as it is")
        return path
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = cache_root()
    out = (root / "requantize" / key) if root is not None else Path(tempfile.mkdtemp(prefix="qf-requantize-")) / "float"
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        info = dequantize(path, out, trust_remote_code=state.request.trust_remote_code)
        state.say(f"--force-requantize: {found[0]}; dequantized with {info['reader']} into {out}")
    first = ""
    manifest = path / "quantfoundry.json"
    if manifest.is_file():
        try:
            kl = json.loads(manifest.read_text())["evaluation"]["metrics"]["kl"]["kl_mean"]
            first = f"; the first rounding's KL to its original was {kl.get('artifact', kl.get('quantized')):.4g}"
        except (OSError, ValueError, KeyError, TypeError):
            first = ""
    state.say("--force-requantize: this run's reference is the dequantized input, not the original, so its KL and "
              "perplexity are the second rounding's loss alone; the first rounding's loss comes on top" + first)
    return out


def _load_calibration(state: RunState) -> None:
    if state.calibrator is None:  # pragma: no cover - callers check
        raise RuntimeError("no calibrator")
    if state.tokenizer is None:
        state.tokenizer = loaded_source(state).tokenizer()
    state.calibration = state.calibrator.load(state.tokenizer)
    for line in state.calibration.info.get("warnings", []):
        state.notes.append(line)


def loaded_source(state: RunState) -> ModelSource:
    if state.source is None:  # pragma: no cover - callers check
        raise RuntimeError("no source model")
    return state.source


def plan_request(state: RunState, source: ModelSource, plan: QuantPlan) -> PlanRequest:
    """What the run's planner gets for the exporter's ``plan``: the exporter's candidates (refused
    before any work when it stores no mix), ties, the budget in bytes and the bytes of everything
    else; the calibration is loaded when the planner measures on it."""
    planner, exp, r = state.planner, state.exporter, state.request
    if planner is None:  # pragma: no cover - callers check
        raise RuntimeError("no planner")
    candidates = exp.mix_candidates(source, plan)
    for name, options in candidates.items():
        if name not in plan.entries or not options:
            raise IncompatiblePlanError(f"exporter {exp.name!r} offered no candidate format for {name}")
    ties = [tuple(n for n in tie if n in candidates) for tie in exp.mix_ties(source, plan)]
    ties = [tie for tie in ties if len(tie) > 1]
    for tie in ties:
        if len({tuple(f.spec if f else None for f in candidates[n]) for n in tie}) > 1:
            raise IncompatiblePlanError(f"exporter {exp.name!r} ties {', '.join(tie)} to one format but offers "
                                        "them different candidates")
    if state.activations is not None:
        raise IncompatiblePlanError(f"planner {planner.name!r} chooses weight formats for weight-only runs; "
                                    f"drop --activations {state.activations.spec} (or the exporter's scheme)")
    float_bytes: dict[str, int] = {}
    fixed = 0
    parameters = 0
    quantized = plan.quantized()
    for name, (dtype, shape) in source.tensor_info.items():
        numel = int(torch.Size(shape).numel())
        if dtype.is_floating_point:
            parameters += numel
        module = name.removesuffix(".weight")
        stored = numel * exp.stored_float_dtype(name, dtype).itemsize
        if name.endswith(".weight") and module in candidates:
            float_bytes[module] = stored
        elif name.endswith(".weight") and module in quantized and len(shape) == 2:
            fixed += quantized[module].format.nbytes((int(shape[0]), int(shape[1])))  # type: ignore[union-attr]
        else:
            fixed += stored
    budget = Budget.of(parameters, target_bpw=r.target_bpw, target_size=r.target_size)
    if planner.needs_calibration and state.calibrator is not None and state.calibration is None:
        state.tokenizer = source.tokenizer()
        _load_calibration(state)
    return PlanRequest(source=source, plan=plan, candidates=candidates, ties=ties, budget=budget, fixed_bytes=fixed,
                       float_bytes=float_bytes, calibration=state.calibration,
                       importance=exp.importance(source) or {}, collects_importance=r.imatrix,
                       device=state.device, dtype=state.dtype,
                       fingerprint=model_fingerprint(source, cache_root() if r.cache else None),
                       cache=(cache_root() / "planner") if r.cache and cache_root() else None,
                       note=state.notes.append, progress=r.progress)


def _mixed_plan(state: RunState, source: ModelSource, plan: QuantPlan) -> QuantPlan:
    """The planner's plan for the exporter's ``plan``, checked against the budget and adopted by
    the exporter."""
    planner, exp = state.planner, state.exporter
    if planner is None:  # pragma: no cover - callers check
        raise RuntimeError("no planner")
    request = plan_request(state, source, plan)
    budget, candidates = request.budget, request.candidates
    smallest = request.smallest_bytes()
    if smallest > budget.bytes:
        raise UsageError(f"the budget ({budget.asked}: {budget.bytes:,} bytes) is below the smallest plan exporter "
                         f"{exp.name!r} can store ({smallest:,} bytes, {8 * smallest / budget.parameters:.3f} bpw); "
                         "raise the target")
    with phase("plan"):
        try:
            mixed = planner.plan(request)
        except ValueError as exc:
            raise UsageError(f"planner {planner.name!r}: {exc}") from None
    missing = sorted(set(plan.entries) - set(mixed.entries))
    if missing:
        raise UsageError(f"planner {planner.name!r} dropped {missing[0]} from the plan")
    chosen = {n: mixed.entries[n].format for n in candidates}
    total = request.total_bytes(chosen)
    if total > budget.bytes:
        raise UsageError(f"planner {planner.name!r} chose {total:,} tensor bytes, over the budget of "
                         f"{budget.bytes:,} ({budget.asked}); raise the target")
    parameters = budget.parameters
    mixed.planner = {"name": planner.name, "budget_bytes": budget.bytes, "budget": budget.asked,
                     "planned_bytes": total, "planned_bpw": round(8 * total / parameters, 4),
                     "smallest_bytes": request.smallest_bytes(), "largest_bytes": request.largest_bytes(),
                     **(mixed.planner or {})}
    counts: dict[str, int] = {}
    for fmt in chosen.values():
        counts[fmt.spec if fmt else "float"] = counts.get(fmt.spec if fmt else "float", 0) + 1
    state.notes.append(f"planner {planner.name!r}: {total:,} tensor bytes for a budget of {budget.bytes:,} "
                       f"({budget.asked}; {8 * total / parameters:.3f} bpw): "
                       + ", ".join(f"{n} x {s}" for s, n in sorted(counts.items())))
    exp.adopt_plan(source, mixed)
    return mixed


def _artifact_bytes(source: ModelSource, plan: QuantPlan) -> int:
    """The artifact's size as planned: quantized tensors at their format's bytes, the rest as stored."""
    quantized = plan.quantized()
    total = 0
    for name, (dtype, shape) in source.tensor_info.items():
        entry = quantized.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        if entry is not None and entry.format is not None and len(shape) == 2:
            total += entry.format.nbytes((int(shape[0]), int(shape[1])))
        else:
            total += int(torch.Size(shape).numel()) * dtype.itemsize
    return total


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


def _check_plan(plan: QuantPlan, state: RunState) -> None:
    stages: list[Transform | Quantizer] = [*state.transforms, state.quantizer]
    exp = state.exporter
    for fmt in plan.formats():
        for s in stages:
            reason = s.check_format(fmt)
            if reason:
                raise IncompatiblePlanError(f"{'transform' if isinstance(s, Transform) else 'quantizer'} "
                                            f"{s.name!r} cannot work with {fmt.spec}: {reason}")
        reason = exp.check_format(fmt)
        if reason:
            raise IncompatiblePlanError(
                f"exporter {exp.name!r} cannot store {fmt.spec}: {reason}; it stores {exp.storable()}")
        select_kernel(fmt, state.device, state.request.kernel, state.kernel_options())
    for entry in plan.quantized().values():
        reason = state.quantizer.check_shape(tuple(entry.shape))
        if reason:
            raise IncompatiblePlanError(f"quantizer {state.quantizer.name!r} cannot work on {entry.name} "
                                        f"{tuple(entry.shape)}: {reason}")
        if entry.input_quant is not None and entry.format is not None:
            reason = exp.check_activations(entry.input_quant, entry.format)
            if reason:
                raise IncompatiblePlanError(f"exporter {exp.name!r} cannot store {entry.name} ({entry.format.spec}) "
                                            f"with {entry.input_quant.spec} activations: {reason}")
    avoid = state.quantizer.permutes_columns()
    if avoid and not exp.stores_permutation:
        raise IncompatiblePlanError(
            f"quantizer {state.quantizer.name!r} stores weights in a permuted column order, which exporter "
            f"{exp.name!r} cannot hold; {avoid}")
    missing = state.quantizer.makes_transforms() - exp.stores_transforms
    if missing:
        raise IncompatiblePlanError(
            f"quantizer {state.quantizer.name!r} stores weights with run-time transforms ({', '.join(sorted(missing))}) "
            f"that exporter {exp.name!r} cannot hold; use --exporter qf")
    if not plan.quantized():
        raise IncompatiblePlanError("the plan quantizes no tensor: every linear was kept in float "
                                    "(see the reasons with `qf run ... --dry-run`)")


def _passthrough(source: ModelSource) -> dict[int, list[str]]:
    params = source.parameter_names()
    out: dict[int, list[str]] = {}
    for name in source.tensor_info:
        index = source.block_index(name)
        if index is not None and name not in params:
            out.setdefault(index, []).append(name)
    return out


def _warm_hash(source: ModelSource) -> None:
    """Compute (and cache) the source's hash; a failure is left for the manifest to raise."""
    try:
        _ = source.sha256
    except Exception:  # noqa: BLE001 - re-raised by the main thread's own access
        pass


# -- 3. quantize and export ---------------------------------------------------------------------

def quantize_and_export(state: RunState) -> None:
    """Quantize block by block (or the whole model) into the journal, then stream the journal
    into the exporter, verify and put the artifact in place."""
    journal = open_journal(state) if state.out is not None else None
    try:
        _quantize_and_export(state, journal)
    except RunInterrupted:
        raise
    except QFError:  # the inputs are at fault (bad weights, a refused export): a rerun fails the same way
        if journal is not None:
            journal.remove()
        raise
    except BaseException as exc:  # a crash (out of memory, disk full, Ctrl-C twice): the blocks done are kept
        kept = journal is not None and journal.finished()
        refused = artifact.disk_error(exc)
        if refused is not None:
            if journal is not None and not kept:
                journal.remove()
            resume = (f"the journal {journal.folder} keeps {journal.finished()} finished block(s): run the same "
                      "command with --resume to continue (or delete it)") if kept and journal is not None \
                else "then run the same command again"
            raise artifact.OutputDiskError(f"the output disk refused a write ({refused}); free space (or fix "
                                           f"the permissions) on the disk of {state.out}; {resume}") from None
        if kept and journal is not None:
            state.say(f"the journal {journal.folder} keeps {journal.finished()} finished block(s): once the cause "
                      "is fixed, run the same command with --resume to continue")
        raise


def _quantize_and_export(state: RunState, journal: Journal | None) -> None:
    source, ctx = loaded(state)
    if state.quantizer.scope != "model" and state.quantizer.refines_model():
        _check_refine(state)  # before the block loop, not after it
    state.model = source.skeleton(state.dtype)
    if state.keep:  # evaluation needs the embeddings and the head in memory too
        materialize_outside_blocks(state.model, source, dtype=state.dtype, device=state.device)
    if state.quantizer.scope == "model":
        outside = _quantize_whole_model(state, journal)
    else:
        _quantize_blocks(state, journal)
        outside = quantize_outside_blocks(state.model if state.keep else None, source, state.plan, ctx,
                                          kernel_name=state.request.kernel, kernel_options=state.kernel_options())
        if state.quantizer.refines_model():
            with phase("refine"):
                _refine_model(state, journal)
    if ctx.importance and not ctx.importance.read:
        names = ", ".join(repr(n) for n, _ in state.stage_specs)
        where = "--imatrix collected" if state.request.imatrix else f"exporter {state.exporter.name!r} brought"
        ctx.note(f"{where} an importance matrix, but {names} never read it (QuantContext.importance): it changed "
                 "nothing; drop it, or use a quantizer that weighs by it (rtn with a GGUF type, gptq, awq)")
    if state.hashing is not None:
        state.hashing.join()
    state.manifest = build_manifest(source=source, stages=[*state.transforms, state.quantizer],
                                    stage_specs=state.stage_specs, requested=state.requested,
                                    exporter=state.exporter, plan=state.plan, calibration=state.calibration,
                                    notes=ctx.notes, evaluation={})
    if state.resumed_from:
        state.manifest["resumed"] = {"from_block": state.resumed_from, "journal": journal.folder.name}
    if journal is not None:
        with phase("export"):
            _export(state, journal, outside)
        journal.remove()
    if not state.keep:
        state.model = None


def _quantize_blocks(state: RunState, journal: Journal | None) -> None:
    source, ctx = loaded(state)
    r = state.request
    calibrate = state.calibration is not None and state.needs_calibration
    stream = BlockStream(source, model=state.model, calibration=state.calibration if calibrate else None,
                         batch_size=r.batch_size, device=state.device, dtype=state.dtype, plan=state.plan,
                         keep=state.keep, shard=state.world > 1)
    with Progress(enabled=r.progress, total=len(stream), label="quantizing") as bar, \
            StopAtBlockBoundary() as stop:
        for block in stream:
            if block.index < state.resumed_from and journal is not None:
                record = journal.read_block(block.index)
                out = restore_block(block, record.entries, state.device)
                for line in record.notes:
                    ctx.note(line)
                ctx.importance.update(record.importance)
                restore_kv(block, record.extras, state.model)
                with simulated_inputs(block.module, out):
                    stream.finish(block)
                swap_in_block(block, out, r.kernel, state.kernel_options())
                bar.advance()
                continue
            noted = len(ctx.notes)
            importance: dict[str, torch.Tensor] = {}
            if r.imatrix and block.inputs is not None:
                with phase("calibrate"):
                    importance = block_importance(block)
                ctx.importance.update(importance)
            out = run_block(state.transforms, state.quantizer, block, ctx, routing=r.expert_routing,
                            min_tokens=r.expert_min_tokens)
            if block.inputs is not None:  # the block runs again for the next block's inputs
                set_dequantized(block, out)
            out = attach_input_quant(block, out, state.plan)
            extras = calibrate_kv(block, state.plan.kv_cache, state.model)
            with simulated_inputs(block.module, out) as simulated:
                if simulated or extras:
                    block.outputs = None  # the rounding stage's run had float inputs and no KV cache
                stream.finish(block)
            swap_in_block(block, out, r.kernel, state.kernel_options())
            if journal is not None:
                entries = module_entries(state.model, block.module, block.prefix, source)
                journal.write_block(block.index, BlockRecord(entries, ctx.notes[noted:], importance, extras))
            bar.advance()
            if stop.requested and block.index + 1 < len(stream):
                where = f"block {block.index + 1} of {len(stream)}"
                if journal is None:
                    raise RunInterrupted(f"stopped on {stop.requested} after {where}; a run without --out keeps "
                                         "no journal, so it cannot be resumed")
                raise RunInterrupted(f"stopped on {stop.requested} after {where}; the journal {journal.folder} "
                                     "keeps the finished blocks: run the same command with --resume "
                                     "(Python: resume=True) to continue")


def _check_refine(state: RunState) -> CalibrationSet:
    """The run's calibration, checked for a quantizer that refines the whole model on it."""
    cal, name = state.calibration, state.quantizer.name
    if cal is None:
        raise UsageError(f"quantizer {name!r} refines the model on calibration text; the run has none "
                         "(use --calibrator text)")
    if not cal.uniform:
        raise UsageError(f"quantizer {name!r} refines the model on windows of one length, but the calibrator "
                         "gave samples of several lengths; pass --calibrator-opt packing=true")
    return cal


def _refine_model(state: RunState, journal: Journal | None) -> None:
    """The quantizer's end-to-end pass (:meth:`Quantizer.refine_model`) over the whole quantized
    model, against the original loaded beside it; the weights it returns are swapped in and every
    block's journal record is written again, so the artifact holds the refined blocks."""
    source, ctx = loaded(state)
    quantizer, model, calibration = state.quantizer, state.model, _check_refine(state)
    if model is None:  # pragma: no cover - state.keep holds it for a refining quantizer
        raise RuntimeError("the quantized model was not kept for the refinement")
    reference = source.skeleton(state.dtype)
    materialize(reference, reference, "", source, dtype=state.dtype, device=state.device)
    try:
        out = quantizer.refine_model(model, reference.eval(), calibration.input_ids.to(state.device), ctx)
    finally:
        del reference
        trim_memory()
    prefix = source.architecture.layers + "."
    for name, qw in out.items():
        if not name.startswith(prefix):
            raise UsageError(f"quantizer {quantizer.name!r} refined {name}, outside the decoder blocks")
        swap_in(model, name, qw.to(state.device), select_kernels(qw.format, state.device, state.request.kernel,
                                                                   state.kernel_options()))
    if journal is not None:
        for index in range(source.num_layers):
            old = journal.read_block(index)
            name = f"{source.architecture.layers}.{index}"
            entries = module_entries(model, model.get_submodule(name), name, source)
            journal.write_block(index, BlockRecord(entries, old.notes, old.importance, old.extras))


def _quantize_whole_model(state: RunState, journal: Journal | None) -> dict[str, QuantizedWeight]:
    """A ``scope = "model"`` quantizer (QAT): the whole float model at once."""
    source, ctx = loaded(state)
    model, plan, quantizer = state.model, state.plan, state.quantizer
    materialize(model, model, "", source, dtype=state.dtype, device=state.device)
    calibration = None
    if state.calibration is not None:
        if not state.calibration.uniform:
            raise UsageError(f"quantizer {quantizer.name!r} trains on windows of one length, but the calibrator "
                             f"{state.calibrator.name if state.calibrator else ''!r} gave samples of several lengths; "
                             "pass --calibrator-opt packing=true")
        calibration = state.calibration.input_ids
    out = quantizer.quantize_model(model, plan, calibration, ctx) or {}
    want = plan.quantized()
    missing = sorted(n for n in set(want) - set(out) if source.block_index(n) is not None)
    if missing:
        raise UsageError(f"quantizer {quantizer.name!r} returned no weight for {missing[0]} "
                         f"(and {len(missing) - 1} more)")
    for name, qw in out.items():
        if name not in want or qw.format != want[name].format:
            raise UsageError(f"quantizer {quantizer.name!r} returned {name} as {qw.format.spec}, "
                             f"but the plan wants {want[name].format.spec if name in want else 'float'}")
        qw = qw.to(state.device)
        entry = plan.entries.get(name)
        if entry is not None and entry.input_quant is not None:  # dynamic only (static is refused up front)
            qw = replace(qw, input_quant=entry.input_quant)
        swap_in(model, name, qw, select_kernels(qw.format, state.device, state.request.kernel,
                                               state.kernel_options()))
    rest = QuantPlan({n: e for n, e in want.items() if n not in out})  # outside the blocks
    outside = quantize_outside_blocks(model, source, rest, ctx, kernel_name=state.request.kernel,
                                      kernel_options=state.kernel_options())
    if journal is not None:
        journal.write_model(BlockRecord(module_entries(model, model, "", source, outside)))
    return {}  # every tensor, the outside ones included, is in the whole-model record


def _export(state: RunState, journal: Journal, outside: dict[str, QuantizedWeight]) -> None:
    """Stream the journal into the exporter (blocks in order, then the tensors outside the
    blocks), write the manifest, verify, and put the folder in place."""
    source, ctx = loaded(state)
    out, exp = state.out, state.exporter
    if out is None:  # pragma: no cover - callers check
        raise RuntimeError("nothing to export to")
    tmp = artifact.temp_folder(out)
    try:
        exp.begin(tmp, source, state.plan)
        whole = state.quantizer.scope == "model"
        records = [journal.read_model()] if whole else journal.blocks(source.num_layers)
        for index, record in enumerate(records):
            for name, value in record.entries:
                exp.write(name, stored(source, name, value))
            extra = [n for ns in state.passthrough.values() for n in ns] if whole else state.passthrough.get(index, [])
            for name in extra:
                exp.write(name, source.read([name])[name])
            for name, value in record.extras.items():  # block extras (KV-cache scales): as they are
                exp.write(name, value.to("cpu"))
        if not whole:
            prefix = source.architecture.layers + "."
            for name in sorted(source.tensor_info):
                if not name.startswith(prefix):
                    exp.write(name, outside[name].to("cpu") if name in outside else source.read([name])[name])
        if state.request.imatrix and ctx.importance and state.calibration is not None:
            cal = state.calibration
            exp.collected_importance(dict(ctx.importance), {
                "source": cal.source, "tokens": cal.n_tokens, "samples": cal.n_samples,
                "seq_len": int(cal.input_ids.shape[1])})
        state.manifest.update(exp.finish(state.manifest) or {})
        write_json_atomic(tmp / "quantfoundry.json", state.manifest)
        exp.verify(tmp)
        artifact.publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# -- 4. evaluate --------------------------------------------------------------------------------

def evaluate(state: RunState) -> None:
    """Each evaluator on the in-memory model, the written artifact (reopened) and the original."""
    if not state.evaluators:
        return
    source, ctx = loaded(state)
    r, dev = state.request, state.device
    evaluation = Evaluation.of(state.evaluators)
    linears = source.linear_shapes()
    info = {"quantized_linears": [n for n in state.plan.quantized() if n in linears],
            "stored_formats": {n: e.format for n, e in state.plan.quantized().items()
                               if state.exporter.dequantized_dtype(f"{n}.weight") is None},
            "stored_float_dtypes": {**_stored_float_dtypes(source, state.plan, state.exporter),
                                    **dequantized_dtypes(state.plan.quantized(), state.exporter)},
            "calibration": state.manifest.get("calibration"), "progress": r.progress}
    eval_dtype = dtype_of(r.eval_dtype)
    reference = make_reference(source, state.tokenizer, dev, cache=r.cache, info=info, dtype=eval_dtype)
    _float_params_to(state.model, eval_dtype)  # evaluation runs in eval_dtype whatever the block dtype was
    engine = None
    try:
        evaluation.measure(EvalTarget(state.model, state.tokenizer, source, "quantized", dev,
                                      float_dtype=source.storage_dtype, info=info, reference=reference), "quantized")
        if state.out is not None and r.artifact_eval:
            if not r.keep_model:
                state.model = None
                trim_memory()
            art_model, engine, how = open_artifact(state.out, state.exporter, dev, r.kernel, eval_dtype)
            if art_model is None and engine is None:
                ctx.note(f"artifact not evaluated: {how}")
            else:
                evaluation.measure(EvalTarget(art_model, state.tokenizer, source, "artifact", dev,
                                              float_dtype=source.storage_dtype,
                                              info={**info, "artifact_path": str(state.out)},
                                              engine=engine, reference=reference), "artifact", which="artifact")
                del art_model
                evaluation.artifact = {"path": str(state.out), "opened": how}
                if engine is not None:
                    ctx.note(f"artifact checked: {how}")
                if engine is not None and (tok := evaluation.check_tokenizer(engine, state.tokenizer)):
                    evaluation.artifact["tokenizer"] = tok
                for line in evaluation.check_artifact(engine):
                    ctx.note(f"MISMATCH between the artifact and the in-memory model: {line}; "
                             "the export lost something")
        evaluation.measure_original(reference)
    except KeyboardInterrupt:
        if state.out is None:
            raise
        raise EvaluationInterrupted(
            f"interrupted during evaluation; the artifact {state.out} is complete and usable (only this report "
            f"is missing): evaluate it with qf eval {state.out}") from None
    finally:
        reference.release()
        if engine is not None:
            engine.close()
    warning = default_text_warning(list(evaluation.evaluators.values()), source)
    if warning:
        ctx.note(warning)
    state.metrics = evaluation.metrics
    state.manifest["evaluation"] = evaluation.to_json(dev, reference)
    _planner_measured(state)
    state.manifest["notes"] = list(ctx.notes)
    if state.out is not None:
        write_json_atomic(state.out / "quantfoundry.json", state.manifest)


def _planner_measured(state: RunState) -> None:
    """Beside a planner's predicted KL, the KL the run's ``kl`` evaluator measured (on its text)."""
    plan = state.plan
    if plan is None or plan.planner is None or "kl" not in state.metrics:
        return
    kl = state.metrics["kl"].get("kl_mean", {})
    measured = {col: kl[col] for col in ("quantized", "artifact") if isinstance(kl.get(col), (int, float))}
    if measured:
        plan.planner["measured_kl_mean"] = measured
        if "planner" in state.manifest:
            state.manifest["planner"] = dict(plan.planner)


def _stored_float_dtypes(source: ModelSource, plan: QuantPlan, exporter: Exporter) -> dict[str, torch.dtype]:
    """Parameter name → dtype, for the float tensors the artifact stores in another dtype than
    the checkpoint (e.g. GGUF's F32 norms)."""
    quantized = {f"{n}.weight" for n in plan.quantized()}
    out = {}
    for name, (dtype, _shape) in source.tensor_info.items():
        if dtype.is_floating_point and name not in quantized:
            stored = exporter.stored_float_dtype(name, dtype)
            if stored != dtype:
                out[name] = stored
    return out


def _float_params_to(model: torch.nn.Module | None, dtype: torch.dtype) -> None:
    """Cast float parameters to ``dtype`` (not QuantLinear codes or grid parameters, which stay
    as stored; their float biases are parameters and follow)."""
    if model is None:
        return
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
