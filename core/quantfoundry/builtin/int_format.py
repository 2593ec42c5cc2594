"""Built-in format ``int``: uniform integer grids, 1–8 bits (1: asymmetric only), per group or per channel,
symmetric or asymmetric (the GPTQ/AWQ conventions).

Spec syntax: ``int<bits>[-g<group>][-sym|-asym][-sf32|-sbf16]`` — ``int4-g128`` (4 bits,
groups of 128 input columns, asymmetric), ``int8`` (per output channel), ``int3-g64-sym``.
No ``-g`` means one group per row (per-channel). Asymmetric is the default.

Grid (per group of columns, float32 arithmetic, scale stored in ``scale_dtype``):

* asymmetric: ``xmin = min(min w, 0)``, ``xmax = max(max w, 0)``,
  ``scale = (xmax - xmin) / (2^b - 1)``, ``zero = clamp(round(-xmin / scale), 0, 2^b - 1)``;
* symmetric: ``scale = 2 max|w| / (2^b - 1)``, ``zero = 2^(b-1)`` (implied, not stored);
* ``q = clamp(round(w / scale) + zero, 0, 2^b - 1)``, ``w' = (q - zero) * scale``.
* ``-zf16`` (``zero_dtype=float16``): the zero point is stored as float16, not rounded
  (``zero = clamp(-xmin / scale, 0, 2^b - 1)``), and ``q = clamp(round(w / scale + zero), ...)``
  — HQQ's grid, whose optimiser moves the zero point between integers. A zero point handed
  back (:meth:`IntFormat.params_from_affine`) is kept as given, inside float16's range: it may
  lie outside the code range for a group whose values do not include 0.

A group whose weights are all zero gets ``scale = 1`` (every code decodes to 0).

**Width rule.** When a tensor's column count is not a multiple of the group size, the group
size is halved until it divides the width, down to 32; if none does, the tensor falls back to
per-channel (one group per row). ``int4-g128`` on 576 columns becomes ``int4-g64``; on 172
columns, ``int4`` (per-channel). The run summary and the manifest list every fallback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from ..hookspecs import hookimpl
from ..options import Options
from ..roles.format import Format, Params

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_DTYPE_SUFFIX = {"float32": "sf32", "bfloat16": "sbf16"}
_SPEC = re.compile(r"^int(\d)(?:-g(\d+))?(?:-(sym|asym))?(?:-(sf32|sbf16|sf16))?(?:-(zf16))?$")
MIN_FALLBACK_GROUP = 32


@dataclass(frozen=True, kw_only=True)
class IntOptions(Options):
    bits: int = field(default=4, metadata={"help": "bits per weight code (1-8; 1 only asymmetric)"})
    group_size: int = field(default=128, metadata={"help": "input columns per scale; 0 = per output channel"})
    sym: bool = field(default=False, metadata={"help": "symmetric grid (zero point fixed at 2^(bits-1))"})
    scale_dtype: Literal["float16", "bfloat16", "float32"] = field(
        default="float16", metadata={"help": "storage dtype of the scales"})
    zero_dtype: Literal["uint8", "float16"] = field(default="uint8", metadata={
        "help": "storage of the zero points: uint8 (integer, GPTQ/AWQ) or float16 (HQQ's fractional zero points)"})

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be between 1 and 8, got {self.bits}")
        if self.bits == 1 and self.sym:
            raise ValueError("a symmetric 1-bit grid has no zero code to be symmetric about; use int1 (asymmetric)")
        if self.group_size < 0:
            raise ValueError(f"group_size must be >= 0 (0 = per channel), got {self.group_size}")
        if self.sym and self.zero_dtype != "uint8":
            raise ValueError("a symmetric grid stores no zero point; drop zero_dtype or use an asymmetric grid")


class IntFormat(Format):
    name = "int"
    description = "uniform integer grid, 1-8 bits, per group or per channel, sym/asym (GPTQ/AWQ style)"
    Options = IntOptions
    examples = ("int8", "int4-g128", "int4-g32", "int3-g128", "int2-g64")

    options: IntOptions

    @property
    def spec(self) -> str:
        o = self.options
        s = f"int{o.bits}" + (f"-g{o.group_size}" if o.group_size else "") + ("-sym" if o.sym else "")
        s += f"-{_DTYPE_SUFFIX[o.scale_dtype]}" if o.scale_dtype in _DTYPE_SUFFIX else ""
        return s + ("-zf16" if o.zero_dtype == "float16" else "")

    @classmethod
    def from_spec(cls, spec: str) -> IntOptions | None:
        m = _SPEC.match(spec.strip().lower())
        if not m:
            return None
        bits, group, sym, sdt, zdt = m.groups()
        scale_dtype = {"sf32": "float32", "sbf16": "bfloat16"}.get(sdt or "", "float16")
        return IntOptions(bits=int(bits), group_size=int(group or 0), sym=sym == "sym", scale_dtype=scale_dtype,
                          zero_dtype="float16" if zdt else "uint8")

    @classmethod
    def spec_help(cls) -> str:
        return ("int<bits>[-g<group>][-sym][-zf16] e.g. int4-g128, int8, int3-g64-sym, int4-g64-zf16 "
                "(no -g: per channel; -zf16: float16 zero points)")

    @property
    def maxq(self) -> int:
        return (1 << self.options.bits) - 1

    def group_size(self, in_features: int) -> int:
        return self.options.group_size or in_features

    def fallback(self, shape: tuple[int, int]) -> Format | None:
        in_f = shape[1]
        g = self.options.group_size
        while g >= MIN_FALLBACK_GROUP and in_f % g:
            g //= 2
        if g < MIN_FALLBACK_GROUP or in_f % g:
            g = 0
        return IntFormat(replace(self.options, group_size=g))

    def code_bits(self) -> int:
        return self.options.bits

    # -- numerics ------------------------------------------------------------------------
    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Params:
        rows, cols = w.shape
        g = self.group_size(cols) if self.options.group_size == 0 else self.options.group_size
        if cols % g:
            raise ValueError(f"fit needs whole groups: {cols} columns, group size {g}")
        x = w.to(torch.float32).view(rows, cols // g, g)
        xmin = x.amin(dim=-1).clamp(max=0)
        xmax = x.amax(dim=-1).clamp(min=0)
        sdt = _DTYPES[self.options.scale_dtype]
        info = torch.finfo(sdt)
        # divide by a tensor, not a Python scalar: CUDA turns scalar division into a multiply
        # by the reciprocal, which rounds differently from the CPU (bit-identical results
        # across devices need IEEE division on both)
        maxq = torch.full_like(xmin, float(self.maxq))
        if self.options.sym:
            scale = (2 * torch.maximum(-xmin, xmax)) / maxq
        else:
            scale = (xmax - xmin) / maxq
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        scale = scale.clamp(min=info.tiny, max=info.max).to(sdt)
        return self._stored(scale, None if self.options.sym else (-xmin / scale.to(torch.float32)).clamp(0, self.maxq))

    def params_from_affine(self, a: torch.Tensor, b: torch.Tensor, like: Params) -> Params:
        """Grid parameters for ``value = a · code + b`` per group (``a``, ``b`` ``[rows, n_groups]``,
        float32), rounded to their storage dtypes: ``scale = a``, ``zero = −b / scale`` (rounded
        to an integer unless ``zero_dtype`` is float16); a symmetric grid keeps its implied zero."""
        scale = a.to(_DTYPES[self.options.scale_dtype])
        return self._stored(scale, None if self.options.sym else -b / scale.to(torch.float32))

    def _stored(self, scale: torch.Tensor, zero: torch.Tensor | None) -> Params:
        """The stored parameters: ``scale`` (in its storage dtype) and, for an asymmetric grid,
        the float32 zero point rounded to ``zero_dtype`` (clamped to the code range for ``uint8``)."""
        if zero is None:
            return {"scale": scale}
        if self.options.zero_dtype == "float16":
            return {"scale": scale, "zero": zero.clamp(-65504, 65504).to(torch.float16)}
        return {"scale": scale, "zero": torch.round(zero.clamp(0, self.maxq)).to(torch.uint8)}

    def _grid(self, params: Params, col0: int, ncols: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Scale and zero shaped to broadcast over ``w.view(rows, -1, g)`` for the columns
        ``[col0, col0 + ncols)``, and ``g`` (whole groups are viewed, not gathered per column)."""
        scale = params["scale"]
        g = self.options.group_size or ncols
        if self.options.group_size == 0:
            s, z_src, g = scale[:, :1], params.get("zero", None), ncols
            z_src = None if z_src is None else z_src[:, :1]
        elif col0 % g == 0 and ncols % g == 0:
            g0 = col0 // g
            s = scale[:, g0:g0 + ncols // g]
            z_src = params["zero"][:, g0:g0 + ncols // g] if "zero" in params else None
        else:  # a slice inside groups (GPTQ's column loop): gather per column
            idx = torch.div(torch.arange(col0, col0 + ncols, device=scale.device), g, rounding_mode="floor")
            s = scale.index_select(1, idx)
            z_src = params["zero"].index_select(1, idx) if "zero" in params else None
            g = 1
        s32 = s.to(torch.float32).unsqueeze(-1)
        if z_src is None:
            z = torch.full_like(s32, float(1 << (self.options.bits - 1)))
        else:
            z = z_src.to(torch.float32).unsqueeze(-1)
        return s32, z, g

    def affine(self, params: Params, col0: int, ncols: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        scale = params["scale"]
        g = self.options.group_size or ncols
        idx = torch.zeros(ncols, dtype=torch.long, device=scale.device) if self.options.group_size == 0 else \
            torch.div(torch.arange(col0, col0 + ncols, device=scale.device), g, rounding_mode="floor")
        a = scale.index_select(1, idx).to(torch.float32)
        z = params["zero"].index_select(1, idx).to(torch.float32) if "zero" in params else \
            torch.full_like(a, float(1 << (self.options.bits - 1)))
        return a, -z * a, 0, self.maxq

    def round(self, w: torch.Tensor, params: Params, col0: int = 0) -> torch.Tensor:
        rows, ncols = w.shape
        s, z, g = self._grid(params, col0, ncols)
        if self.options.zero_dtype == "float16":  # a fractional zero point: round after adding it (HQQ)
            q = torch.round(w.to(torch.float32).reshape(rows, -1, g) / s + z)
        else:
            q = torch.round(w.to(torch.float32).reshape(rows, -1, g) / s).add_(z)
        return q.clamp_(0, self.maxq).to(torch.uint8).reshape(rows, ncols)

    def decode(self, codes: torch.Tensor, params: Params, col0: int = 0) -> torch.Tensor:
        rows, ncols = codes.shape
        s, z, g = self._grid(params, col0, ncols)
        return ((codes.reshape(rows, -1, g).to(torch.float32) - z) * s).reshape(rows, ncols)


@hookimpl
def qf_register_formats(register):
    register(IntFormat)
