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
"""

from __future__ import annotations

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


def code_table(kind: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 float32 values a code decodes to (times its block's absmax), in code order."""
    t = torch.tensor(TABLES[kind], dtype=torch.float32, device=device)
    return t / t.abs().max()


def _bounds(kind: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints of the sorted table and the code of each sorted entry (bitsandbytes' rounding).
    Sorted on the CPU, stably: FP4 holds both 0 and -0, and an unstable sort on another device
    could put -0's code first (a zero would then store code 8 instead of 0)."""
    table = code_table(kind)
    order = torch.argsort(table, stable=True)
    return ((table[order[:-1]] + table[order[1:]]) / 2).to(device), order.to(device)


@dataclass(frozen=True, kw_only=True)
class BnB4Options(Options):
    blocksize: int = field(default=64, metadata={"help": "values per absmax block: a power of two, 64-4096"})

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
        return self.name if b == 64 else f"{self.name}-b{b}"

    @classmethod
    def from_spec(cls, spec: str) -> BnB4Options | None:
        m = re.fullmatch(re.escape(cls.name) + r"(?:-b(\d+))?", spec.strip().lower())
        if m is None:
            return None
        return BnB4Options(blocksize=int(m.group(1) or 64))

    @classmethod
    def spec_help(cls) -> str:
        return f"{cls.name}[-b<blocksize>] (bitsandbytes; blocksize 64-4096, default 64), e.g. {cls.name}, {cls.name}-b128"

    def group_size(self, in_features: int) -> int:
        return self.options.blocksize

    def code_bits(self) -> int:
        return 4

    # -- numerics --------------------------------------------------------------------------
    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Params:
        rows, cols = w.shape
        b = self.options.blocksize
        absmax = w.float().reshape(rows, cols // b, b).abs().amax(-1)
        return {"absmax": absmax}

    def _per_column(self, absmax: torch.Tensor, col0: int, ncols: int) -> torch.Tensor:
        idx = torch.arange(col0, col0 + ncols, device=absmax.device) // self.options.blocksize
        return absmax[:, idx]

    def round(self, w: torch.Tensor, params: Params, col0: int = 0) -> torch.Tensor:
        absmax = self._per_column(params["absmax"], col0, w.shape[1])
        scaled = torch.clamp(w.float() * (1.0 / absmax.clamp(min=TINY)), -1, 1)
        bounds, order = _bounds(self.kind, w.device)
        q = torch.bucketize(scaled.contiguous(), bounds)
        return order[q].to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: Params, col0: int = 0) -> torch.Tensor:
        absmax = self._per_column(params["absmax"], col0, codes.shape[1])
        return code_table(self.kind, codes.device)[codes.long()] * absmax

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
