"""Kernel: *how* a quantized linear runs, behind :class:`QuantLinear`.

A kernel says which formats and devices it serves (:meth:`Kernel.serves`) and a
:attr:`Kernel.priority`. A :class:`QuantLinear` holds the kernels that serve its weight, best
first, and on each call runs the first whose ``serves(fmt, device, tokens)`` accepts the
call's token count (a GEMV kernel that wins at batch 1–16 and gives way to a GEMM above);
``--kernel NAME`` forces one for every call. ``torch-dequant`` (dequantize, then ``F.linear``)
serves every format on every device at every batch and is the reference all others are
tested against.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from .component import Component
from .format import Format, QuantizedWeight
from .weight_transform import transform_from_stored


class Kernel(Component, ABC):
    """Base class of every executor of quantized linears."""

    priority: ClassVar[int] = 0
    #: format specs this kernel is made for (``qf kernels`` asks it about these too)
    examples: ClassVar[tuple[str, ...]] = ()
    #: True if :meth:`forward` quantizes the input itself as ``qw.input_quant`` says (a W8A8
    #: kernel); otherwise :class:`QuantLinear` fake-quantizes the input before calling it, so
    #: every kernel computes what the engine does
    quantizes_inputs: ClassVar[bool] = False
    #: how it runs a weight with run-time transforms (``QuantizedWeight.transforms``): ``"dense"``
    #: — it multiplies by :meth:`QuantizedWeight.dequantize` (transforms undone); ``"stored"`` — by
    #: the stored weight, :class:`QuantLinear` applying the transforms to its input and output;
    #: ``"fused"`` — :meth:`forward` takes the original input and gives the original output,
    #: running the transforms itself (its own faster code for them); ``"none"`` — it does not run
    #: such weights (they go to the next kernel)
    weight_transforms: ClassVar[str] = "none"

    def serves(self, fmt: Format, device: torch.device, tokens: int | None = None) -> str | None:
        """``None`` if this kernel runs ``fmt`` on ``device``, else the reason it does not.

        With ``tokens`` (the rows of one call's input: batch × sequence), ``None`` also says
        this kernel is the one to use for a call of that many — a kernel that is slower than
        the next one at some token counts gives a reason there (``"slower than a dense GEMM
        above 64 tokens"``), and :class:`QuantLinear` passes the call on. A kernel forced
        with ``--kernel`` runs every call, whatever it says for ``tokens``.
        """
        return None

    def prepare(self, qw: QuantizedWeight) -> Any:
        """Build per-tensor state once (repacked codes, dequantized cache...)."""
        return None

    @abstractmethod
    def forward(self, x: torch.Tensor, qw: QuantizedWeight, state: Any, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T + bias`` for the quantized weight ``W``."""


_UNSET = object()


class QuantLinear(nn.Module):
    """A linear layer whose weight is a :class:`QuantizedWeight`, run by a :class:`Kernel`.

    Codes, grid parameters and the permutation are buffers, so ``.to(device)`` moves them and
    ``state_dict()`` holds exactly the stored bytes.
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, kernel: Kernel | Sequence[Kernel]):
        super().__init__()
        self.in_features = qw.shape[1]
        self.out_features = qw.shape[0]
        self.format = qw.format
        self.weight_dtype = qw.dtype
        #: the kernels that serve this weight, best first; a call runs the first that accepts
        #: its token count (the last one takes any call)
        self.kernels: tuple[Kernel, ...] = (kernel,) if isinstance(kernel, Kernel) else tuple(kernel)
        if not self.kernels:
            raise ValueError("QuantLinear needs at least one kernel")
        if qw.transforms:
            kinds = ", ".join(t.kind for t in qw.transforms)
            self.kernels = tuple(k for k in self.kernels if k.weight_transforms in ("dense", "stored", "fused"))
            if not self.kernels:
                raise ValueError(f"no kernel given runs a weight with run-time transforms ({kinds}); "
                                 "torch-dequant does (--kernel torch-dequant)")
        #: the kernel of the last call (before any call: the first), and the names of all that ran
        self.kernel: Kernel = self.kernels[0]
        self.kernels_used: set[str] = set()
        self.register_buffer("packed", qw.packed)
        self._param_names = tuple(qw.params)
        for key, value in qw.params.items():
            self.register_buffer(f"param_{key}", value)
        self._tensor_param_names = tuple(qw.tensor_params)
        for key, value in qw.tensor_params.items():
            self.register_buffer(f"tensor_{key}", value)
        self.register_buffer("perm", qw.perm)
        self._transform_info = tuple((t.to_json(), tuple(t.tensors())) for t in qw.transforms)
        for i, t in enumerate(qw.transforms):
            for key, value in t.tensors().items():
                self.register_buffer(f"transform{i}_{key}", value)
        self.input_quant = qw.input_quant
        self.register_buffer("input_scale", qw.input_scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._meta = dict(qw.meta)
        self._qw: QuantizedWeight | None = None
        self._choice: dict[int, int] = {}
        self._states: dict[int, Any] = {}  # last: __setattr__ resets the caches once it exists

    @property
    def qweight(self) -> QuantizedWeight:
        """The weight as a :class:`QuantizedWeight` over this module's buffers (built once, and
        again after ``.to()`` or a buffer is replaced)."""
        if self._qw is None:
            self._qw = QuantizedWeight(
                self.format, (self.out_features, self.in_features), self.weight_dtype, self.packed,
                {k: getattr(self, f"param_{k}") for k in self._param_names}, self.perm, dict(self._meta),
                {k: getattr(self, f"tensor_{k}") for k in self._tensor_param_names}, self.input_quant,
                self.input_scale,
                tuple(transform_from_stored(info, {k: getattr(self, f"transform{i}_{k}") for k in keys})
                      for i, (info, keys) in enumerate(self._transform_info)),
            )
        return self._qw

    def _reset(self) -> None:
        """Forget the cached weight view, the kernels' states and the choices per token count."""
        self._qw = None
        self._states.clear()
        self._choice.clear()

    def __setattr__(self, name: str, value: Any) -> None:
        if "_states" in self.__dict__ and (name in self._buffers or name == "input_quant"):
            self._reset()
        super().__setattr__(name, value)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> QuantLinear:
        self._reset()  # .to() / .cuda() / .half() put new tensors in the buffers
        return super()._apply(fn, *args, **kwargs)

    def kernel_for(self, tokens: int) -> Kernel:
        """The kernel that runs a call of ``tokens`` rows: the first that accepts it."""
        i = self._choice.get(tokens)
        if i is None:
            device = self.packed.device
            i = next((j for j, k in enumerate(self.kernels[:-1]) if k.serves(self.format, device, tokens) is None),
                     len(self.kernels) - 1)
            self._choice[tokens] = i
        return self.kernels[i]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qw = self.qweight
        kernel = self.kernel_for(x.numel() // self.in_features) if len(self.kernels) > 1 else self.kernels[0]
        state = self._states.get(id(kernel), _UNSET)
        if state is _UNSET:
            state = self._states[id(kernel)] = kernel.prepare(qw)
        if kernel is not self.kernel or not self.kernels_used:
            self.kernel = kernel
            self.kernels_used.add(kernel.name)
        if self.input_quant is not None and not kernel.quantizes_inputs:
            x = self.input_quant.fake_quant(x, self.input_scale)
        if not qw.transforms or kernel.weight_transforms in ("dense", "fused"):
            return kernel.forward(x, qw, state, self.bias)
        for t in qw.transforms:
            x = t.apply_input(x)
        y = kernel.forward(x, qw, state, None)
        for t in reversed(qw.transforms):
            y = t.apply_output(y)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        act = f", input={self.input_quant.spec}" if self.input_quant is not None else ""
        names = "|".join(k.name for k in self.kernels)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.format.spec}{act}, kernel={names}")
