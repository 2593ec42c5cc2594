"""Evaluator: named metrics on one model (the original or the quantized one)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from .component import Component

if TYPE_CHECKING:  # pragma: no cover
    from ..pipeline.source import ModelSource

Metric = float | int | str


@dataclass
class EvalTarget:
    """The model an evaluator measures.

    :param model: a causal LM in eval mode (``QuantLinear`` modules where quantized).
    :param tokenizer: its tokenizer.
    :param source: the source model (context length, stored dtype of float tensors).
    :param label: ``"original"`` or ``"quantized"``.
    :param float_dtype: the dtype float tensors are stored in (for size accounting).
    """

    model: nn.Module
    tokenizer: Any
    source: ModelSource
    label: Literal["original", "quantized"]
    device: torch.device
    float_dtype: torch.dtype = torch.bfloat16
    info: dict[str, Any] = field(default_factory=dict)


class Evaluator(Component, ABC):
    """Base class of every metric."""

    #: for each metric name: True if higher is better (the summary table marks regressions)
    higher_is_better: ClassVar[dict[str, bool]] = {}

    @abstractmethod
    def evaluate(self, target: EvalTarget) -> dict[str, Metric]:
        """Measure ``target`` and return ``{metric name: value}``."""
