"""Calibrator: a source of calibration token sequences.

A calibrator returns a :class:`CalibrationSet`: ``n`` token sequences, either windows of one
length (packed text) or samples of their own lengths (one conversation per sequence). Samples
of different lengths are never padded: the block pass runs them in batches of equal length
(:meth:`CalibrationSet.batches`), so no pad token and no attention mask enter the statistics
the quantizers collect.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .component import Component


@dataclass
class CalibrationSet:
    """Token sequences for calibration, and where they came from (for the manifest).

    :param input_ids: ``[n_samples, seq_len]`` token ids; with ``lengths``, sample ``i`` is
        ``input_ids[i, :lengths[i]]`` and the rest of its row is padding that is never used.
    :param source: a human description (file path, dataset name).
    :param sha256: hash of the source data (the text, the rendered samples), so a manifest
        pins what was used; :attr:`ids_sha256` pins the token ids themselves.
    :param lengths: ``[n_samples]`` int64, each sample's token count; ``None``: every sample
        is ``seq_len`` long.
    :param info: facts for the manifest and ``qf calib`` (``warnings`` are shown in the run's
        notes, not stored).
    """

    input_ids: torch.Tensor
    source: str
    sha256: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    lengths: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.input_ids.shape[0] == 0:
            raise ValueError(f"calibration input_ids must be [n_samples, seq_len], got {tuple(self.input_ids.shape)}")
        if self.lengths is not None:
            self.lengths = self.lengths.to(torch.int64).cpu()
            if self.lengths.shape != (self.input_ids.shape[0],):
                raise ValueError("calibration lengths must hold one length per sample")
            if int(self.lengths.min()) < 1 or int(self.lengths.max()) > self.input_ids.shape[1]:
                raise ValueError("calibration lengths must be between 1 and the row length")
            if bool((self.lengths == self.input_ids.shape[1]).all()):
                self.lengths = None

    @classmethod
    def from_sequences(cls, sequences: Sequence[torch.Tensor], source: str, sha256: str = "",
                       info: dict[str, Any] | None = None, pad_id: int = 0) -> CalibrationSet:
        """A set from 1-D token sequences of any lengths (kept in this order)."""
        if not sequences:
            raise ValueError("a calibration set needs at least one sequence")
        lengths = torch.tensor([int(s.numel()) for s in sequences], dtype=torch.int64)
        ids = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.int64)
        for i, s in enumerate(sequences):
            ids[i, : s.numel()] = s.reshape(-1).to(torch.int64)
        return cls(ids, source, sha256, dict(info or {}), lengths)

    @property
    def n_samples(self) -> int:
        return int(self.input_ids.shape[0])

    def sample_lengths(self) -> torch.Tensor:
        """``[n_samples]`` token count of every sample."""
        if self.lengths is None:
            return torch.full((self.n_samples,), self.input_ids.shape[1], dtype=torch.int64)
        return self.lengths

    @property
    def n_tokens(self) -> int:
        return int(self.sample_lengths().sum())

    @property
    def uniform(self) -> bool:
        """True when every sample has the full row length (windows)."""
        return self.lengths is None

    def samples(self) -> list[torch.Tensor]:
        """Every sample's token ids, 1-D, in order."""
        return [self.input_ids[i, :n] for i, n in enumerate(self.sample_lengths().tolist())]

    def batches(self, batch_size: int) -> list[torch.Tensor]:
        """``[b, length]`` batches of at most ``batch_size`` samples of one length each: windows
        in order; samples of different lengths grouped by length (longest first), in their
        order within a length."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.lengths is None:
            return list(self.input_ids.split(batch_size))
        out = []
        for n in sorted(set(self.lengths.tolist()), reverse=True):
            rows = torch.nonzero(self.lengths == n).flatten()
            out.extend(self.input_ids[rows[i: i + batch_size], :n] for i in range(0, rows.numel(), batch_size))
        return out

    @property
    def ids_sha256(self) -> str:
        """SHA-256 of the token ids: each sample's length (8 bytes) then its ids (int64)."""
        h = hashlib.sha256()
        for sample in self.samples():
            h.update(int(sample.numel()).to_bytes(8, "little"))
            h.update(sample.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        """Samples, tokens and length statistics (the manifest's and ``qf calib``'s figures)."""
        lengths = self.sample_lengths()
        return {"samples": self.n_samples, "tokens": self.n_tokens, "min_length": int(lengths.min()),
                "max_length": int(lengths.max()), "mean_length": round(float(lengths.double().mean()), 1),
                "ids_sha256": self.ids_sha256}


class Calibrator(Component, ABC):
    """Base class of every calibration source. :meth:`load` must be reproducible: the same
    options (seed included) and tokenizer give the same token ids."""

    @abstractmethod
    def load(self, tokenizer: Any) -> CalibrationSet:
        """Tokenize the source with the model's tokenizer and return the samples."""
