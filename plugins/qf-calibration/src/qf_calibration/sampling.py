"""From documents to calibration sequences: one document per sequence, or packed windows.

* **One document per sequence** (``packing=false``): every sequence is one document (one
  conversation) from its first token, cut at ``seq_len``. Attention never crosses a
  document boundary, as in production; documents of different lengths are not padded but run
  in batches of equal length (``CalibrationSet.batches``), so the statistics the quantizers
  collect (Hessians, activation means) hold real tokens only — short documents weigh less
  because they have fewer tokens.
* **Packed** (``packing=true``): the documents, in order, are joined into one token stream
  (an end-of-sequence token between them where the tokenizer has one and the document does
  not end with it) and cut into consecutive windows of ``seq_len``. Every window is full and
  batches are dense, but there is no per-document attention mask: a token attends to the end
  of the previous, unrelated document within its window, and documents are cut mid-way —
  activations a served model never sees at those positions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import quantfoundry as qf
import torch
from quantfoundry.errors import UsageError


@dataclass(frozen=True, kw_only=True)
class SamplingOptions(qf.Options):
    """How many sequences, how long, in which order, packed or not."""

    n_samples: int = field(default=128, metadata={"help": "calibration sequences"})
    seq_len: int = field(default=512, metadata={"help": "tokens per sequence at most (packed: exactly)"})
    seed: int = field(default=0, metadata={"help": "seed of the document order"})
    packing: bool = field(default=False, metadata={
        "help": "join documents into full windows (true) or one document per sequence (false)"})

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")


def assemble(documents: Iterable[tuple[str, list[int]]], options: SamplingOptions, *, source: str,
             eos_id: int | None, info: dict[str, Any] | None = None) -> qf.CalibrationSet:
    """Sequences from ``(text, token ids)`` documents taken in the given (already seeded) order
    until ``n_samples`` sequences are full; ``sha256`` hashes the texts used."""
    o = options
    sha = hashlib.sha256()
    sequences: list[torch.Tensor] = []
    used = truncated = 0
    buffer: list[int] = []
    for text, ids in documents:
        if not ids:
            continue
        used += 1
        sha.update(text.encode("utf-8"))
        sha.update(b"\0")
        if o.packing:
            buffer.extend(ids)
            if eos_id is not None and ids[-1] != eos_id:
                buffer.append(eos_id)
            while len(buffer) >= o.seq_len and len(sequences) < o.n_samples:
                sequences.append(torch.tensor(buffer[: o.seq_len], dtype=torch.int64))
                buffer = buffer[o.seq_len:]
        else:
            truncated += len(ids) > o.seq_len
            sequences.append(torch.tensor(ids[: o.seq_len], dtype=torch.int64))
        if len(sequences) >= o.n_samples:
            break
    warnings = []
    if not sequences and buffer:
        warnings.append(f"{source} has only {len(buffer)} tokens: one window of {len(buffer)} tokens, not "
                        f"{o.n_samples} x {o.seq_len}")
        sequences.append(torch.tensor(buffer, dtype=torch.int64))
    if not sequences:
        raise UsageError(f"{source} gave no tokens to calibrate on; check the data (and the column or options)")
    if len(sequences) < o.n_samples:
        warnings.append(f"{source} gave {len(sequences)} sequences, fewer than the {o.n_samples} asked "
                        f"({used} documents)")
    if truncated:
        warnings.append(f"{truncated} of {used} documents were longer than seq_len={o.seq_len} and cut")
    facts = {"n_samples": o.n_samples, "seq_len": o.seq_len, "seed": o.seed, "packing": o.packing,
             "documents": used, "warnings": warnings, **(info or {})}
    return qf.CalibrationSet.from_sequences(sequences, source, sha.hexdigest(), facts)


def seeded_order(n: int, seed: int) -> list[int]:
    """A permutation of ``range(n)`` from ``seed`` (the same on every machine)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
