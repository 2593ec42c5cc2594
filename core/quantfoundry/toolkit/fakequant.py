"""Fake quantization through any :class:`~quantfoundry.Format`, for quantization-aware training.

:class:`FakeQuant` holds one weight's grid parameters — fitted once (round-to-nearest) or taken
from another quantizer's :class:`~quantfoundry.QuantizedWeight` — and maps a float weight to the
values the format stores for it, with a straight-through gradient:

* **fixed parameters** (any format): the forward value is exactly
  :meth:`Format.quantize_dequantize`; the gradient passes unchanged where the weight lies inside
  the grid's range (an affine grid's codes ``[cmin, cmax]`` ± half a step, a lookup grid's
  extreme levels) and is zero where the format clips it; formats that tell neither
  (:meth:`Format.affine`, :meth:`Format.scaled_levels`) pass it everywhere.
* **learned parameters** (``learn=True``; affine grids that take their values back through
  :meth:`Format.params_from_affine`): each group's step ``a`` and offset ``b`` are trained with the
  weight, LSQ+ style (Bhalgat et al., 2020): with ``x = (w − b)/a`` and ``c = clamp(round(x))``,
  ``∂v/∂w = 1`` inside the range and 0 outside, ``∂v/∂a = c − x`` inside and ``c`` outside,
  ``∂v/∂b = 0`` inside and 1 outside. The forward value is computed from the parameters as they
  will be stored (rounded to their storage dtypes, zero points to integers where the format
  keeps them so): what is trained is what is exported.

:func:`fake_quant_input` does the same for a linear's input under its activation scheme
(:class:`~quantfoundry.ActQuant`, W8A8): the forward value is what the engine multiplies
(:meth:`ActQuant.fake_quant`), the gradient passes unchanged — dynamic per-token scales never clip;
a static scale stops it beyond its largest code.

:meth:`FakeQuant.quantized` rounds once — the same codes and parameters as the forward — into a
:class:`~quantfoundry.QuantizedWeight` whose :meth:`~quantfoundry.QuantizedWeight.dequantize`
equals the fake-quantized weight exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from ..roles.activation import ActQuant
from ..roles.format import Format, Params, QuantizedWeight


class _FixedSTE(torch.autograd.Function):
    """Forward: the format's values; backward: the gradient where ``inside``, else zero."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, values: torch.Tensor, inside: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(inside)
        ctx.has_mask = inside is not None
        return values

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        if ctx.has_mask:
            grad = grad * inside
        return grad, None, None


