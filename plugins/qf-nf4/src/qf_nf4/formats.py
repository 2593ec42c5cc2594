"""bitsandbytes' 4-bit formats ``nf4`` and ``fp4``, bit-exact with ``bitsandbytes.functional.quantize_4bit``.

Layout (bitsandbytes 0.50, its ``default``/CPU kernels): the weight, flattened row-major, is cut
into blocks of ``blocksize`` values (64 by default; a power of two, 64–4096); each block keeps its
absolute maximum as a float32 ``absmax``; every value is scaled into ``[-1, 1]`` as
``clamp(w * (1 / absmax), -1, 1)`` (a float32 reciprocal, then a product; an all-zero block uses
``absmax = 1e-38`` there but stores ``0``) and takes the 4-bit code of the nearest entry of the
16-value table — by ``bucketize`` on the midpoints of the sorted table, so a value exactly on a
midpoint takes the lower entry. Two codes share a byte, the first in the high nibble. A value
decodes to ``table[code] * absmax`` (float32).

Our blocks run along each row (a weight's columns are cut into groups of ``blocksize``), so a
weight fits when its input width is a multiple of ``blocksize``: then the row-major flattening
bitsandbytes uses puts exactly the same values in every block.

The tables are bitsandbytes' ``get_4bit_type``: NF4 (QLoRA's normal-float quantiles) in value
order, and FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2) in bit-pattern order, divided by
their largest magnitude.

**Double quantization** (``double_quant``, spec suffix ``-dq``; bitsandbytes'
``compress_statistics=True``): the codes are rounded with the exact absmax as above; then the
absmax vector of the whole weight (row-major, one per block) loses its mean — a per-tensor
float32 ``offset`` — and is cut into chunks of 256 that run across rows, each stored as a float32
``nested_absmax`` (its largest ``|absmax − offset|``) and 256 uint8 codes into bitsandbytes'
signed 8-bit dynamic map (``nested_map``; the code of ``(absmax − offset) / nested_absmax`` by
bitsandbytes' CPU lookup table, :func:`nested_codes`). A block then decodes with
``nested_map[code] · nested_absmax + offset`` as its absmax. ``offset``, ``nested_absmax`` and
``nested_map`` are per-tensor parameters (:meth:`~quantfoundry.Format.fit_tensor`); the map is
stored, as bitsandbytes stores it, so a checkpoint written with another map (older
bitsandbytes' CPU quantizer set its first entry to ``-1.0``) decodes as written. At block size 64
that is 4 + 8/64 + 32/(64·256) ≈ 4.127 bits per weight instead of 4.5 (plus the map: 1 KiB a
tensor).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from quantfoundry import Format, Options, Params

NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
#: FP4 e2m1 (bias 2), bit-pattern order: 0b000..0b111 positive, then the same negative
FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
TABLES = {"nf4": NF4_TABLE, "fp4": FP4_RAW}
TINY = 1e-38  # bitsandbytes' floor of the absmax it divides by
NESTED_BLOCK = 256  # absmax values per chunk of the double quantization


@functools.cache
def _dynamic_map_cpu() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map(signed=True)``: 7 exponent
    levels 10^-6 … 10^0, each with 2^i linearly spaced fractions on either sign, plus 0 and 1),
    exactly as bitsandbytes builds it (float32 ``linspace``, midpoints, scaled)."""
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 float32 values of the double quantization's 8-bit codes (a fresh copy)."""
    return _dynamic_map_cpu().to(device, copy=True)


LUT_SIZE = 65536  # bitsandbytes' CPU quantizer: [-1, 1] in 65,536 steps, each mapped to a code


@functools.cache
def _lut(dmap_key: tuple[float, ...]) -> torch.Tensor:
    """bitsandbytes' CPU lookup table (0.50): step ``i`` stands for ``-1 + 2i / 65535`` and
    takes the code of the first map entry whose midpoint with the next entry is not below it."""
    dmap = torch.tensor(dmap_key, dtype=torch.float32)
    mid = 0.5 * (dmap[:-1] + dmap[1:])
    steps = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32)) / float(LUT_SIZE - 1)
    return torch.searchsorted(mid, steps).to(torch.uint8)  # count of midpoints below the step


