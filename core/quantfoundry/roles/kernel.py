"""Kernel: *how* a quantized linear runs, behind :class:`QuantLinear`.

A kernel says which formats and devices it serves (:meth:`Kernel.serves`) and a
:attr:`Kernel.priority`; the highest-priority kernel that serves a tensor is chosen unless
the user names one. ``torch-dequant`` (dequantize, then ``F.linear``) serves every format on
every device and is the reference all others are tested against.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from .component import Component
from .format import Format, QuantizedWeight


class Kernel(Component, ABC):
    """Base class of every executor of quantized linears."""

    priority: ClassVar[int] = 0
    #: True if :meth:`forward` quantizes the input itself as ``qw.input_quant`` says (a W8A8
    #: kernel); otherwise :class:`QuantLinear` fake-quantizes the input before calling it, so
    #: every kernel computes what the engine does
    quantizes_inputs: ClassVar[bool] = False

    def serves(self, fmt: Format, device: torch.device) -> str | None:
        """``None`` if this kernel runs ``fmt`` on ``device``, else the reason it does not."""
        return None

    def prepare(self, qw: QuantizedWeight) -> Any:
        """Build per-tensor state once (repacked codes, dequantized cache...)."""
        return None

    @abstractmethod
    def forward(self, x: torch.Tensor, qw: QuantizedWeight, state: Any, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T + bias`` for the quantized weight ``W``."""


class QuantLinear(nn.Module):
    """A linear layer whose weight is a :class:`QuantizedWeight`, run by a :class:`Kernel`.

    Codes, grid parameters and the permutation are buffers, so ``.to(device)`` moves them and
    ``state_dict()`` holds exactly the stored bytes.
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, kernel: Kernel):
        super().__init__()
        self.in_features = qw.shape[1]
        self.out_features = qw.shape[0]
        self.format = qw.format
        self.weight_dtype = qw.dtype
        self.kernel = kernel
        self.register_buffer("packed", qw.packed)
        self._param_names = tuple(qw.params)
        for key, value in qw.params.items():
            self.register_buffer(f"param_{key}", value)
        self._tensor_param_names = tuple(qw.tensor_params)
        for key, value in qw.tensor_params.items():
            self.register_buffer(f"tensor_{key}", value)
        self.register_buffer("perm", qw.perm)
        self.input_quant = qw.input_quant
        self.register_buffer("input_scale", qw.input_scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._meta = dict(qw.meta)
        self._state: Any = None
        self._state_key: tuple[Any, ...] | None = None

    @property
    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(
            self.format, (self.out_features, self.in_features), self.weight_dtype, self.packed,
            {k: getattr(self, f"param_{k}") for k in self._param_names}, self.perm, dict(self._meta),
            {k: getattr(self, f"tensor_{k}") for k in self._tensor_param_names}, self.input_quant,
            self.input_scale,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (self.packed.device, self.packed.data_ptr())
        if self._state_key != key:
            self._state = self.kernel.prepare(self.qweight)
            self._state_key = key
        if self.input_quant is not None and not self.kernel.quantizes_inputs:
            x = self.input_quant.fake_quant(x, self.input_scale)
        return self.kernel.forward(x, self.qweight, self._state, self.bias)

    def extra_repr(self) -> str:
        act = f", input={self.input_quant.spec}" if self.input_quant is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.format.spec}{act}, kernel={self.kernel.name}")
