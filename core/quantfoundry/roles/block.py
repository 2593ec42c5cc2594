"""The data a block-scope stage works on: one decoder block, its calibration inputs, and the
run's context (device, source model, notes, importance).

The pipeline hands a :class:`Block` to each stage of the recipe in turn (transforms, then the
rounding quantizer); :class:`BlockInputs` are the hidden states and layer keyword arguments it
is called with during calibration; :class:`QuantContext` is shared by every block of a run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .activation import ActQuant
from .format import Format

if TYPE_CHECKING:  # pragma: no cover
    from ..model.source import ModelSource
    from .architecture import Architecture


class Importance(dict[str, torch.Tensor]):
    """The importance vectors of :class:`QuantContext`: a dict that remembers whether a quantizer
    looked anything up (``[]``, ``get``, ``in``), so a run can say when ``--imatrix`` was
    collected for a quantizer that ignored it."""

    read = False

    def __getitem__(self, key: str) -> torch.Tensor:
        self.read = True
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.read = True
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self.read = True
        return super().__contains__(key)


@dataclass
class QuantContext:
    """What a quantizer may use besides the block: device, source model, notes for the summary."""

    device: torch.device
    source: ModelSource | None = None
    notes: list[str] = field(default_factory=list)
    #: per-linear importance (mean squared input activation per input channel, ``[in]`` float32,
    #: by full linear name, e.g. ``model.layers.0.mlp.up_proj``), when ``--imatrix`` collected it
    #: or the exporter brought one; empty otherwise. A run whose quantizer never reads it says so.
    importance: Importance = field(default_factory=lambda: Importance())
    #: whether the run shows progress bars (a long pass of the quantizer's own shows one with
    #: :class:`quantfoundry.toolkit.Progress` when this is set)
    progress: bool = False

    def note(self, message: str) -> None:
        """Record a line for the run summary and the manifest (never silently skip work)."""
        if message not in self.notes:
            self.notes.append(message)


@dataclass
class BlockInputs:
    """Calibration inputs of one decoder block: per batch, hidden states and layer kwargs."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]

    @property
    def n_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


@dataclass
class Block:
    """One decoder block: its module, its architecture map, its planned formats, its inputs.

    :param formats: block-relative linear name → format, for the linears to quantize.
    :param inputs: calibration inputs, or ``None`` when the run has no calibration.
    :param input_quant: block-relative linear name → how the engine will quantize its input
        (W8A8), for the linears that have an activation scheme (SmoothQuant balances for it).
    """

    index: int
    prefix: str
    module: nn.Module
    architecture: Architecture
    formats: dict[str, Format]
    inputs: BlockInputs | None = None
    #: the next block's inputs, when the rounding stage already ran this block with its final
    #: weights (every quantized linear computing with exactly its dequantized weight, as the
    #: block loop would run it); left ``None``, the loop runs the block itself
    outputs: list[torch.Tensor] | None = None
    input_quant: dict[str, ActQuant] = field(default_factory=dict)

    def linear(self, name: str) -> nn.Linear:
        mod = self.module.get_submodule(name)
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"{self.prefix}.{name} is a {type(mod).__name__}, not nn.Linear")
        return mod

    def full_name(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    @torch.no_grad()
    def run(self, on_batch: Callable[[int], None] | None = None) -> list[torch.Tensor]:
        """Run the block (with its current weights) on every calibration batch (calling
        ``on_batch(i)`` before batch ``i``)."""
        if self.inputs is None:
            raise RuntimeError("this run has no calibration inputs; set needs_calibration = True")
        outs = []
        for i, (hidden, kwargs) in enumerate(zip(self.inputs.hidden, self.inputs.kwargs, strict=True)):
            if on_batch is not None:
                on_batch(i)
            out = self.module(hidden, **kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
        return outs

    @contextmanager
    def capture_inputs(
        self, names: list[str], fn: Callable[[str, torch.Tensor], None]
    ) -> Iterator[None]:
        """Within the ``with``, call ``fn(name, input)`` whenever a named linear runs."""
        handles = []
        for name in names:
            def hook(_mod: nn.Module, args: tuple[Any, ...], _name: str = name) -> None:
                fn(_name, args[0].detach())
            handles.append(self.linear(name).register_forward_pre_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
