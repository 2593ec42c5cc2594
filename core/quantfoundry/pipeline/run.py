"""``quantfoundry.run`` and ``quantfoundry.load``: the Python API under ``qf run`` / ``qf load``."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from ..distributed import BACKEND_ENV, parse_devices, process_group
from ..errors import QFError, UsageError
from ..files import read_manifest
from ..memory import mmap_large_allocations
from ..phases import measuring, phase
from ..roles.exporter import Exporter
from .components import device_of, dtype_of, make
from .processes import Watchdog, join_group, launch
from .result import RunResult
from .stages import RunRequest, RunState, evaluate, load_and_plan, quantize_and_export, resolve


def run(model: str | Path | None = None, **options: Any) -> RunResult:
    """Quantize ``model`` (a folder or hub id; default: the embedded pycode-7m) and export it.

    Options (keywords; see :class:`~quantfoundry.pipeline.stages.RunRequest`): ``quantizer``
    (a name, or a list of ``(name, options)`` stages: transforms first, one rounding quantizer
    last), ``quantizer_options``, ``format`` / ``format_options``, ``exporter`` /
    ``exporter_options``, ``calibrator`` / ``calibrator_options``, ``evaluators`` (names or
    ``(name, options)``), ``kernel`` / ``kernel_options``, ``out``, ``device``, ``dtype``
    (of the block work), ``batch_size``, ``allow_pickle``, ``trust_remote_code``, ``revision``,
    ``overwrite``, ``keep_model``, ``artifact_eval``, ``cache``, ``imatrix``, ``progress``,
    ``resume``, ``report``; ``planner`` / ``planner_options`` with ``target_bpw`` or
    ``target_size`` (a mixed-precision plan for a budget); ``devices`` (``"cuda:0,cuda:1"``: one
    process per device, the calibration sharded, the artifact the one-device run writes);
    ``expert_routing`` / ``expert_min_tokens``
    (how calibration tokens reach a mixture of experts' experts; an expert seeing fewer is
    rounded to nearest).

    Every component and option is checked before the model is touched. Finished blocks go to
    a journal beside ``out``; the artifact is written from it into a temporary folder, verified,
    then renamed to ``out`` (an existing ``out`` is replaced only then, with ``overwrite``). A run
    killed or stopped (Ctrl-C, SIGTERM: at the next block boundary) continues with
    ``resume=True`` and writes the same artifact. ``metrics`` map ``evaluator → metric →
    {original, quantized, artifact}``: with evaluators and an ``out`` folder, the written artifact
    is opened again (``artifact_eval``) and every metric it does not reproduce within the
    evaluator's bound is a ``MISMATCH`` note. ``cache`` keeps the original model's results on
    disk (``$QF_CACHE_DIR``). ``imatrix`` collects an importance matrix (mean squared input
    activation per input channel of every planned linear) from the calibration text in the
    block pass and hands it to the quantizer (``QuantContext.importance``), as llama.cpp's.
    """
    known = {f.name for f in fields(RunRequest)} - {"model"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UsageError(f"run() got an unknown option {unknown[0]!r}; options: {', '.join(sorted(known))}")
    threads = options.get("threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise UsageError(f"threads must be a positive integer, got {threads!r}")
    with measuring() as clock, _cpu_threads(threads):
        state = resolve(RunRequest(model=model, **options))
        with processes(state, model, options):
            with phase("load"):
                load_and_plan(state)
            with phase("quantize"):  # less its nested phases: block loads, calibration forwards, encode, export
                quantize_and_export(state)
            with phase("evaluate"):
                evaluate(state)
    return RunResult(state.out, state.plan, state.metrics, state.notes, state.manifest,
                     time.perf_counter() - state.t_start, model=state.model if state.request.keep_model else None,
                     run_command=state.exporter.run_command(state.out) if state.out is not None else None,
                     timings=clock.seconds())


@contextmanager
def processes(state: RunState, model: Any, options: dict[str, Any]) -> Iterator[None]:
    """The run's processes: with ``devices``, one worker per device after the first (this
    process is rank 0), joined at the end; under ``torchrun``, the group its environment
    describes; else nothing."""
    if not state.request.devices:
        with process_group(state.device):
            yield
        return
    saved = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                            BACKEND_ENV)}
    workers = launch(parse_devices(state.request.devices), _rank_main, model,
                     {k: v for k, v in options.items() if k != "devices"})
    watch = Watchdog(workers)
    try:
        with process_group(state.device):
            yield
        watch.join()
    finally:
        watch.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _rank_main(rank: int, world: int, port: int, model: Any, options: dict[str, Any]) -> None:
    """A worker process of ``run(..., devices=...)``: the same run, as rank ``rank``."""
    mmap_large_allocations()
    join_group(rank, world, port)
    try:
        run(model, **options)
    except QFError as exc:
        print(f"qf (rank {rank}): {exc}", file=sys.stderr)
        sys.exit(1)


@contextmanager
def _cpu_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the run (plugins' pools, numba's, follow
    ``torch.get_num_threads()``), restored after it."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load(path: str | Path, *, device: str | torch.device = "cpu", kernel: str | None = None,
         dtype: str = "float32") -> torch.nn.Module:
    """Reload an artifact written by ``qf run`` (through the exporter its manifest names)."""
    folder = Path(path)
    manifest = read_manifest(folder)
    exp: Exporter = make("exporter", manifest["exporter"]["name"], {})
    torch_dtype = dtype_of(dtype)
    if not exp.can_load:
        raise UsageError(f"exporter {exp.name!r} cannot rebuild its artifacts as a torch model; evaluate it "
                         "with the engine that serves it (qf eval)")
    return exp.load(folder, device_of(device), kernel, torch_dtype)
