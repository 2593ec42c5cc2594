"""GGML's 32-element block types Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, encoded as llama.cpp's ``_ref``
encoders do (``ggml-quants.c``; see ``docs/llama-cpp-reference.md`` §1.1, §2.1–2.5).

Each is a core :class:`~quantfoundry.Format` with group size 32, vectorised in torch over all
blocks (CPU and CUDA). The bit-exact details that matter:

* codes are rounded with the **float32** scale (and min), before they are stored as fp16; those
  float32 values travel as transient parameters (``_id``, ``_min``) that are never stored;
* Q4_0/Q5_0 take the signed value of the *first* element of largest magnitude, ``d = max/-8``
  (``/-16``), and codes ``min(15, trunc(x/d + 8.5))``; an all-zero block stores ``d = -0.0``;
* Q4_1/Q5_1 ``d = (max-min)/15`` (``/31``), codes ``trunc((x-min)/d + 0.5)``;
* Q8_0 ``d = amax/127``, codes ``roundf(x/d)`` (halves away from zero, not to even).

:meth:`GGMLFormat.ggml_bytes` lays a quantized weight out as GGML blocks (fields in struct
order, little-endian), byte-identical to ``llama-quantize``'s output for the same float32 input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from quantfoundry import Format, Options, Params, QuantizedWeight
from quantfoundry.toolkit import phase

from .backend import native_bytes
from .search import _full, _seq_sum, _sqrtf, make_qkx2_quants, make_qx_quants

BLOCK = 32


@dataclass(frozen=True, kw_only=True)
class GGMLOptions(Options):
    """GGML block types have no options: the type fixes the layout."""


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C ``roundf``: nearest, halves away from zero (``floor(|v|+0.5)`` is wrong for 0.49999997)."""
    t = torch.trunc(v)
    return t + torch.sign(v) * ((v - t).abs() >= 0.5).to(v.dtype)


def _f16(t: torch.Tensor) -> torch.Tensor:
    """fp32 → fp16, round to nearest even (ggml's ``GGML_FP32_TO_FP16``)."""
    return t.to(torch.float16)


def _safe_reciprocal(d: torch.Tensor) -> torch.Tensor:
    """``d ? 1.0f/d : 0.0f`` (``-0.0`` counts as zero)."""
    return torch.where(d != 0, torch.ones_like(d) / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))


