"""Format: *what* a weight becomes — a grid, its fitted parameters, its packed codes.

A format works on 2-D weights ``[rows, cols]`` (``[out_features, in_features]``) whose columns
are cut into *groups* of :meth:`Format.group_size` columns that share grid parameters. The
numerics are tile-level so that column-by-column algorithms (GPTQ/LDLQ) can drive them:

* :meth:`fit` fits grid parameters to a tile of whole groups → ``{name: [rows, n_groups, ...]}``
* :meth:`round` rounds any column slice onto fitted parameters → integer codes
* :meth:`decode` turns codes back into values (``round`` then ``decode`` = quantize-dequantize)
* :meth:`pack` / :meth:`unpack` turn codes into bytes and back

``col0`` arguments say where a column slice starts, relative to the first group of ``params``,
so a format whose grid depends on the position inside a group (K-quant sub-blocks) knows it.
Vector formats set :attr:`block_width` > 1: columns are rounded ``block_width`` at a time.

Parameters returned by :meth:`fit` must already be rounded to their storage dtype, so that an
exporter writes exactly what the quantizer used and a reload is bit-identical. A parameter
whose name starts with ``_`` is *transient*: :meth:`round` may use it (llama.cpp's encoders
round with the float32 scale before it is stored as fp16), :meth:`decode` must not, and
:class:`QuantizedWeight` drops it, so it is never stored or counted.

**Per-tensor parameters** (data model v2): a format may fit parameters once per whole weight,
before any group (:meth:`fit_tensor`; NF4's double quantization: one offset and the 8-bit scales
of the absmax vector, in chunks that run across rows). They are stored once
(:attr:`QuantizedWeight.tensor_params`) and reach the tile-level methods as a *view*:
:meth:`tensor_view` turns them into group-indexed tensors ``[rows, n_groups, ...]`` (names
starting with ``_``, never stored), which a driver slices like group parameters, passes to
:meth:`fit` as ``view=`` and merges into the parameters it hands :meth:`round` and
:meth:`decode` — which may read these view entries (they are rebuilt from the stored tensor
parameters on load). Drivers pass ``view=`` only to formats whose :meth:`fit_tensor` returns
something, so formats without per-tensor parameters never see it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..options import Options, options_to_dict
from .activation import ActQuant
from .bits import pack_bits, unpack_bits  # re-exported: formats pack with them
from .component import Component
from .weight_transform import WeightTransform

Params = dict[str, torch.Tensor]


class Format(Component, ABC):
    """Base class of every weight format. Subclasses set ``name``, ``description``, ``Options``."""

    #: columns rounded jointly (1 for scalar grids, 8 for E8P-style vector codebooks)
    block_width: ClassVar[int] = 1

    # -- identity ------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        """The canonical short spelling of this format with its options (e.g. ``int4-g128``)."""
        return self.name

    @classmethod
    def from_spec(cls, spec: str) -> Options | None:
        """Parse a short spec (``int4-g128``) into options, or ``None`` if it is not this format's."""
        return cls.Options() if spec.strip().lower().replace("_", "-") == cls.name else None

    @classmethod
    def spec_help(cls) -> str:
        """One line documenting the spec syntax (shown by ``qf formats``)."""
        return cls.name

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "spec": self.spec, "options": options_to_dict(self.options)}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Format) and type(other) is type(self) and other.options == self.options

    def __hash__(self) -> int:
        return hash((type(self), self.options))

    def __repr__(self) -> str:
        return f"<format {self.spec}>"

    # -- geometry ------------------------------------------------------------------------
    @abstractmethod
    def group_size(self, in_features: int) -> int:
        """Columns that share one set of grid parameters, for a tensor of this width."""

    def check_shape(self, shape: tuple[int, int]) -> str | None:
        """``None`` if a ``[out, in]`` weight fits this format, else the reason it does not."""
        out_f, in_f = shape
        g = self.group_size(in_f)
        if in_f % g:
            return f"{in_f} columns are not a multiple of the group size {g}"
        if g % self.block_width:
            return f"group size {g} is not a multiple of the block width {self.block_width}"
        return None

    def fallback(self, shape: tuple[int, int]) -> Format | None:
        """A format to use instead when :meth:`check_shape` fails (documented per format)."""
        return None

    # -- numerics ------------------------------------------------------------------------
    def fit_tensor(self, w: torch.Tensor) -> Params:
        """Parameters fitted once to a whole weight ``[out, in]`` before any group is fitted
        (rounded to their storage dtypes; any shapes). Default: none."""
        return {}

    def tensor_view(self, tensor_params: Params, shape: tuple[int, int]) -> Params:
        """Group-indexed views ``[rows, n_groups, ...]`` of :meth:`fit_tensor`'s parameters for a
        weight of ``shape``, named with a leading ``_`` (see the module docstring)."""
        return {}

    @abstractmethod
    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None, view: Params | None = None) -> Params:
        """Fit grid parameters to ``w`` ``[rows, k * group]`` → tensors shaped ``[rows, k, ...]``.

        :param importance: optional per-column weights ``[cols]`` (an importance matrix
            diagonal: mean squared activation per input channel) for weighted fitting, or
            ``[rows, cols]``: one such vector per row (e.g. several candidate weights stacked
            along the rows, each with its own importance). Rows are fitted independently.
        :param view: for formats with per-tensor parameters, the slice of :meth:`tensor_view`
            covering this tile's groups. Without it such a format treats ``w`` as the whole
            weight: it fits the tensor parameters itself and returns their view among the
            parameters (so ``decode(round(w, fit(w)), fit(w))`` works on a whole weight).
        """

    def fit_for_search(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Params:
        """Parameters of a whole weight for *ranking* candidates inside a search (AWQ's scale and
        clip grids): what :meth:`fit` returns, or a cheaper approximation of it for a format
        whose exact fit is itself a costly search (a format may instead override
        :meth:`roundtrip`'s ``for_search``, as qf-gguf's K-quants do). The final encode always
        uses :meth:`fit`. Default: :meth:`fit`."""
        return self.fit(w, importance)

    def roundtrip(self, w: torch.Tensor, importance: torch.Tensor | None = None, *,
                  for_search: bool = False) -> torch.Tensor:
        """What a whole weight ``w`` decodes to once quantized (float32): :meth:`fit` (or
        :meth:`fit_for_search`), then :meth:`quantize_dequantize` — without packing. Formats
        whose fit already finds the codes of this very ``w`` (GGML K-quants: the encoder's
        own codes) override it to decode those instead of rounding again."""
        params = self.fit_for_search(w, importance) if for_search else self.fit(w, importance)
        return self.quantize_dequantize(w, params)

    @abstractmethod
    def round(self, w: torch.Tensor, params: Params, col0: int = 0) -> torch.Tensor:
        """Round columns ``[col0, col0 + w.shape[1])`` of the tile described by ``params`` to codes."""

    @abstractmethod
    def decode(self, codes: torch.Tensor, params: Params, col0: int = 0) -> torch.Tensor:
        """Values (float32) of ``codes`` for columns starting at ``col0`` of the tile of ``params``."""

    def affine(self, params: Params, col0: int, ncols: int) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
        """For grids whose value is ``a · code + b`` with integer codes in ``[cmin, cmax]``:
        ``(a, b, cmin, cmax)``, ``a`` and ``b`` float32 ``[rows, ncols]`` for columns
        ``[col0, col0 + ncols)`` of the tile of ``params`` (the nearest code is
        ``clamp(round((w − b) / a), cmin, cmax)``; where ``a = 0`` every code decodes to ``b``).
        Lets a quantizer run a fused kernel instead of calling :meth:`round`/:meth:`decode` per
        column. ``None`` (the default) when the grid is not of that form."""
        return None

    def params_from_affine(self, a: torch.Tensor, b: torch.Tensor, like: Params) -> Params | None:
        """The inverse of :meth:`affine`: parameters for a tile whose groups have the value
        ``a · code + b`` (``a``, ``b`` float32 ``[rows, n_groups]``, one value per group),
        rounded to their storage dtypes, shaped like ``like`` (parameters :meth:`fit` made for the
        same tile) — how an optimiser of the grid (HQQ's zero points, QAT's learned scales)
        hands its values back. ``None`` (the default): the format takes no fitted values back."""
        return None

    def scaled_levels(self, params: Params, col0: int, ncols: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For lookup grids whose value is ``s · levels[code]`` with one scale per group (NF4,
        FP4): ``(s, levels)``, ``s`` float32 ``[rows, ncols]`` for columns ``[col0, col0 + ncols)``
        of the tile of ``params`` and ``levels`` the float32 values of the codes, in code order,
        where :meth:`round` picks the level nearest ``w / s``. ``None`` (the default) otherwise."""
        return None

    def params_from_scale(self, s: torch.Tensor, like: Params) -> Params | None:
        """The inverse of :meth:`scaled_levels`: parameters for groups with scale ``s`` (float32
        ``[rows, n_groups]``), rounded to their storage dtypes, shaped like ``like`` — how an
        optimiser of the scale (HQQ) hands it back. ``None`` (the default): not taken back."""
        return None

    def quantize_dequantize(self, w: torch.Tensor, params: Params, col0: int = 0) -> torch.Tensor:
        return self.decode(self.round(w, params, col0), params, col0)

    # -- storage -------------------------------------------------------------------------
    @abstractmethod
    def code_bits(self) -> int:
        """Bits per stored code (per weight for scalar grids, per block for vector grids)."""

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[rows, n_codes]`` → a flat ``uint8`` tensor (dense bitstream, row-major)."""
        return pack_bits(codes, self.code_bits())

    def unpack(self, packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """Inverse of :meth:`pack` for a weight of ``shape`` (``[out, in]``)."""
        rows, cols = shape
        n_codes = cols // self.block_width
        return unpack_bits(packed, self.code_bits(), rows * n_codes).view(rows, n_codes)

    def param_nbytes(self, shape: tuple[int, int]) -> int:
        """Bytes of grid parameters stored for a weight of ``shape`` (per-group and per-tensor)."""
        params = stored_params(self.fit(torch.zeros(1, shape[1])))
        per_row = sum(p.numel() * p.element_size() for p in params.values())
        # shapes only: a meta tensor costs no memory, however large the weight
        tensor = stored_params(self.fit_tensor(torch.zeros(shape, device="meta")))
        return shape[0] * per_row + sum(p.numel() * p.element_size() for p in tensor.values())

    def nbytes(self, shape: tuple[int, int]) -> int:
        """Bytes stored for a weight of ``shape``: packed codes plus grid parameters."""
        n_codes = shape[0] * (shape[1] // self.block_width)
        return math.ceil(n_codes * self.code_bits() / 8) + self.param_nbytes(shape)

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        """Stored bits per weight, derived from :meth:`nbytes`."""
        return 8 * self.nbytes(shape) / (shape[0] * shape[1])

    # -- whole tensors -------------------------------------------------------------------
    def quantize(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantizedWeight:
        """Round-to-nearest a whole ``[out, in]`` weight (fit every group, round, pack)."""
        reason = self.check_shape(tuple(w.shape))
        if reason:
            raise ValueError(f"format {self.spec} cannot store a {tuple(w.shape)} weight: {reason}")
        w32 = w.detach().to(torch.float32)
        tensor = self.fit_tensor(w32)
        view = self.tensor_view(tensor, tuple(w.shape)) if tensor else {}
        params = self.fit(w32, importance, view=view) if view else self.fit(w32, importance)
        codes = self.round(w32, {**params, **view})
        return QuantizedWeight(self, tuple(w.shape), w.dtype, self.pack(codes), params, tensor_params=tensor)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        """Values ``[out, in]`` (float32, in the order the codes are stored)."""
        codes = self.unpack(qw.packed, qw.shape)
        return self.decode(codes, qw.full_params())


@dataclass
class QuantizedWeight:
    """One quantized tensor: format, packed codes, grid parameters, original shape and dtype.

    ``perm``, when set, is the input-column order the codes are stored in (act-order): stored
    column ``i`` is original column ``perm[i]``. :meth:`dequantize` undoes it. ``transforms`` are
    run-time maps between the original weight and the stored one (QuIP#'s randomized Hadamard
    transforms: :mod:`quantfoundry.roles.weight_transform`), in the order they were applied
    before ``perm``; :meth:`dequantize` undoes them too. ``tensor_params``
    are the format's per-tensor parameters (:meth:`Format.fit_tensor`), stored and counted once.
    ``input_quant`` is how the engine quantizes the linear's input (W8A8), and ``input_scale``
    its calibrated static scale (float32 ``[1]``; ``None`` for dynamic per-token scales).
    """

    format: Format
    shape: tuple[int, int]
    dtype: torch.dtype
    packed: torch.Tensor
    params: Params
    perm: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    tensor_params: Params = field(default_factory=dict)
    input_quant: ActQuant | None = None
    input_scale: torch.Tensor | None = None
    transforms: tuple[WeightTransform, ...] = ()

    def __post_init__(self) -> None:
        self.transforms = tuple(self.transforms)
        self.params = stored_params(self.params)
        self.tensor_params = stored_params(self.tensor_params)
        if self.input_quant is not None and not self.input_quant.dynamic and self.input_scale is None:
            raise ValueError(f"the static activation scheme {self.input_quant.spec} needs its input_scale")

    def codes(self) -> torch.Tensor:
        return self.format.unpack(self.packed, self.shape)

    def full_params(self) -> Params:
        """The per-group parameters with the view of the per-tensor ones: what :meth:`Format.decode`
        of the whole weight reads."""
        if not self.tensor_params:
            return self.params
        return {**self.params, **self.format.tensor_view(self.tensor_params, self.shape)}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The original weight's values: the codes decoded, ``perm`` and ``transforms`` undone."""
        return self.undo_transforms(self.stored_dequantize()).to(dtype)

    def stored_dequantize(self) -> torch.Tensor:
        """The stored weight's values (float32): the codes decoded, ``perm`` undone, ``transforms`` not."""
        w = self.format.dequantize(self)
        if self.perm is not None:
            w = w[:, torch.argsort(self.perm)]
        return w

    def undo_transforms(self, w: torch.Tensor) -> torch.Tensor:
        for t in reversed(self.transforms):
            w = t.to_dense(w)
        return w

    def nbytes(self) -> int:
        """Stored bytes: packed codes, grid parameters and the permutation if any."""
        n = self.packed.numel() * self.packed.element_size()
        n += sum(p.numel() * p.element_size() for p in (*self.params.values(), *self.tensor_params.values()))
        if self.perm is not None:
            n += self.perm.numel() * 4  # stored as int32 (g_idx-style)
        if self.input_scale is not None:
            n += self.input_scale.numel() * self.input_scale.element_size()
        return n + sum(t.nbytes() for t in self.transforms)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return QuantizedWeight(
            self.format, self.shape, self.dtype, self.packed.to(device),
            {k: v.to(device) for k, v in self.params.items()},
            None if self.perm is None else self.perm.to(device), dict(self.meta),
            {k: v.to(device) for k, v in self.tensor_params.items()}, self.input_quant,
            None if self.input_scale is None else self.input_scale.to(device),
            tuple(t.to(device) for t in self.transforms),
        )

    @property
    def device(self) -> torch.device:
        return self.packed.device


def stored_params(params: Params) -> Params:
    """``params`` without the transient ones (names starting with ``_``)."""
    return {k: v for k, v in params.items() if not k.startswith("_")}


def slice_groups(params: Params, g0: int, k: int) -> Params:
    """Groups ``[g0, g0 + k)`` of group-indexed parameters (dim 1)."""
    return {name: v[:, g0:g0 + k] for name, v in params.items()}

