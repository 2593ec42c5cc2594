"""Which ``triton-w4a16`` kernel and tile shape runs a call, chosen without tuning at run time.

* one row of 16-bit inputs on 4-bit codes: the paired-instruction GEMV ``h2``
  (:func:`qf_triton.gemv._gemv_h2`) where ``tuned.json`` measured it faster than ``dot_t`` on
  this device;
* 1–16 rows of 16-bit inputs: a tensor-core GEMV — ``dot_t`` (:func:`qf_triton.gemv._gemv_dot`
  with the decoded weight as the first operand), or ``dot`` where ``tuned.json`` measured it
  faster — when a step of its codes (128 input columns at 4 bits) stays in one group and the
  zero points are integers. On the H200 ``dot_t`` was the faster of the two on every Llama-3
  shape and row count, and the CUDA-core GEMV slower than both
  (``benchmarks/results/cuda/w4a16_tune_h200.json``);
* otherwise 1–4 rows (float32 inputs, small groups, float16 zero points): the CUDA-core GEMV
  (``fma``, :func:`qf_triton.gemv._gemv`);
* the rest: the tiled kernel (:func:`qf_triton.wa16.matmul`), its input dimension split only
  when the output has few tiles.

The GEMVs' tiles come from ``tuned.json`` — measured by ``benchmarks/w4a16_tune.py`` on a
device of that name, per row bucket (the nearest tuned one where the call's was not) and shape
class (output and input features, each "s" under 2048, "m" under 8192, "l" above) — or, on
other devices and shapes, from the defaults below. The split of the input dimension is kept
there as ``waves``, programs per SM, and :func:`split_for` turns it into a split for the
call's shape.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import torch

from .gemv import GemvConfig, h2_serves
from .wa16 import Config, Packed

TUNED = Path(__file__).with_name("tuned.json")


@lru_cache(maxsize=1)
def _tuned() -> dict[str, dict[str, dict]]:
    return json.loads(TUNED.read_text()) if TUNED.exists() else {}


def rows_bucket(m: int) -> int:
    """1, 2, 4, 8 or 16: the tuned row counts a call of ``m`` rows takes its tile from."""
    return min(16, 1 << max(0, (m - 1).bit_length()))


def shape_class(n: int) -> str:
    return "s" if n < 2048 else "m" if n < 8192 else "l"


def _split(tiles: int, steps: int, sms: int, most: int = 16) -> int:
    """The largest power-of-two split (≤ ``most``) of ``steps`` steps of the input dimension
    into whole steps, keeping the launch within about two programs per SM."""
    split = 1
    while split < most and tiles * split * 2 <= 2 * sms and steps % (split * 2) == 0:
        split *= 2
    return split


def split_for(tiles: int, steps: int, waves: float, sms: int) -> int:
    """The power-of-two split (1–16, of ``steps`` steps into whole steps) whose launch of
    ``tiles × split`` programs comes nearest (in ratio) to ``waves`` programs per SM."""
    want = waves * sms / tiles
    best = 1
    for split in (2, 4, 8, 16):
        if steps % split == 0 and abs(math.log(split / want)) < abs(math.log(best / want)):
            best = split
    return best


def _tuned_entry(kind: str, m: int, p: Packed, device_name: str) -> dict | None:
    """The table's tile for ``kind`` at ``m`` rows: the call's exact shape where it was tuned
    (``kind|rows|NxK|bits``), else its shape class; the call's row bucket, else the nearest
    tuned one (larger first)."""
    table = _tuned().get(device_name, {})
    mine = rows_bucket(m)
    order = sorted((1, 2, 4, 8, 16), key=lambda b: (abs(b.bit_length() - mine.bit_length()), b < mine))
    for rest in (f"{p.n}x{p.k}|{p.bits}", f"{shape_class(p.n)}|{shape_class(p.k)}|{p.bits}"):
        if (hit := next((table[k] for b in order if (k := f"{kind}|{b}|{rest}") in table), None)) is not None:
            return hit
    return None


def _entry_split(entry: dict, tiles: int, steps: int, sms: int) -> int:
    """An entry's split: its own (an exact shape's, where it leaves whole steps), else from its
    programs per SM."""
    if "split" in entry and steps % entry["split"] == 0:
        return entry["split"]
    return split_for(tiles, steps, entry.get("waves", 2.0), sms)


def _gemv(kind: str, m: int, p: Packed, sms: int, device_name: str) -> GemvConfig | None:
    per = 32 // p.bits
    if kind in ("dot", "dot_t"):
        bk = 16 * per  # 16 rows of words per step
        if p.group % bk or not p.int_zero:
            return None
        wide = p.n >= 2048
        default = {"bn": 128 if wide else 64, "warps": 8 if wide else 4, "stages": 3, "waves": 2.0}
    else:
        bk = min(128, p.group & -p.group, 16 * per)  # a power of two dividing the group
        if bk < per:
            return None
        default = {"bn": 128, "warps": 4, "stages": 2}
    tuned = _tuned_entry(kind, m, p, device_name)
    cfg = {**default, **(tuned or {})}
    bk = cfg.get("bk", bk)
    if p.group % bk or bk % per or p.k % bk:
        return None
    tiles = -(-p.n // cfg["bn"])
    if "waves" in cfg or "split" in cfg:
        split = _entry_split(cfg, tiles, p.k // bk, sms)
    else:
        split = _split(tiles, p.k // bk, sms)
    return GemvConfig(kind, cfg["bn"], bk, split, cfg["warps"], cfg["stages"])


def _tiled(m: int, n: int, k: int, group: int, sms: int) -> Config:
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
    return Config(bm, bn, bk, _split(tiles, k // bk, sms), warps, stages)


def _h2(p: Packed, dtype: torch.dtype, sms: int, device_name: str) -> GemvConfig | None:
    """The ``h2`` GEMV's tile for one row where it serves the call and ``tuned.json`` measured it
    on this device faster than ``dot_t``."""
    mine, other = _tuned_entry("h2", 1, p, device_name), _tuned_entry("dot_t", 1, p, device_name)
    if mine is None or mine.get("vs_cublas", 0) <= (other or {}).get("vs_cublas", 0):
        return None
    if not h2_serves(1, dtype, p, mine["bn"], mine["bk"]):
        return None
    split = _entry_split(mine, -(-p.n // mine["bn"]), p.k // mine["bk"], sms)
    return GemvConfig("h2", mine["bn"], mine["bk"], split, mine["warps"], mine["stages"], mine.get("chain", 1),
                      mine.get("prefetch", False))


def pick(m: int, p: Packed, sms: int, dtype: torch.dtype, device_name: str) -> Config | GemvConfig:
    cfg = _h2(p, dtype, sms, device_name) if m == 1 else None
    if cfg is None and m <= 16 and dtype != torch.float32:
        # the tensor-core GEMV, weight first unless tuned.json measured the other order faster here
        t, plain = _tuned_entry("dot_t", m, p, device_name), _tuned_entry("dot", m, p, device_name)
        unswapped = plain is not None and plain.get("vs_cublas", 0) > (t or {}).get("vs_cublas", 0)
        cfg = _gemv("dot" if unswapped else "dot_t", m, p, sms, device_name)
    if cfg is None and m <= 4:
        cfg = _gemv("fma", m, p, sms, device_name)
    return cfg if cfg is not None else _tiled(m, p.n, p.k, p.group, sms)
