"""Calibrator: a source of calibration token batches."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from .component import Component


@dataclass
class CalibrationSet:
    """Token windows for calibration, and where they came from (for the manifest).

    :param input_ids: ``[n_samples, seq_len]`` token ids.
    :param source: a human description (file path, dataset name).
    :param sha256: hash of the source text, so a manifest pins what was used.
    """

    input_ids: torch.Tensor
    source: str
    sha256: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.numel())


class Calibrator(Component, ABC):
    """Base class of every calibration source."""


    @abstractmethod
    def load(self, tokenizer: Any) -> CalibrationSet:
        """Tokenize the source with the model's tokenizer and return the windows."""
