"""Evaluator: named metrics on one model, or on the quantized model against the original.

Two kinds of evaluators:

* **per-model** (``compares = False``): measured on the quantized model and, beside it, on the
  original (perplexity, size, speed). Results on the original are cached on disk when
  ``cache_original`` is true, so ten variants of one model evaluate the original once.
* **comparing** (``compares = True``): measured once, on the quantized model, against the
  original through ``target.reference`` (KL-divergence, top-1 flips). The reference loads
  the original lazily and caches what the evaluator asks it to keep.

A target is either an ``nn.Module`` (the in-memory model, or an artifact reloaded through
our kernels) or an :class:`Engine` (an artifact served by the engine that ships it, e.g.
llama.cpp for a GGUF file). Evaluators that only need logits call :meth:`EvalTarget.logits`
and work on both.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import torch
from torch import nn

from .component import Component

if TYPE_CHECKING:  # pragma: no cover
    from ..model.source import ModelSource

Metric = float | int | str


class Engine(ABC):
    """An artifact loaded by the engine that serves it (llama.cpp, vLLM, ...).

    Exporters return one from :meth:`Exporter.engine`; evaluators reach it through
    :meth:`EvalTarget.logits`.
    """

    #: the engine's name and version, recorded in the manifest beside its results
    name: str = "engine"
    version: str | None = None
    #: ``(rtol, atol)`` by metric name (``kl_mean``, ``perplexity``, ...) where the engine's own
    #: arithmetic moves the artifact's figures away from the in-memory model's (llama.cpp
    #: quantizes activations to 8 bits): the artifact check uses the wider of this and the
    #: evaluator's :attr:`Evaluator.agreement`
    agreement: ClassVar[dict[str, tuple[float, float]]] = {}

    @abstractmethod
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[batch, tokens, vocab]`` for ``input_ids`` ``[batch, tokens]``."""

    def artifact_bytes(self) -> int | None:
        """Bytes of the artifact on disk, if the engine knows them."""
        return None

    def tokenize(self, text: str) -> list[int] | None:
        """The ids the engine's own tokenizer gives ``text`` (special tokens parsed, BOS added as
        the artifact says), or ``None`` when the engine takes ids only. The run's artifact check
        compares them with the source tokenizer's: evaluators feed the engine the source
        tokenizer's ids, so a tokenizer lost in the export would go unseen otherwise."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to free by default
        """Free the engine's memory."""


class ReferenceModel(Protocol):
    """The original model behind a comparison, as comparing evaluators see it
    (``target.reference``; the pipeline's is :class:`quantfoundry.evaluation.reference.Reference`):
    loaded at most once, with a disk cache of what was computed on it."""

    device: torch.device

    def target(self) -> EvalTarget:
        """The original model in float32 (loaded on first use)."""
        ...

    def tensors(self, kind: str, key: dict[str, Any],
                compute: Callable[[EvalTarget], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``compute(original)``'s tensors, from the cache when ``key`` was computed before."""
        ...

    def metrics(self, kind: str, key: dict[str, Any],
                compute: Callable[[EvalTarget], dict[str, Metric]]) -> dict[str, Metric]:
        """``compute(original)``'s metrics, from the cache when ``key`` was computed before."""
        ...


@dataclass
class EvalTarget:
    """The model an evaluator measures.

    :param model: a causal LM in eval mode (``QuantLinear`` modules where quantized), or
        ``None`` when ``engine`` serves the artifact.
    :param tokenizer: its tokenizer.
    :param source: the source model (context length, stored dtype of float tensors).
    :param label: ``"original"``, ``"quantized"`` (in memory) or ``"artifact"`` (reloaded).
    :param float_dtype: the dtype float tensors are stored in (for size accounting).
    :param engine: the engine serving the artifact, when it is not a torch module.
    :param reference: the original model and its cache, for comparing evaluators.
    :param info: extra facts (``quantized_linears``, ``calibration``).
    """

    model: nn.Module | None
    tokenizer: Any
    source: ModelSource
    label: Literal["original", "quantized", "artifact"]
    device: torch.device
    float_dtype: torch.dtype = torch.bfloat16
    info: dict[str, Any] = field(default_factory=dict)
    engine: Engine | None = None
    reference: ReferenceModel | None = None

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Float32 next-token logits ``[batch, tokens, vocab]`` on ``self.device``."""
        if self.engine is not None:
            return self.engine.logits(input_ids.cpu()).to(self.device, torch.float32)
        if self.model is None:
            raise RuntimeError("EvalTarget has neither a model nor an engine")
        return self.model(input_ids=input_ids.to(self.device), use_cache=False).logits.float()


class Evaluator(Component, ABC):
    """Base class of every metric."""

    #: for each metric name: True if higher is better (the summary table marks regressions)
    higher_is_better: ClassVar[dict[str, bool]] = {}
    #: True: measured on the quantized model against ``target.reference`` (not on the original)
    compares: ClassVar[bool] = False
    #: True: the result on the original model depends only on the model, the options and the
    #: device type, so it may be cached on disk (False for timings)
    cache_original: ClassVar[bool] = True
    #: metric → (rtol, atol): how closely the artifact must reproduce the in-memory model;
    #: a larger gap is reported as a mismatch ("the export lost something")
    agreement: ClassVar[dict[str, tuple[float, float]]] = {}

    #: False: not measured again on the written artifact (e.g. timings of the same kernel)
    on_artifact: ClassVar[bool] = True

    def check_device(self, device: torch.device) -> str | None:
        """Why this evaluator cannot run on ``device`` as configured (checked before any work), or None."""
        return None

    @abstractmethod
    def evaluate(self, target: EvalTarget) -> dict[str, Metric]:
        """Measure ``target`` and return ``{metric name: value}``."""

    def cache_key(self) -> dict[str, Any]:
        """What a result on the original depends on besides the model and the device: the
        evaluator, its options, and the content of every file they name (the evaluation
        text, also when it is the embedded default)."""
        from ..files import sha256_file
        from ..options import options_to_dict

        files: dict[str, str] = {}
        for f in dataclasses.fields(self.options):
            value = getattr(self.options, f.name)
            if isinstance(value, Path) and value.is_file():
                files[f.name] = sha256_file(value)
        text_path = getattr(self.options, "text_path", None)
        if callable(text_path):  # the embedded default text depends on the model, which the key holds
            files["text"] = sha256_file(Path(text_path()))
            if getattr(self.options, "path", None) is None:
                from ..data import english_eval_text

                files["english_text"] = sha256_file(english_eval_text())
        return {"evaluator": self.name, "options": options_to_dict(self.options), "files": files}
