"""Exporter: *where* quantized weights go — a deployment artifact.

An exporter declares which formats it stores losslessly (:meth:`Exporter.check_format`) and
chooses the format of every tensor before any quantization (:meth:`Exporter.plan`), so the
quantizer rounds onto exactly the grid that is written and nothing is rounded twice.

Writing is streamed, block by block: :meth:`begin` once, :meth:`write` for every tensor (a
float ``torch.Tensor`` or a :class:`QuantizedWeight`), :meth:`finish` once. The pipeline hands
the exporter a temporary folder and renames it into place only after :meth:`verify` passed,
so an interrupted run never leaves a half-written artifact.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import IncompatiblePlanError, UsageError
from .activation import ActQuant
from .component import Component
from .format import Format, QuantizedWeight
from .plan import QuantPlan, TensorPlan

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from ..model.source import ModelSource
    from .evaluator import Engine


class Exporter(Component, ABC):
    """Base class of every artifact writer."""

    #: the format used when the user asks for none (a spec, e.g. ``int4-g128``)
    default_format: ClassVar[str | None] = None
    #: True if it stores a weight's input-column permutation (``QuantizedWeight.perm``, GPTQ's
    #: act-order ``g_idx``); a quantizer that permutes columns is refused before any work otherwise
    stores_permutation: ClassVar[bool] = False
    #: the kinds of run-time weight transforms it stores (``QuantizedWeight.transforms``, e.g.
    #: ``"rht"``); a quantizer that makes others is refused before any work
    stores_transforms: ClassVar[frozenset[str]] = frozenset()
    #: True if :meth:`load` rebuilds its artifacts as a torch model (``qf load``, and the run's
    #: artifact check through quantfoundry kernels); otherwise :meth:`engine` serves them, if any
    can_load: ClassVar[bool] = False

    # -- planning ------------------------------------------------------------------------
    def check_format(self, fmt: Format) -> str | None:
        """``None`` if this exporter can store ``fmt`` losslessly, else the reason."""
        return None

    def storable(self) -> str:
        """Human description of what it stores (for error messages)."""
        return "any registered format"

    def activations(self) -> ActQuant | None:
        """The activation scheme this exporter's own options choose (a W8A8 scheme), used when
        the run names none (``--activations``); ``None``: weight-only unless asked."""
        return None

    def check_activations(self, act: ActQuant, fmt: Format | None) -> str | None:
        """``None`` if the artifact can tell its engine to quantize the inputs of linears stored
        as ``fmt`` the way ``act`` says (and store their static scales), else the reason.
        Default: weight-only artifacts."""
        return "it writes weight-only models (the engines it targets run every input in float)"

    def check_kv_cache(self, act: ActQuant) -> str | None:
        """``None`` if the artifact can tell its engine to keep the KV cache as ``act`` says (and
        store ``k_scale``/``v_scale``), else the reason. Default: it cannot."""
        return "it has no place for KV-cache scales"

    def plan(self, source: ModelSource, requested: Format | None, *, collects_importance: bool = False) -> QuantPlan:
        """Choose a format per tensor. Default: every decoder-block linear gets ``requested``
        (or its documented fallback when the shape does not fit); embeddings, the output head
        and everything else stay in float, each with its reason.

        :param collects_importance: the run collects an importance matrix from calibration
            (``--imatrix``), for exporters whose plan depends on it (llama.cpp's mixes)."""
        if requested is None:
            raise UsageError(f"exporter {self.name!r} has no default format; choose one with --format")
        return default_plan(source, requested)

    def mix_candidates(self, source: ModelSource, plan: QuantPlan) -> dict[str, tuple[Format | None, ...]]:
        """The formats each tensor of ``plan`` (this exporter's own plan) may take in a mixed
        plan, cheapest first, for a planner (``--planner``); ``None`` among them: the tensor may be
        kept in float. Tensors left out keep their planned format. Raise
        :class:`~quantfoundry.errors.IncompatiblePlanError` with the reason when the artifact
        stores no mix (the default): the run stops before any work."""
        raise IncompatiblePlanError(f"exporter {self.name!r} stores one format for every tensor, so it cannot "
                                    "write a planner's mix; drop --planner, or use an exporter that stores a "
                                    "format per tensor (gguf, compressed-tensors)")

    def mix_ties(self, source: ModelSource, plan: QuantPlan) -> list[tuple[str, ...]]:
        """Groups of candidate tensors that must share one format (the engine fuses them: vLLM's
        ``qkv_proj`` and ``gate_up_proj``). Default: none, every tensor chooses alone."""
        return []

    def adopt_plan(self, source: ModelSource, plan: QuantPlan) -> None:
        """Take a planner's plan (formats drawn from :meth:`mix_candidates`) as the one to write.
        Called once, after :meth:`plan` and before the plan check. Default: nothing to update."""

    # -- writing -------------------------------------------------------------------------
    @abstractmethod
    def begin(self, folder: Path, source: ModelSource, plan: QuantPlan) -> None:
        """Start writing into ``folder`` (a temporary folder, empty)."""

    @abstractmethod
    def write(self, name: str, tensor: torch.Tensor | QuantizedWeight) -> None:
        """Write one tensor by its full parameter name (``...q_proj.weight``)."""

    @abstractmethod
    def finish(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        """Flush everything. ``manifest`` is what ``quantfoundry.json`` will hold; the entries of
        the returned dict are added to it (files written, tensor tables), ``None`` adds nothing."""

    def verify(self, folder: Path) -> None:
        """Check the written files (reopen, count tensors); raise ArtifactError if wrong."""

    # -- reading back ----------------------------------------------------------------------
    def load(self, folder: Path, device: torch.device, kernel: str | None = None,
             dtype: torch.dtype = torch.float32) -> nn.Module:
        """Rebuild the quantized model from an artifact this exporter wrote (optional: set
        :attr:`can_load` when implemented)."""
        raise NotImplementedError(f"exporter {self.name!r} cannot reload its artifacts in Python (can_load is False)")

    @classmethod
    def claims(cls, path: Path) -> bool:
        """True if ``path`` is an artifact of this exporter's kind (``qf inspect`` dispatch)."""
        return False

    @classmethod
    def inspect(cls, path: Path) -> dict[str, Any]:
        """Describe an artifact for ``qf inspect``: ``{"summary": {...}, "metadata": {...},
        "kinds": {kind: {"tensors", "weights", "bytes", "bpw", "types"}}, "tensors": [rows]}``;
        a damaged file raises :class:`~quantfoundry.errors.ArtifactError` with one line."""
        raise NotImplementedError(f"exporter {cls.name!r} cannot inspect artifacts")

    @classmethod
    def presets(cls) -> list[tuple[str, str]]:
        """Named choices the exporter offers besides formats (e.g. llama.cpp file types), as
        ``(name, description)``; ``qf formats`` lists them, and ``--format NAME`` selects one
        (through :meth:`preset_options`)."""
        return []

    @classmethod
    def preset_formats(cls, shape: Any, preset: str) -> dict[str, Format | None] | None:
        """The format each tensor of a model gets under preset ``preset`` (``None``: stored in
        16-bit float), for memory planning from a config alone (``qf plan``); ``shape`` lists the
        model's tensors (``shape.tensors``: ``name``, ``shape``, ``kind``) and config. ``None``
        (default): the exporter offers no preset by that name."""
        return None

    @classmethod
    def preset_options(cls, name: str) -> dict[str, Any] | None:
        """The exporter options that select preset ``name`` (any case), or None if it offers no
        such preset. By default a preset is a value of the exporter's ``type`` option."""
        for preset, _text in cls.presets():
            if preset.lower() == name.lower():
                return {"type": preset}
        return None

    def stored_float_dtype(self, name: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype the artifact stores float tensor ``name`` (stored as ``dtype`` in the
        checkpoint) in, for size accounting; called after :meth:`plan`. Default: unchanged."""
        return dtype

    def dequantized_dtype(self, name: str) -> torch.dtype | None:
        """The float dtype the artifact stores quantized weight ``name`` (``...q_proj.weight``)
        in when it stores it dequantized (a "fake-quant" checkpoint), for size accounting;
        None (default): it stores the weight in its format (codes and grid parameters)."""
        return None

    def run_command(self, folder: Path) -> str | None:
        """One shell command that runs the artifact at ``folder`` in the engine it is made for
        (``qf run`` prints it last; ``docs/deploy.md`` lists every engine). None: there is none."""
        return None

    def artifact_label(self) -> str | None:
        """What the artifact holds when no format was asked for (e.g. ``Q4_K_M``), to name the
        default output folder; None: the format's spec names it."""
        return None

    def importance(self, source: ModelSource) -> dict[str, torch.Tensor] | None:
        """Importance vectors (mean squared input per channel) by linear module name, when the
        exporter brings them (e.g. a llama.cpp imatrix file); the quantizer gets them through
        ``QuantContext.importance``."""
        return None

    def collected_importance(self, importance: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        """Called before :meth:`finish` when the run collected an importance matrix (``--imatrix``):
        means by linear module name and the calibration facts (``source``, ``tokens``,
        ``samples``, ``seq_len``), for exporters that record or ship it."""

    def engine(self, folder: Path, device: torch.device) -> Engine | None:
        """Open the artifact in the engine that serves it (llama.cpp for GGUF, ...), if a plugin
        provides one; ``qf eval`` and the run's artifact check use it when :meth:`load` cannot.
        Raise :class:`~quantfoundry.errors.EngineUnavailable` (saying how to install it) when the
        engine is known but missing: the run notes it instead of checking the artifact."""
        return None


def default_plan(source: ModelSource, requested: Format) -> QuantPlan:
    """The core's plan rule: quantize decoder-block linears, keep the rest in float."""
    plan = QuantPlan()
    for name, shape in source.linear_shapes().items():
        if not source.is_block_linear(name):
            plan.add(TensorPlan(name, shape, None, reason=source.float_reason(name)))
            continue
        reason = requested.check_shape(shape)
        if reason is None:
            plan.add(TensorPlan(name, shape, requested))
            continue
        fallback = requested.fallback(shape)
        if fallback is not None and fallback.check_shape(shape) is None:
            plan.add(TensorPlan(name, shape, fallback, reason=f"{reason}: fallback {fallback.spec}",
                                requested=requested))
        else:
            plan.add(TensorPlan(name, shape, None, reason=f"{reason}; no fallback format: kept in float"))
    return plan
