"""Quantizer and Transform: the stages of a recipe.

A **quantizer** chooses the values on a format's grid. It states how much of the model it needs
at once (:attr:`Quantizer.scope`):

* ``"tensor"`` — one weight at a time, no calibration (RTN, HQQ): implement
  :meth:`Quantizer.quantize_tensor`;
* ``"block"`` — one decoder block with its calibration inputs (GPTQ, AWQ, QuIP#): implement
  :meth:`Quantizer.quantize_block`; :class:`~quantfoundry.Block` runs the block, hooks its
  linears and lets the quantizer swap weights for true-sequential work;
* ``"model"`` — the whole model (QAT): implement :meth:`Quantizer.quantize_model`.

A **transform** changes the float weights of a block without rounding them (AWQ's and
SmoothQuant's per-channel scaling, QuIP#'s rotations): a recipe runs any number of transforms,
in order, before its one rounding quantizer — ``--quantizer smoothquant --quantizer gptq``. A
quantizer whose method starts with such a transform offers it through
:meth:`Quantizer.as_transform`, so ``--quantizer awq --quantizer gptq`` runs AWQ's scale search
and then GPTQ's rounding. Transforms are registered through ``qf_register_quantizers`` too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import nn

from .block import Block, QuantContext
from .component import Component
from .format import Format, QuantizedWeight

if TYPE_CHECKING:  # pragma: no cover
    from .plan import QuantPlan


class Transform(Component, ABC):
    """Base class of every stage that changes float weights without rounding them."""

    scope: ClassVar[Literal["block"]] = "block"
    needs_calibration: ClassVar[bool] = False
    #: its statistics come from the toolkit's collectors only (:func:`~quantfoundry.toolkit.collect_input_stats`,
    #: which reduce over the ranks of a multi-process run), so it may run with the calibration
    #: batches sharded across processes (``--devices``, ``torchrun``); a calibrating stage that
    #: leaves it False is refused there, before any work
    shards_calibration: ClassVar[bool] = False

    def check_format(self, fmt: Format) -> str | None:
        """``None`` if this transform works with ``fmt`` as the planned format, else why not
        (e.g. a per-channel scaling cannot serve a vector grid)."""
        return None

    @abstractmethod
    def transform_block(self, block: Block, ctx: QuantContext) -> None:
        """Change the float weights of ``block`` in place (``block.formats`` says what each
        linear will be rounded to). Whatever is changed is what the next stage sees and what
        the artifact stores for tensors kept in float."""


class Quantizer(Component, ABC):
    """Base class of every quantization algorithm (the one rounding stage of a recipe)."""

    scope: ClassVar[Literal["tensor", "block", "model"]] = "block"
    needs_calibration: ClassVar[bool] = False
    #: its statistics come from the toolkit's collectors only (:func:`~quantfoundry.toolkit.collect_input_stats`,
    #: which reduce over the ranks of a multi-process run), so it may run with the calibration
    #: batches sharded across processes (``--devices``, ``torchrun``); a calibrating stage that
    #: leaves it False is refused there, before any work
    shards_calibration: ClassVar[bool] = False

    def check_format(self, fmt: Format) -> str | None:
        """``None`` if this quantizer can round onto ``fmt``, else the reason it cannot."""
        return None

    def check_shape(self, shape: tuple[int, int]) -> str | None:
        """``None`` if this quantizer can work on a weight of ``shape`` (``[out, in]``), else the
        reason (QuIP#'s Hadamard transforms need widths it can factor); asked for every planned
        weight before any work. Default: any shape."""
        return None

    def permutes_columns(self) -> str | None:
        """``None`` if the weights it returns keep the input-column order, else how to avoid
        the permutation (an option to pass): exporters that cannot store one refuse the run
        before any work with that advice."""
        return None

    def makes_transforms(self) -> frozenset[str]:
        """The kinds of run-time weight transforms its weights carry (``QuantizedWeight.transforms``;
        QuIP#'s ``"rht"``): the exporter must store them (checked before any work). Default: none."""
        return frozenset()

    def refines_model(self) -> bool:
        """True if :meth:`refine_model` is to run once every block is rounded (end-to-end
        tuning of what is still continuous: QuIP#'s second fine-tuning pass). The run then keeps
        the quantized model in memory and loads the original beside it. Default: False."""
        return False

    def refine_model(self, model: nn.Module, reference: nn.Module, calibration: torch.Tensor,
                     ctx: QuantContext) -> dict[str, QuantizedWeight]:
        """Tune the whole quantized ``model`` (its blocks' linears are ``QuantLinear``s) against
        the float ``reference`` on the calibration token ids ``[samples, seq_len]``. Returns the
        weights it changed, by linear name (``model.layers.0.mlp.up_proj``); the blocks' other
        float parameters (norms) may be changed in place and are written as they are. Parameters
        outside the blocks (embeddings, head, final norm) must not change: the artifact takes
        them from the checkpoint."""
        raise NotImplementedError(f"quantizer {self.name!r} does not refine the whole model")

    def as_transform(self) -> Transform | None:
        """The transform this quantizer contributes when a recipe puts it before another
        quantizer (AWQ: its scale search and fold, without clipping or rounding), or ``None``
        when it has none — then it can only be a recipe's last stage."""
        return None

    def quantize_tensor(self, name: str, weight: torch.Tensor, fmt: Format, ctx: QuantContext) -> QuantizedWeight:
        raise NotImplementedError(f"quantizer {self.name!r} does not work tensor by tensor")

    def quantize_block(self, block: Block, ctx: QuantContext) -> dict[str, QuantizedWeight]:
        """Quantize one block; return its weights by block-relative name. The default calls
        :meth:`quantize_tensor` on each planned linear."""
        out = {}
        for name, fmt in block.formats.items():
            linear = block.linear(name)
            out[name] = self.quantize_tensor(block.full_name(name), linear.weight.data, fmt, ctx)
        return out

    def quantize_model(
        self, model: nn.Module, plan: QuantPlan, calibration: torch.Tensor | None, ctx: QuantContext
    ) -> dict[str, QuantizedWeight]:
        raise NotImplementedError(f"quantizer {self.name!r} does not work on the whole model")