class _LearnedSTE(torch.autograd.Function):
    """Forward: the stored grid's values; backward: LSQ+'s gradients for ``w``, ``a``, ``b``
    (``a``, ``b`` per group ``[rows, n_groups]``, expanded over ``group`` columns)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, values: torch.Tensor, x: torch.Tensor,
                codes: torch.Tensor, inside: torch.Tensor, group: int) -> torch.Tensor:
        ctx.save_for_backward(x, codes, inside)
        ctx.group = group
        return values

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, codes, inside = ctx.saved_tensors
        rows, cols = grad.shape
        g = ctx.group
        grad_w = grad * inside
        da = torch.where(inside, codes - x, codes)
        grad_a = (grad * da).view(rows, cols // g, g).sum(-1)
        grad_b = (grad * (~inside)).view(rows, cols // g, g).sum(-1)
        return grad_w, grad_a, grad_b, None, None, None, None, None


class FakeQuant(nn.Module):
    """One ``[out, in]`` weight's fake quantizer onto ``fmt`` (see the module docstring).

    :param fmt: the format (any registered grid).
    :param w: the float weight the parameters are fitted to (round-to-nearest), unless ``start``.
    :param start: a quantized weight of the same shape and format whose parameters to start from
        (a GPTQ/AWQ/HQQ result as QAT's first stage); its ``perm`` and ``transforms`` must be empty.
    :param learn: train the grid's per-group step and offset (affine grids only).
    """

    def __init__(self, fmt: Format, w: torch.Tensor | None = None, *, start: QuantizedWeight | None = None,
                 learn: bool = False) -> None:
        super().__init__()
        if start is not None:
            if start.perm is not None or start.transforms:
                raise ValueError("FakeQuant starts from a weight without column order or transforms")
            if start.format != fmt:
                raise ValueError(f"FakeQuant onto {fmt.spec} cannot start from a {start.format.spec} weight")
            shape, params, tensor = start.shape, dict(start.params), dict(start.tensor_params)
        else:
            if w is None:
                raise ValueError("FakeQuant needs the weight to fit or a quantized weight to start from")
            w32 = w.detach().to(torch.float32)
            reason = fmt.check_shape(tuple(w32.shape))
            if reason:
                raise ValueError(f"format {fmt.spec} cannot store a {tuple(w32.shape)} weight: {reason}")
            shape = tuple(w32.shape)
            tensor = fmt.fit_tensor(w32)
            view = fmt.tensor_view(tensor, shape) if tensor else {}
            params = fmt.fit(w32, view=view) if view else fmt.fit(w32)
        self.fmt = fmt
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self._params = params  # the stored parameters (fixed mode; learned mode's starting point)
        self._tensor = tensor
        self.learn = False
        if learn:
            ab = fmt.affine(self.full_params(), 0, self.shape[1])
            if ab is None or fmt.params_from_affine(ab[0][:, :1], ab[1][:, :1], _first_group(params)) is None:
                raise ValueError(f"format {fmt.spec} has no affine grid to learn (learn=False trains the weight only)")
            a, b, self.cmin, self.cmax = ab
            self.group = self.shape[1] // next(iter(params.values())).shape[1]
            self.a = nn.Parameter(a[:, :: self.group].contiguous())
            self.b = nn.Parameter(b[:, :: self.group].contiguous())
            self.learn = True

    def full_params(self) -> Params:
        """The stored parameters of the current state (learned ones rounded as they will be stored)."""
        params = self._params
        if self.learn:
            params = self.fmt.params_from_affine(self.a.detach(), self.b.detach(), self._params)
        view = self.fmt.tensor_view(self._tensor, self.shape) if self._tensor else {}
        return {**params, **view}

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        w32 = w.to(torch.float32)
        params = self.full_params()
        if not self.learn:
            values = self.fmt.quantize_dequantize(w32.detach(), params)
            return _FixedSTE.apply(w32, values, self._inside(w32.detach(), params))
        a, b, cmin, cmax = self.fmt.affine(params, 0, self.shape[1])
        safe = torch.where(a == 0, torch.ones_like(a), a)
        x = (w32.detach() - b) / safe
        codes = self.fmt.round(w32.detach(), params)
        values = self.fmt.decode(codes, params)
        inside = (x >= cmin - 0.5) & (x <= cmax + 0.5)
        return _LearnedSTE.apply(w32, self.a, self.b, values, x, codes.to(torch.float32), inside, self.group)

    def _inside(self, w: torch.Tensor, params: Params) -> torch.Tensor | None:
        """Where the grid does not clip ``w`` (None: the format does not say)."""
        ab = self.fmt.affine(params, 0, self.shape[1])
        if ab is not None:
            a, b, cmin, cmax = ab
            lo = torch.minimum(a * (cmin - 0.5), a * (cmax + 0.5)) + b
            hi = torch.maximum(a * (cmin - 0.5), a * (cmax + 0.5)) + b
            return (w >= lo) & (w <= hi)
        sl = self.fmt.scaled_levels(params, 0, self.shape[1])
        if sl is not None:
            s, levels = sl
            lo = torch.minimum(s * levels.min(), s * levels.max())
            hi = torch.maximum(s * levels.min(), s * levels.max())
            return (w >= lo) & (w <= hi)
        return None

    def quantized(self, w: torch.Tensor, dtype: torch.dtype | None = None) -> QuantizedWeight:
        """``w`` rounded once onto the current grid: the codes and parameters of :meth:`forward`."""
        w32 = w.detach().to(torch.float32)
        params = self.full_params()
        codes = self.fmt.round(w32, params)
        stored = {k: v for k, v in params.items() if not k.startswith("_")}
        return QuantizedWeight(self.fmt, self.shape, dtype or w.dtype, self.fmt.pack(codes), stored,
                               tensor_params=self._tensor)


def _first_group(params: Params) -> Params:
    return {k: v[:, :1] for k, v in params.items()}


def fake_quant_input(act: ActQuant, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` as the engine quantizes it under ``act`` (``scale``: a static scheme's), with a
    straight-through gradient (zero beyond a static scale's range)."""
    values = act.fake_quant(x.detach(), scale)
    inside = None
    if not act.dynamic and scale is not None:
        inside = x.detach().abs() <= scale.float().to(x.device) * act.qmax
    return _FixedSTE.apply(x, values, inside)
