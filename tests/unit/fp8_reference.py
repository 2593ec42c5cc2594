"""A float64 oracle of float8 e4m3fn, written from the format's bit fields (not torch's cast):
shared by the activation and fp8-format tests."""

from __future__ import annotations

import numpy as np


def fp8_e4m3_bytes() -> dict[float, int]:
    """Every finite float8 e4m3fn value and its byte, from the bit fields (sign, 4 exponent bits
    with bias 7, 3 mantissa bits; exponent 0 subnormal; 0x7F/0xFF are NaN): the independent
    oracle of the cast (-0 is dropped: it equals +0)."""
    out: dict[float, int] = {}
    for byte in range(256):
        sign = -1.0 if byte & 0x80 else 1.0
        exp, man = (byte >> 3) & 0xF, byte & 0x7
        if exp == 0xF and man == 0x7:
            continue
        out.setdefault(sign * (man / 8 * 2.0 ** -6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7)), byte)
    return out


def fp8_e4m3_values() -> np.ndarray:
    return np.array(sorted(fp8_e4m3_bytes()))


def fp8_round(x: np.ndarray) -> np.ndarray:
    """Nearest e4m3 value, ties to the even mantissa, saturating at ±448 (float64)."""
    grid = fp8_e4m3_values()
    x = np.clip(x, -448.0, 448.0)
    i = np.clip(np.searchsorted(grid, x), 1, len(grid) - 1)
    lo, hi = grid[i - 1], grid[i]
    pick_hi = (hi - x) < (x - lo)
    tie = (hi - x) == (x - lo)
    # the even mantissa: the value whose bit pattern's lowest mantissa bit is 0
    even_hi = np.array([_mantissa_even(v) for v in hi.ravel()]).reshape(hi.shape)
    out = np.where(pick_hi | (tie & even_hi), hi, lo)
    return np.where(np.isin(x, grid), x, out)


def _mantissa_even(v: float) -> bool:
    return fp8_e4m3_bytes()[float(v)] & 1 == 0
