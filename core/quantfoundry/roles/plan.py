"""QuantPlan: the format chosen for every tensor before any quantization."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .activation import ActQuant
from .format import Format


@dataclass
class TensorPlan:
    """The decision for one weight tensor.

    :param name: the weight's module name in the model (``model.layers.0.self_attn.q_proj``).
    :param shape: ``(out_features, in_features)``.
    :param format: the format it is quantized to, or ``None`` to keep it in float.
    :param reason: why it is kept in float, or why it got a fallback format.
    :param requested: the format that was asked for, when a fallback replaced it.
    :param input_quant: how the engine quantizes this linear's input (W8A8), or ``None``.
    """

    name: str
    shape: tuple[int, int]
    format: Format | None
    reason: str = ""
    requested: Format | None = None
    input_quant: ActQuant | None = None

    @property
    def is_fallback(self) -> bool:
        return self.format is not None and self.requested is not None and self.requested != self.format

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shape": list(self.shape), "format": self.format.spec if self.format else None}
        if self.reason:
            out["reason"] = self.reason
        if self.requested is not None:
            out["requested"] = self.requested.spec
        if self.input_quant is not None:
            out["input_quant"] = self.input_quant.spec
        return out


@dataclass
class QuantPlan:
    """Formats per tensor; made by the exporter (or a planner), checked against quantizer and
    exporter. ``kv_cache``: how the engine keeps the attention's keys and values (FP8), or
    ``None``. ``planner``: what a planner recorded of its choice (budget, predicted quality), for
    the manifest; ``None`` when the exporter's own plan is used."""

    entries: dict[str, TensorPlan] = field(default_factory=dict)
    kv_cache: ActQuant | None = None
    planner: dict[str, Any] | None = None

    def add(self, entry: TensorPlan) -> None:
        if entry.name in self.entries:
            raise ValueError(f"tensor {entry.name!r} planned twice")
        self.entries[entry.name] = entry

    def quantized(self) -> dict[str, TensorPlan]:
        return {k: v for k, v in self.entries.items() if v.format is not None}

    def kept_float(self) -> dict[str, TensorPlan]:
        return {k: v for k, v in self.entries.items() if v.format is None}

    def fallbacks(self) -> dict[str, TensorPlan]:
        return {k: v for k, v in self.entries.items() if v.is_fallback}

    def formats(self) -> list[Format]:
        seen: dict[str, Format] = {}
        for e in self.entries.values():
            if e.format is not None:
                seen.setdefault(e.format.spec, e.format)
        return list(seen.values())

    def format_of(self, name: str) -> Format | None:
        entry = self.entries.get(name)
        return entry.format if entry else None

    def activations(self) -> dict[str, ActQuant]:
        """Linear name → its input scheme, for the quantized linears that have one."""
        return {k: v.input_quant for k, v in self.entries.items() if v.format is not None and v.input_quant}

    def to_json(self) -> dict[str, Any]:
        return {k: v.to_json() for k, v in self.entries.items()}