def nested_codes(a: torch.Tensor, scale: torch.Tensor, dmap: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU ``quantize_blockwise`` (0.50) for values ``a`` with their chunk's
    ``scale`` onto the sorted map ``dmap``: ``v = a · (1 / scale)`` (float32), clamped to [-1, 1],
    to step ``trunc((v + 1) · 0.5 · 65535 + 0.5)`` of a 65,536-step lookup table (so a value
    within about 1.5e-5 of a midpoint between two entries may take either: bitsandbytes' rule,
    not nearest); a chunk whose scale is 0 stores code 0."""
    lut = _lut(tuple(dmap.cpu().tolist()))
    if lut.device != a.device:
        lut = lut.to(a.device)
    v = torch.clamp(a * (1.0 / scale), -1.0, 1.0)
    step = ((v + 1.0) * 0.5 * float(LUT_SIZE - 1) + 0.5).to(torch.int64)  # truncation, as the C cast
    return torch.where(scale == 0, torch.zeros_like(step, dtype=torch.uint8), lut[step.clamp(0, LUT_SIZE - 1)])


def code_table(kind: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 float32 values a code decodes to (times its block's absmax), in code order."""
    return _table(kind, str(torch.device(device))).clone()


@functools.cache
def _table(kind: str, device: str) -> torch.Tensor:
    """:func:`code_table`, made once per device (round and decode run once per column under
    GPTQ: a fresh table each time would be a host-to-device copy each time). Read-only."""
    t = torch.tensor(TABLES[kind], dtype=torch.float32)
    return (t / t.abs().max()).to(device)


@functools.cache
def _bounds_on(kind: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    table = _table(kind, "cpu")
    order = torch.argsort(table, stable=True)
    return ((table[order[:-1]] + table[order[1:]]) / 2).to(device), order.to(device)


def _bounds(kind: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints of the sorted table and the code of each sorted entry (bitsandbytes' rounding),
    made once per device. Sorted on the CPU, stably: FP4 holds both 0 and -0, and an unstable
    sort on another device could put -0's code first (a zero would then store code 8 instead of 0)."""
    return _bounds_on(kind, str(torch.device(device)))


@dataclass(frozen=True, kw_only=True)
class BnB4Options(Options):
    blocksize: int = field(default=64, metadata={"help": "values per absmax block: a power of two, 64-4096"})
    double_quant: bool = field(default=False, metadata={
        "help": "store the absmax vector as 8-bit codes in chunks of 256 (bitsandbytes' compress_statistics)"})

    def __post_init__(self) -> None:
        b = self.blocksize
        if b < 64 or b > 4096 or b & (b - 1):
            raise ValueError(f"blocksize must be a power of two from 64 to 4096, got {b}")


class BnB4Format(Format):
    """Base of ``nf4`` and ``fp4`` (the subclass names its table)."""

    Options = BnB4Options
    kind: ClassVar[str]

    options: BnB4Options

    @property
    def spec(self) -> str:
        b = self.options.blocksize
        return self.name + ("" if b == 64 else f"-b{b}") + ("-dq" if self.options.double_quant else "")

    @classmethod
    def from_spec(cls, spec: str) -> BnB4Options | None:
        m = re.fullmatch(re.escape(cls.name) + r"(?:-b(\d+))?(-dq)?", spec.strip().lower())
        if m is None:
            return None
        return BnB4Options(blocksize=int(m.group(1) or 64), double_quant=m.group(2) is not None)

    @classmethod
    def spec_help(cls) -> str:
        return (f"{cls.name}[-b<blocksize>][-dq] (bitsandbytes; blocksize 64-4096, default 64; -dq: double "
                f"quantization), e.g. {cls.name}, {cls.name}-b128, {cls.name}-dq")

    def group_size(self, in_features: int) -> int:
        return self.options.blocksize

    def code_bits(self) -> int:
        return 4

    # -- numerics --------------------------------------------------------------------------
    def _absmax(self, w: torch.Tensor) -> torch.Tensor:
        rows, cols = w.shape
        b = self.options.blocksize
        return w.float().reshape(rows, cols // b, b).abs().amax(-1)

    def fit_tensor(self, w: torch.Tensor) -> Params:
        if not self.options.double_quant:
            return {}
        absmax = self._absmax(w).reshape(-1)  # row-major: bitsandbytes' block order
        # the mean as bitsandbytes' CPU path sums it, on every device (a CUDA sum rounds differently)
        offset = absmax.mean() if absmax.device.type in ("cpu", "meta") else absmax.cpu().mean().to(absmax.device)
        a = absmax - offset
        pad = (-a.numel()) % NESTED_BLOCK  # the last chunk may be short: zeros never raise a max of |a|
        nested = torch.nn.functional.pad(a, (0, pad)).view(-1, NESTED_BLOCK).abs().amax(-1)
        return {"offset": offset.reshape(1), "nested_absmax": nested, "nested_map": dynamic_map(w.device)}

    def tensor_view(self, tensor_params: Params, shape: tuple[int, int]) -> Params:
        if not tensor_params:
            return {}
        rows, groups = shape[0], shape[1] // self.options.blocksize
        nested = tensor_params["nested_absmax"]
        chunk = torch.arange(rows * groups, device=nested.device) // NESTED_BLOCK
        dmap = tensor_params["nested_map"]
        return {"_nested": nested[chunk].view(rows, groups),
                "_offset": tensor_params["offset"].view(1, 1).expand(rows, groups),
                "_map": dmap.view(1, 1, -1).expand(rows, groups, dmap.numel())}  # no copy per block

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None, view: Params | None = None) -> Params:
        absmax = self._absmax(w)
        if not self.options.double_quant:
            return {"absmax": absmax}
        own = view is None
        if view is None:  # w is the whole weight
            view = self.tensor_view(self.fit_tensor(w), tuple(w.shape))
        codes = nested_codes(absmax - view["_offset"], view["_nested"], view["_map"][0, 0])
        fitted = {"absmax": codes, "_absmax": absmax}  # codes round with the exact absmax, as bitsandbytes
        return {**fitted, **view} if own else fitted

    def block_absmax(self, params: Params) -> torch.Tensor:
        """The absmax every block decodes with ``[rows, n_groups]`` (float32)."""
        if not self.options.double_quant:
            return params["absmax"]
        codes = params["absmax"].long().unsqueeze(-1)
        return torch.gather(params["_map"], 2, codes).squeeze(-1) * params["_nested"] + params["_offset"]

    def scaled_levels(self, params: Params, col0: int, ncols: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.options.double_quant:  # the absmax is itself quantized per tensor: not a free scale
            return None
        return self._per_column(params["absmax"], col0, ncols), code_table(self.kind, params["absmax"].device)

    def params_from_scale(self, s: torch.Tensor, like: Params) -> Params | None:
        if self.options.double_quant:
            return None
        return {"absmax": s.to(torch.float32).reshape(like["absmax"].shape)}

    def _per_column(self, absmax: torch.Tensor, col0: int, ncols: int) -> torch.Tensor:
        idx = torch.arange(col0, col0 + ncols, device=absmax.device) // self.options.blocksize
        return absmax[:, idx]

    def round(self, w: torch.Tensor, params: Params, col0: int = 0) -> torch.Tensor:
        exact = params["_absmax"] if "_absmax" in params else self.block_absmax(params)
        absmax = self._per_column(exact, col0, w.shape[1])
        scaled = torch.clamp(w.float() * (1.0 / absmax.clamp(min=TINY)), -1, 1)
        bounds, order = _bounds(self.kind, w.device)
        q = torch.bucketize(scaled.contiguous(), bounds)
        return order[q].to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: Params, col0: int = 0) -> torch.Tensor:
        absmax = self._per_column(self.block_absmax(params), col0, codes.shape[1])
        return _table(self.kind, str(codes.device))[codes.long()] * absmax

    # -- storage: bitsandbytes' nibble order (first code in the high nibble) ----------------------
    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        flat = codes.reshape(-1).to(torch.uint8)
        if flat.numel() % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        return (flat[0::2] << 4) | flat[1::2]

    def unpack(self, packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        rows, cols = shape
        flat = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[: rows * cols]
        return flat.view(rows, cols)


class NF4Format(BnB4Format):
    name = "nf4"
    description = "QLoRA's 4-bit NormalFloat, bitsandbytes' layout (absmax per block of 64)"
    kind = "nf4"
    examples = ("nf4", "nf4-b128")


class FP4Format(BnB4Format):
    name = "fp4"
    description = "bitsandbytes' 4-bit float (e2m1), absmax per block of 64"
    kind = "fp4"
    examples = ("fp4",)