def _per_column(p: torch.Tensor, col0: int, ncols: int) -> torch.Tensor:
    """Per-block parameters ``[rows, k]`` → per-column ``[rows, ncols]`` for columns from ``col0``."""
    idx = torch.div(torch.arange(col0, col0 + ncols, device=p.device), BLOCK, rounding_mode="floor")
    return p[:, idx]


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Blocks of 32 codes ``[rows, k, 32]`` → ``qs`` ``[rows, k, 16]``: byte j = code j | code j+16 << 4."""
    c = codes.to(torch.uint8) & 0x0F
    return c[..., :16] | (c[..., 16:] << 4)


def _from_nibbles(qs: torch.Tensor) -> torch.Tensor:
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1).to(torch.int32)



def _high_bits(codes: torch.Tensor) -> torch.Tensor:
    """The 5th bit of 32 codes → ``qh``, a little-endian uint32 as 4 bytes: bit j = bit 4 of code j."""
    bits = ((codes.to(torch.int32) >> 4) & 1).to(torch.uint8).view(*codes.shape[:-1], 4, 8)
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int32)).to(torch.uint8)
    return (bits * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def _from_high_bits(qh: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, device=qh.device, dtype=torch.uint8)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(*qh.shape[:-1], 32).to(torch.int32)


class GGMLFormat(Format):
    """Base of the GGML block types: one block of :attr:`block` elements per group.

    Subclasses give the GGML name and type id, the block's fields in struct order and small
    vectorised functions: fit per block, round and decode per column, and the code bytes of a
    block.
    """

    Options = GGMLOptions
    ggml_name: ClassVar[str]
    ggml_type: ClassVar[int]  # gguf.GGMLQuantizationType value
    block: ClassVar[int] = BLOCK
    #: the block's fields in struct order: (param name or "packed", dtype, elements per block)
    fields: ClassVar[tuple[tuple[str, torch.dtype, int], ...]]
    #: bytes per block: the fields' sizes (derived, as the bits per weight in ``description``)
    block_bytes: ClassVar[int]

    # -- identity ----------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        return self.ggml_name

    @classmethod
    def from_spec(cls, spec: str) -> Options | None:
        s = spec.strip().upper().replace("-", "_")
        return cls.Options() if s == cls.ggml_name else None

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "ggml_name" in cls.__dict__:
            cls.examples = (cls.ggml_name,)  # shown by `qf formats` with its bits per weight
            cls.block_bytes = sum(count * dtype.itemsize for _, dtype, count in cls.fields)
            cls.description = f"{cls.description} ({8 * cls.block_bytes / cls.block:g} bpw)"

    @classmethod
    def spec_help(cls) -> str:
        return f"{cls.ggml_name} (or {cls.ggml_name.lower()})"

    # -- geometry ----------------------------------------------------------------------------
    def group_size(self, in_features: int) -> int:
        return self.block

    def check_shape(self, shape: tuple[int, int]) -> str | None:
        if shape[1] % self.block:
            return f"{shape[1]} columns are not a multiple of the GGML block size {self.block}"
        return None

    def nbytes(self, shape: tuple[int, int]) -> int:
        """Whole GGML blocks: what the file stores (no fit needed to count them)."""
        return shape[0] * (shape[1] // self.block) * self.block_bytes

    def param_nbytes(self, shape: tuple[int, int]) -> int:
        packed = next(count * dtype.itemsize for name, dtype, count in self.fields if name == "packed")
        return shape[0] * (shape[1] // self.block) * (self.block_bytes - packed)

    # -- numerics ----------------------------------------------------------------------------
    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Params:
        rows, cols = w.shape
        if cols % self.block:
            raise ValueError(f"{self.ggml_name}: {cols} columns are not whole blocks of {self.block}")
        w32 = w.to(torch.float32)
        if importance is not None and self.uses_importance:
            return self._fit_importance(w32, importance.to(w32.device, torch.float32))
        return self._fit_blocks(w32.reshape(rows, cols // self.block, self.block))

    def quantize(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantizedWeight:
        """As llama.cpp writes it: the codes its encoder chose (``_L``) where ``fit`` returns them,
        else the rounding rule's."""
        reason = self.check_shape(tuple(w.shape))
        if reason:
            raise ValueError(f"format {self.spec} cannot store a {tuple(w.shape)} weight: {reason}")
        with phase("encode"):
            raw = native_bytes(self.ggml_name, w, importance if self.uses_importance else None)
            if raw is not None:  # compiled on CPU (qf_gguf.backend): llama.cpp's bytes, written as it does
                return self.from_ggml_bytes(raw, tuple(w.shape), w.dtype)
            w32 = w.detach().to(torch.float32)
            params = self.fit(w32, importance)
            codes = params["_L"] if "_L" in params else self.round(w32, params)
            return QuantizedWeight(self, tuple(w.shape), w.dtype, self.pack(codes), params)

    def _fit_importance(self, w: torch.Tensor, importance: torch.Tensor) -> Params:
        raise NotImplementedError(f"{self.ggml_name} has no importance-weighted encoder")

    def _row_weights(self, w: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
        """``qw * sqrtf(sigma2 + x²)`` per element, ``sigma2 = Σx² / n_per_row`` over the whole row
        (the legacy ``_impl`` encoders), as ``[rows * blocks, 32]``; ``importance`` ``[cols]`` or
        ``[rows, cols]``."""
        rows, cols = w.shape
        sum_x2 = _seq_sum(w * w)
        sigma2 = sum_x2 / _full(sum_x2, float(cols))
        # importance [cols] (one for every row) or [rows, cols]
        return (importance.expand(rows, cols) * _sqrtf(sigma2[:, None] + w * w)).reshape(-1, self.block)

    def round(self, w: torch.Tensor, params: Params, col0: int = 0) -> torch.Tensor:
        per_col = {k: _per_column(v, col0, w.shape[1]) for k, v in params.items()}
        return self._round_columns(w.to(torch.float32), per_col)

    def decode(self, codes: torch.Tensor, params: Params, col0: int = 0) -> torch.Tensor:
        per_col = {k: _per_column(v, col0, codes.shape[1]).float() for k, v in params.items() if not k.startswith("_")}
        return self._decode_columns(codes, per_col)

    #: False for types whose llama.cpp encoder ignores an imatrix (Q8_0)
    uses_importance: ClassVar[bool] = True

    def _fit_blocks(self, b: torch.Tensor) -> Params:
        raise NotImplementedError

    def _round_columns(self, x: torch.Tensor, p: Params) -> torch.Tensor:
        raise NotImplementedError

    def _decode_columns(self, codes: torch.Tensor, p: Params) -> torch.Tensor:
        raise NotImplementedError

    # -- storage: the code bytes of each block, in GGML order ------------------------------------
    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        rows, cols = codes.shape
        return self._code_bytes(codes.reshape(rows, cols // self.block, self.block)).reshape(-1)

    def unpack(self, packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        rows, cols = shape
        k = cols // self.block
        return self._codes_of(packed.reshape(rows, k, -1)).reshape(rows, cols)

    def _code_bytes(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _codes_of(self, raw: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def ggml_bytes(self, qw: QuantizedWeight) -> torch.Tensor:
        """The weight as GGML blocks: ``uint8 [rows, blocks_per_row * block_bytes]``, fields in
        struct order (:attr:`fields`), little-endian."""
        rows, cols = qw.shape
        k = cols // self.block
        parts = []
        for name, dtype, count in self.fields:
            t = qw.packed if name == "packed" else qw.params[name].to(dtype)
            parts.append(t.contiguous().view(torch.uint8).reshape(rows, k, count * dtype.itemsize))
        return torch.cat(parts, dim=-1).reshape(rows, k * self.block_bytes)

    def from_ggml_bytes(self, raw: torch.Tensor, shape: tuple[int, int],
                        dtype: torch.dtype = torch.float16) -> QuantizedWeight:
        """Inverse of :meth:`ggml_bytes` (``raw``: ``uint8`` with ``rows * row_bytes`` elements)."""
        rows, cols = shape
        k = cols // self.block
        blocks = raw.reshape(rows, k, self.block_bytes)
        params: Params = {}
        packed = None
        at = 0
        for name, ftype, count in self.fields:
            n = count * ftype.itemsize
            t = blocks[..., at: at + n].contiguous().view(ftype)
            at += n
            if name == "packed":
                packed = t.reshape(-1)
            else:
                params[name] = t.reshape(rows, k) if count == 1 else t.reshape(rows, k, count)
        if packed is None:  # pragma: no cover - every GGML type has a "packed" field
            raise TypeError(f"{self.ggml_name} has no packed field")
        return QuantizedWeight(self, (rows, cols), dtype, packed, params)


class Q8_0(GGMLFormat):
    name = "q8-0"
    ggml_name = "Q8_0"
    ggml_type = 8
    fields = (("d", torch.float16, 1), ("packed", torch.uint8, 32))
    uses_importance = False  # llama.cpp's Q8_0 encoder ignores an imatrix
    description = "GGML Q8_0: int8 codes, one fp16 scale per 32"

    def code_bits(self) -> int:
        return 8

    def _fit_blocks(self, b: torch.Tensor) -> Params:
        d = b.abs().amax(-1) / torch.tensor(127.0, device=b.device)
        return {"d": _f16(d), "_id": _safe_reciprocal(d)}

    def _round_columns(self, x: torch.Tensor, p: Params) -> torch.Tensor:
        return _roundf(x * p["_id"]).to(torch.int32)

    def _decode_columns(self, codes: torch.Tensor, p: Params) -> torch.Tensor:
        return codes.to(torch.float32) * p["d"]

    def _code_bytes(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.int8).view(torch.uint8)

    def _codes_of(self, raw: torch.Tensor) -> torch.Tensor:
        return raw.contiguous().view(torch.int8).to(torch.int32)


class _SymmetricNibble(GGMLFormat):
    """Q4_0 / Q5_0: ``d = max / -half`` from the first element of largest magnitude."""

    half: ClassVar[int]  # 8 or 16

    def code_bits(self) -> int:
        return 4 if self.half == 8 else 5

    def _fit_blocks(self, b: torch.Tensor) -> Params:
        first = b.abs().argmax(-1, keepdim=True)  # the first maximal |x|, as C's strict '<' scan
        mx = b.gather(-1, first).squeeze(-1)
        d = mx / torch.tensor(-float(self.half), device=b.device)
        return {"d": _f16(d), "_id": _safe_reciprocal(d)}

    def _fit_importance(self, w: torch.Tensor, importance: torch.Tensor) -> Params:
        # quantize_row_q{4,5}_0_impl: weighted make_qx_quants; its codes are stored as they are
        rows, cols = w.shape
        scale, L = make_qx_quants(w.reshape(-1, self.block), self.half, self._row_weights(w, importance))
        scale = scale.reshape(rows, cols // self.block)
        return {"d": _f16(scale), "_id": _safe_reciprocal(scale), "_L": L.reshape(rows, cols)}

    def _round_columns(self, x: torch.Tensor, p: Params) -> torch.Tensor:
        v = x * p["_id"] + torch.tensor(self.half + 0.5, device=x.device)
        return torch.clamp(torch.trunc(v), max=2 * self.half - 1).to(torch.int32)

    def _decode_columns(self, codes: torch.Tensor, p: Params) -> torch.Tensor:
        return (codes - self.half).to(torch.float32) * p["d"]


class _AffineNibble(GGMLFormat):
    """Q4_1 / Q5_1: ``d = (max - min) / levels``, values ``q*d + m``."""

    levels: ClassVar[int]  # 15 or 31

    def code_bits(self) -> int:
        return 4 if self.levels == 15 else 5

    def _fit_blocks(self, b: torch.Tensor) -> Params:
        mn, mx = b.amin(-1), b.amax(-1)
        d = (mx - mn) / torch.tensor(float(self.levels), device=b.device)
        return {"d": _f16(d), "m": _f16(mn), "_id": _safe_reciprocal(d), "_min": mn}

    def _fit_importance(self, w: torch.Tensor, importance: torch.Tensor) -> Params:
        # quantize_row_q{4,5}_1_impl: weighted make_qkx3_quants (as make_qkx2 with rmin -0.9, 36 steps)
        rows, cols = w.shape
        scale, the_min, L = make_qkx2_quants(w.reshape(-1, self.block), self._row_weights(w, importance),
                                             self.levels, -0.9, 0.05, 36)
        scale, mn = scale.reshape(rows, -1), (-the_min).reshape(rows, -1)
        return {"d": _f16(scale), "m": _f16(mn), "_id": _safe_reciprocal(scale), "_min": mn,
                "_L": L.reshape(rows, cols)}

    def _round_columns(self, x: torch.Tensor, p: Params) -> torch.Tensor:
        v = (x - p["_min"]) * p["_id"] + torch.tensor(0.5, device=x.device)
        return torch.clamp(torch.trunc(v), max=self.levels).to(torch.int32)

    def _decode_columns(self, codes: torch.Tensor, p: Params) -> torch.Tensor:
        return codes.to(torch.float32) * p["d"] + p["m"]


class _Nibble4:
    def _code_bytes(self, codes: torch.Tensor) -> torch.Tensor:
        return _nibbles(codes)

    def _codes_of(self, raw: torch.Tensor) -> torch.Tensor:
        return _from_nibbles(raw)


class _Nibble5:
    """``qh`` (4 bytes: the 5th bits) then ``qs`` (16 bytes: the low nibbles)."""

    def _code_bytes(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.cat([_high_bits(codes), _nibbles(codes)], dim=-1)

    def _codes_of(self, raw: torch.Tensor) -> torch.Tensor:
        return _from_nibbles(raw[..., 4:]) | (_from_high_bits(raw[..., :4]) << 4)


class Q4_0(_Nibble4, _SymmetricNibble):
    name = "q4-0"
    ggml_name = "Q4_0"
    ggml_type = 2
    fields = (("d", torch.float16, 1), ("packed", torch.uint8, 16))
    half = 8
    description = "GGML Q4_0: 4-bit codes, one fp16 scale per 32"


class Q5_0(_Nibble5, _SymmetricNibble):
    name = "q5-0"
    ggml_name = "Q5_0"
    ggml_type = 6
    fields = (("d", torch.float16, 1), ("packed", torch.uint8, 20))  # packed = qh[4] then qs[16]
    half = 16
    description = "GGML Q5_0: 5-bit codes, one fp16 scale per 32"


class Q4_1(_Nibble4, _AffineNibble):
    name = "q4-1"
    ggml_name = "Q4_1"
    ggml_type = 3
    fields = (("d", torch.float16, 1), ("m", torch.float16, 1), ("packed", torch.uint8, 16))
    levels = 15
    description = "GGML Q4_1: 4-bit codes, fp16 scale and min per 32"


class Q5_1(_Nibble5, _AffineNibble):
    name = "q5-1"
    ggml_name = "Q5_1"
    ggml_type = 7
    fields = (("d", torch.float16, 1), ("m", torch.float16, 1), ("packed", torch.uint8, 20))
    levels = 31
    description = "GGML Q5_1: 5-bit codes, fp16 scale and min per 32"


LEGACY_FORMATS: tuple[type[GGMLFormat], ...] = (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1)
