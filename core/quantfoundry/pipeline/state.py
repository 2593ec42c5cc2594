"""What one run is asked (:class:`RunRequest`, the arguments of :func:`quantfoundry.run`) and
what it knows (:class:`RunState`), filled stage by stage by :mod:`.stages`."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..model.source import ModelSource
from ..roles.activation import ActQuant
from ..roles.block import QuantContext
from ..roles.calibrator import CalibrationSet, Calibrator
from ..roles.evaluator import Evaluator
from ..roles.exporter import Exporter
from ..roles.format import Format
from ..roles.plan import QuantPlan
from ..roles.planner import Planner
from ..roles.quantizer import Quantizer, Transform

Spec = tuple[str, Mapping[str, Any]]


@dataclass
class RunRequest:
    """The arguments of :func:`quantfoundry.run`, as given (see its docstring)."""

    model: str | Path | None = None
    #: None: ``rtn``, or the ``target``'s quantizer
    quantizer: str | list[Spec] | None = None
    quantizer_options: Mapping[str, Any] | None = None
    format: str | None = None
    format_options: Mapping[str, Any] | None = None
    exporter: str | None = None  # None: qf, or the exporter whose preset ``format`` names
    exporter_options: Mapping[str, Any] | None = None
    calibrator: str | None = None
    calibrator_options: Mapping[str, Any] | None = None
    evaluators: list[Spec] | list[str] | None = None
    kernel: str | None = None
    kernel_options: Mapping[str, Any] | None = None
    out: str | Path | None = None
    device: str | torch.device = "cpu"
    dtype: str = "float32"
    #: the dtype evaluation runs in — the quantized and the original model alike: float32, or
    #: the deployment's bfloat16/float16 (so that speed and quality are those of what is served)
    eval_dtype: str = "float32"
    batch_size: int = 8
    #: CPU threads of the run (torch's, which plugins' own thread pools follow); None: torch's default
    threads: int | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    revision: str | None = None
    overwrite: bool = False
    keep_model: bool = False
    artifact_eval: bool = True
    cache: bool = True
    imatrix: bool = False
    #: the engine quantizes every quantized linear's input: int8 | int8-static | fp8 | fp8-static
    #: (None: the exporter's scheme, if it has one; else weight-only)
    activations: str | None = None
    #: how static activation scales are calibrated: absmax | percentile | mse
    act_observer: str = "absmax"
    #: the engine's KV cache: fp8 (keys and values, static per-tensor scales), or None
    kv_cache: str | None = None
    progress: bool = True
    resume: bool = False
    #: a mixed-precision planner (``kl``) choosing each tensor's format among the exporter's
    #: candidates for a budget: ``target_bpw`` (bits per weight of the whole model) or
    #: ``target_size`` (bytes of the artifact's tensors: ``3.9GB``, ``512MiB``, a plain number)
    #: quantize an already quantized input (GGUF file, quantized checkpoint, qf artifact) after
    #: dequantizing it (refused otherwise)
    force_requantize: bool = False
    #: the engine the artifact is for (``llama.cpp``, ``ollama``, ``vllm``, ``tgi``, ``transformers``,
    #: ``qlora``): the exporter, format and quantizer it reads best, where those are not given
    target: str | None = None
    planner: str | None = None
    planner_options: Mapping[str, Any] | None = None
    target_bpw: float | None = None
    target_size: str | int | None = None
    #: how calibration tokens reach a mixture of experts' experts: ``fill`` (the router's top-k;
    #: an expert sent fewer than ``expert_min_tokens`` also gets its most probable tokens, for
    #: statistics only), ``all`` (every token through every expert, for statistics only) or
    #: ``topk`` (the router's choice alone); an expert that still sees fewer than
    #: ``expert_min_tokens`` tokens is rounded to nearest, with a note
    #: two or more devices (``cuda:0,cuda:1``; ``cpu,cpu`` for gloo): one process per device,
    #: the calibration batches sharded over them, statistics reduced, the artifact written once
    #: (by this process); None: one device (``device``), or ``torchrun``'s processes
    devices: str | None = None
    expert_routing: str = "fill"
    expert_min_tokens: int = 32
    #: where lines the user must see before the work starts go (a resumable journal, leftovers
    #: of dead runs cleaned); default: standard error
    report: Callable[[str], None] | None = None


@dataclass
class RunState:
    """Everything one run knows, filled stage by stage."""

    request: RunRequest
    device: torch.device
    dtype: torch.dtype
    stage_specs: list[Spec]
    transforms: list[Transform]
    quantizer: Quantizer
    exporter: Exporter
    requested: Format | None
    calibrator: Calibrator | None
    evaluators: list[Evaluator]
    out: Path | None
    activations: ActQuant | None = None
    kv_cache: ActQuant | None = None
    planner: Planner | None = None
    #: processes of the run (``--devices`` or ``torchrun``) and this one's rank
    world: int = 1
    rank: int = 0
    notes: list[str] = field(default_factory=list)
    t_start: float = field(default_factory=time.perf_counter)
    # load_and_plan
    source: ModelSource | None = None
    plan: QuantPlan | None = None
    ctx: QuantContext | None = None
    tokenizer: Any = None
    calibration: CalibrationSet | None = None
    #: checkpoint tensors inside blocks that are no parameter of the model, by block: written as stored
    passthrough: dict[int, list[str]] = field(default_factory=dict)
    hashing: threading.Thread | None = None
    # quantize_and_export
    model: torch.nn.Module | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    resumed_from: int = 0
    # evaluate
    metrics: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    @property
    def needs_calibration(self) -> bool:
        return self.quantizer.needs_calibration or any(t.needs_calibration for t in self.transforms) or \
            self.request.imatrix or (self.activations is not None and not self.activations.dynamic) or \
            self.kv_cache is not None

    @property
    def keep(self) -> bool:
        """Keep the quantized blocks in memory (for in-memory evaluation, for a quantizer that
        refines the whole model, or when asked)."""
        return self.request.keep_model or bool(self.evaluators) or self.quantizer.refines_model()

    def kernel_options(self) -> dict[str, str]:
        return dict(self.request.kernel_options or {})

    def say(self, line: str) -> None:
        """A line the user sees now (and in the summary's notes)."""
        self.notes.append(line)
        if self.request.report is not None:
            self.request.report(line)
        else:
            print(f"qf: {line}", file=sys.stderr)


def loaded(state: RunState) -> tuple[ModelSource, QuantContext]:
    """The source and context of a state that went through ``load_and_plan``."""
    if state.source is None or state.ctx is None or state.plan is None:
        raise RuntimeError("load_and_plan(state) must run before this stage")
    return state.source, state.ctx
