"""The ``mix`` calibrator: a weighted mixture of other calibrators, each with its own options.

From a recipe::

    [calibrator]
    name = "mix"
    n_samples = 128
    seq_len = 512

    [[calibrator.parts]]
    name = "chat"
    weight = 0.7
    path = "traffic.jsonl"

    [[calibrator.parts]]
    name = "text"
    weight = 0.3
    path = "repo_code.txt"

(from the command line, parts without options: ``--calibrator-opt parts=text:0.5,chat:0.5``
is only useful for calibrators whose defaults suffice). The weights split ``n_samples``
between the parts (largest remainder; every part gets at least one sample); each part is made
with its own options, its ``n_samples`` set to its share and, unless it names them,
the mixture's ``seq_len`` and ``seed + index``. The samples of all parts are shuffled
together with ``seed``. Weights count samples, not tokens: a part of short conversations
gives fewer tokens than its weight — ``qf calib`` and the manifest show each part's token share.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any

import quantfoundry as qf
from quantfoundry.errors import UsageError
from quantfoundry.toolkit import make_component

from .sampling import seeded_order


@dataclass(frozen=True, kw_only=True)
class MixOptions(qf.Options):
    parts: tuple[Any, ...] = field(default=(), metadata={
        "help": "the calibrators mixed: [[calibrator.parts]] tables (name, weight, options) or NAME:WEIGHT,..."})
    n_samples: int = field(default=128, metadata={"help": "sequences in all, split by the weights"})
    seq_len: int = field(default=512, metadata={"help": "tokens per sequence, for parts that set none"})
    seed: int = field(default=0, metadata={"help": "seed of the parts (seed + index) and of the shuffle"})

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("parts is required: [[calibrator.parts]] tables in a recipe, each with a name "
                             "and a weight (or --calibrator-opt parts=NAME:WEIGHT,...)")
        if self.n_samples < len(self.parts):
            raise ValueError(f"n_samples={self.n_samples} is fewer than the {len(self.parts)} parts")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")


@dataclass(frozen=True)
class Part:
    name: str
    weight: float
    options: dict[str, Any]


def parse_part(item: Any, index: int) -> Part:
    """A part from a recipe table or a ``NAME:WEIGHT`` string."""
    if isinstance(item, str):
        name, _, weight = item.partition(":")
        table: dict[str, Any] = {"name": name.strip(), "weight": weight.strip() or "1"}
    elif isinstance(item, dict):
        table = dict(item)
    else:
        raise UsageError(f"calibrator 'mix' part {index}: expected a table or NAME:WEIGHT, got {item!r}")
    name = table.pop("name", None)
    if not isinstance(name, str) or not name:
        raise UsageError(f"calibrator 'mix' part {index} needs a name (a registered calibrator)")
    try:
        weight = float(table.pop("weight", 1.0))
    except (TypeError, ValueError):
        raise UsageError(f"calibrator 'mix' part {index} ({name}): weight must be a number") from None
    if not weight > 0:
        raise UsageError(f"calibrator 'mix' part {index} ({name}): weight must be > 0, got {weight}")
    return Part(name, weight, table)


def shares(weights: list[float], total: int) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainder), each share at least 1."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [max(1, int(e)) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    i = 0
    while sum(counts) < total:
        counts[order[i % len(order)]] += 1
        i += 1
    while sum(counts) > total:  # the minimum of 1 took samples from the others
        j = max(range(len(counts)), key=lambda k: counts[k] - exact[k])
        counts[j] -= 1
    return counts


class MixCalibrator(qf.Calibrator):
    name = "mix"
    description = "a weighted mixture of other calibrators, each with its own options (from a recipe)"
    Options = MixOptions

    options: MixOptions

    def __init__(self, options: MixOptions | None = None):
        super().__init__(options)
        o = self.options
        parts = [parse_part(item, i) for i, item in enumerate(o.parts)]
        counts = shares([p.weight for p in parts], o.n_samples)
        self.parts: list[tuple[Part, qf.Calibrator]] = []
        for i, (part, count) in enumerate(zip(parts, counts, strict=True)):
            cls = qf.get_component("calibrator", part.name)
            names = {f.name for f in dataclasses.fields(cls.Options)}
            if "n_samples" not in names:
                raise UsageError(f"calibrator 'mix' part {i} ({part.name}) has no n_samples option, so its share "
                                 "cannot be set; mix calibrators that take n_samples")
            if "n_samples" in part.options:
                raise UsageError(f"calibrator 'mix' part {i} ({part.name}): drop n_samples, the weights set it")
            values = {**({"seq_len": o.seq_len} if "seq_len" in names else {}),
                      **({"seed": o.seed + i} if "seed" in names else {}), **part.options, "n_samples": count}
            self.parts.append((part, make_component("calibrator", part.name, values,
                                                    owner=f"calibrator 'mix' part {i} ({part.name})")))

    def load(self, tokenizer: Any) -> qf.CalibrationSet:
        o = self.options
        sets = [(part, calibrator.load(tokenizer)) for part, calibrator in self.parts]
        samples = [s for _, cal in sets for s in cal.samples()]
        order = seeded_order(len(samples), o.seed)
        total = sum(cal.n_tokens for _, cal in sets)
        sha = hashlib.sha256()
        described, warnings = [], []
        for part, cal in sets:
            sha.update(f"{part.name}:{part.weight}:{cal.sha256}\0".encode())
            described.append({"name": part.name, "weight": part.weight, "source": cal.source, "sha256": cal.sha256,
                              "samples": cal.n_samples, "tokens": cal.n_tokens,
                              "token_share": round(cal.n_tokens / max(total, 1), 4)})
            warnings.extend(f"mix part {part.name}: {w}" for w in cal.info.get("warnings", []))
        source = "mix of " + ", ".join(f"{p.name} {p.weight:g}" for p, _ in sets)
        return qf.CalibrationSet.from_sequences([samples[i] for i in order], source, sha.hexdigest(), {
            "n_samples": o.n_samples, "seq_len": o.seq_len, "seed": o.seed, "parts": described,
            "warnings": warnings})
