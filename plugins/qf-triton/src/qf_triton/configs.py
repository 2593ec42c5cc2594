"""Tile shapes of ``triton-w4a16`` per shape class, chosen without tuning at run time.

Rows up to 16 run as a split-K GEMV on a 16-row tensor-core tile: the input dimension is cut
into ``SPLIT_K`` slices so that the launch has about two programs per SM even when the output
has few tiles (a 4096-wide output in 64-column tiles is 64 programs; an H100 has 132 SMs).
Larger batches run as a tiled GEMM.
"""

from __future__ import annotations

import math

from .wa16 import Config


def _split(tiles: int, k: int, bk: int, sms: int) -> int:
    """The largest power-of-two split (≤ 16) whose slices are whole ``bk`` steps and that keeps
    the launch within about two programs per SM."""
    split = 1
    while split < 16 and tiles * split * 2 <= 2 * sms and k % (split * 2 * bk) == 0:
        split *= 2
    return split


def pick(m: int, n: int, k: int, group: int, sms: int) -> Config:
    """``k`` and ``group`` are multiples of 16; a step of ``bk`` rows stays inside one group."""
    common = math.gcd(k, group)
    bk = min(128 if m <= 16 else 64, common & -common)  # the largest power of two dividing both
    if m <= 16:
        bm, bn, warps, stages = 16, 64, 4, 4
    elif m <= 64:
        bm, bn, warps, stages = 32 if m <= 32 else 64, 64, 4, 4
    else:
        bm, bn, warps, stages = 64, 128, 4, 3
    tiles = -(-m // bm) * -(-n // bn)
    return Config(bm, bn, bk, _split(tiles, k, bk, sms), warps, stages)
