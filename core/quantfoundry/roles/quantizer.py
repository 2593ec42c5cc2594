"""Quantizer: *how* values on a format's grid are chosen.

A quantizer states how much of the model it needs at once (:attr:`Quantizer.scope`):

* ``"tensor"`` — one weight at a time, no calibration (RTN, HQQ): implement
  :meth:`quantize_tensor`;
* ``"block"`` — one decoder block with its calibration inputs (GPTQ, AWQ, SmoothQuant,
  QuIP#): implement :meth:`quantize_block`; :class:`Block` runs the block, hooks its linears
  and swaps weights so the quantizer can do true-sequential work;
* ``"model"`` — the whole model (QAT): implement :meth:`quantize_model`.

A quantizer whose :attr:`rounds` is ``False`` is a *transform stage* (AWQ/SmoothQuant scaling,
rotations): it changes the float weights of the block and returns nothing; a recipe chains
transform stages before one rounding stage.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from .component import Component
from .format import Format, QuantizedWeight

if TYPE_CHECKING:  # pragma: no cover
    from ..pipeline.source import ModelSource
    from .architecture import Architecture
    from .plan import QuantPlan


@dataclass
class QuantContext:
    """What a quantizer may use besides the block: device, source model, notes for the summary."""

    device: torch.device
    source: ModelSource | None = None
    notes: list[str] = field(default_factory=list)
    #: per-linear importance (mean squared input activation per input channel), when collected
    importance: dict[str, torch.Tensor] = field(default_factory=dict)

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


class Quantizer(Component, ABC):
    """Base class of every quantization algorithm."""

    scope: ClassVar[Literal["tensor", "block", "model"]] = "block"
    needs_calibration: ClassVar[bool] = False
    rounds: ClassVar[bool] = True

    def check_format(self, fmt: Format) -> str | None:
        """``None`` if this quantizer can round onto ``fmt``, else the reason it cannot."""
        return None

    def permutes_columns(self) -> str | None:
        """``None`` if the weights it returns keep the input-column order, else how to avoid
        the permutation (an option to pass): exporters that cannot store one refuse the run
        before any work with that advice."""
        return None

    def quantize_tensor(self, name: str, weight: torch.Tensor, fmt: Format, ctx: QuantContext) -> QuantizedWeight:
        raise NotImplementedError(f"quantizer {self.name!r} does not work tensor by tensor")

    def quantize_block(self, block: Block, ctx: QuantContext) -> dict[str, QuantizedWeight]:
        """Quantize (or, for transform stages, transform) one block; return its weights by
        block-relative name. The default calls :meth:`quantize_tensor` on each planned linear."""
        out = {}
        for name, fmt in block.formats.items():
            linear = block.linear(name)
            out[name] = self.quantize_tensor(block.full_name(name), linear.weight.data, fmt, ctx)
        return out

    def quantize_model(
        self, model: nn.Module, plan: QuantPlan, calibration: torch.Tensor | None, ctx: QuantContext
    ) -> dict[str, QuantizedWeight]:
        raise NotImplementedError(f"quantizer {self.name!r} does not work on the whole model")
