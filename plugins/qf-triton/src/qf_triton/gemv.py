"""The split-K GEMVs of ``triton-w4a16`` for decoding (1–16 rows per call).

All read the weight words of :class:`qf_triton.wa16.Packed` (int32, blocks of ``block`` output
columns, each ``[K / per_word, block]`` and contiguous: a tile's loads run along ``N``) and decode
a step of ``BK`` input columns — inside one group, ``BK / per_word`` rows of words — without an
integer-to-float conversion instruction. The group's scale is factored out of the step's sum —
``Σ x·(q − z)·s = s·Σ x·(q − z)`` — and applied once per step and column, not once per weight.

* ``fma`` (1–4 rows, any input dtype): CUDA cores. ``(q | 0x4B000000)`` read as a float32 is
  ``2^23 + q`` exactly, so ``q − z`` is one subtraction (two for a fractional float16 zero
  point). Each code position ``j`` of a word is shifted out of the whole tile of words at once
  and meets the inputs ``x[:, k0 + i·per_word + j]``; the products accumulate elementwise in a
  ``[BM, BK / per_word, BN]`` float32 tile, reduced over its middle axis once at the end.
* ``dot`` and ``dot_t`` (up to 16 rows of 16-bit inputs, integer zero points): tensor cores,
  one ``tl.dot`` per step on the step's whole ``[BK, BN]`` tile of exact integers ``q − z`` in
  the input's dtype, float32 accumulators; ``dot_t`` swaps the operands (``yᵀ = W·xᵀ``: the
  decoded weight is the first operand, which Hopper's warpgroup MMA reads from registers).
  Where the codes fit a 16-bit float's mantissa (:func:`half_decode`: float16 up to 8 bits,
  bfloat16 up to 4) two codes are decoded per 32-bit instruction: codes ``j`` and
  ``j + 16 / bits`` of a word sit 16 bits apart, so ``(w >> bits·j) & (m | m << 16)`` ORed
  with two copies of ``BASE``'s bits is a pair of 16-bit floats ``BASE + q`` (1024 in float16,
  128 in bfloat16), and one paired subtraction of ``BASE + z`` leaves ``q − z``. The pair
  stays in one register as two neighbouring rows of the tile (the tensor cores' operand
  layout holds rows ``2i, 2i + 1`` together), so the tile's rows run in the order :func:`_order`
  gives and the inputs are loaded in the same order; nothing is shuffled between registers.
  Elsewhere (8-bit codes in bfloat16) the codes decode in float32 as ``fma``'s do and are
  rounded to the input's dtype (exact: integers below 256).

The input dimension is cut into ``split`` slices so that small outputs still fill the GPU; the
slices' float32 partial sums are added in a fixed order by :func:`qf_triton.wa16.reduce_parts`
(deterministic), which adds the bias; without a split the kernel adds it and stores the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class GemvConfig:
    kind: str  # "fma" or "dot"
    bn: int
    bk: int
    split: int
    warps: int
    stages: int


@triton.jit
def _step_consts(z_ptr, g, N, rn, n_ok, BITS: tl.constexpr, SYM: tl.constexpr, INT_ZERO: tl.constexpr):
    """What to subtract from ``2^23 + q`` for ``q − z`` (a scalar or ``[1, BN]``), and the
    fractional part to subtract after it (0 for integer zero points)."""
    if SYM:
        c = tl.full((1, 1), 8388608.0 + (1 << (BITS - 1)), tl.float32)
        f = tl.zeros((1, 1), tl.float32)
    else:
        z = tl.load(z_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if INT_ZERO:
            c = 8388608.0 + z
            f = tl.zeros((1, 1), tl.float32)
        else:
            c = tl.full((1, 1), 8388608.0, tl.float32)
            f = z
    return c, f


@triton.jit
def _tile(M, N, LB, LBK, BM: tl.constexpr, BN: tl.constexpr, RW: tl.constexpr):
    """A program's rows, columns and word rows, their masks, and the offset of word row 0 of
    each column (:class:`qf_triton.wa16.Packed`'s blocks of ``LB`` columns, ``LBK`` words each)."""
    rm = tl.arange(0, BM)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rw = tl.arange(0, RW)
    col = (rn // LB).to(tl.int64) * LBK + rn % LB
    return rm, rn, rw, rm < M, rn < N, col


@triton.jit
def _gemv(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, M, N, stride_xm, k_split, LB, LBK,
          BITS: tl.constexpr, GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
          SYM: tl.constexpr, INT_ZERO: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``fma``: a ``[BM, BK / per_word, BN]`` float32 product tile on CUDA cores, reduced once at
    the end."""
    pid_k = tl.program_id(1)
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    RW: tl.constexpr = BK // PER
    rm, rn, rw, m_ok, n_ok, col = _tile(M, N, LB, LBK, BM, BN, RW)
    acc = tl.zeros((BM, RW, BN), dtype=tl.float32)
    k0 = pid_k * k_split
    for kk in range(k0, k0 + k_split, BK):
        words = tl.load(w_ptr + col[None, :] + (kk // PER + rw)[:, None] * LB, mask=n_ok[None, :], other=0)
        g = kk // GROUP
        s = tl.load(s_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)
        c, f = _step_consts(z_ptr, g, N, rn, n_ok, BITS, SYM, INT_ZERO)
        t = tl.zeros((BM, RW, BN), dtype=tl.float32)
        for j in tl.static_range(PER):
            v = (((words >> (j * BITS)) & MASK) | 0x4B000000).to(tl.float32, bitcast=True)
            qz = v - c
            if not INT_ZERO:
                qz = qz - f
            xj = tl.load(x_ptr + rm[:, None] * stride_xm + (kk + rw * PER + j)[None, :], mask=m_ok[:, None],
                         other=0.0)
            t += xj.to(tl.float32)[:, :, None] * qz[None, :, :]
        acc += t * s[None, None, :]
    _finish(tl.sum(acc, axis=1), b_ptr, y_ptr, part_ptr, pid_k, rm, rn, m_ok, n_ok, M, N, SPLIT, HAS_BIAS)


@triton.jit
def _finish(out, b_ptr, y_ptr, part_ptr, pid_k, rm, rn, m_ok, n_ok, M, N, SPLIT: tl.constexpr,
            HAS_BIAS: tl.constexpr):
    """Store a program's ``[BM, BN]`` float32 sums: its slice's partial sums, or (no split) with
    the bias in the output's dtype."""
    omask = m_ok[:, None] & n_ok[None, :]
    if SPLIT:
        tl.store(part_ptr + pid_k.to(tl.int64) * M * N + rm[:, None] * N + rn[None, :], out, mask=omask)
    else:
        if HAS_BIAS:
            out += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], out.to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _order(BK: tl.constexpr, BITS: tl.constexpr, PAIRS: tl.constexpr):
    """The input column (within the step) of each row of :func:`_codes`'s tile: with ``PAIRS``
    row ``i`` holds code ``j + (16 / bits)·h`` of word row ``r`` (``j = i // (2·RW)``, ``r =
    (i // 2) % RW``, ``h = i % 2``); else code ``i // RW`` of word row ``i % RW``."""
    PER: tl.constexpr = 32 // BITS
    RW: tl.constexpr = BK // PER
    i = tl.arange(0, BK)
    if PAIRS:
        return ((i // 2) % RW) * PER + i // (2 * RW) + (16 // BITS) * (i % 2)
    return (i % RW) * PER + i // RW


@triton.jit
def _codes(words, z_ptr, g, N, rn, n_ok, BITS: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
           SYM: tl.constexpr, PAIRS: tl.constexpr, MAGIC: tl.constexpr, BASE: tl.constexpr, XT: tl.constexpr,
           WIDEN: tl.constexpr):
    """A step's ``[BK, BN]`` tile of ``q − z`` in the input's dtype ``XT``, rows in
    :func:`_order`'s order, from its ``[BK / per_word, BN]`` words."""
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    w = words.to(tl.uint32, bitcast=True)  # logical shifts
    if SYM:
        z = tl.full((BN,), 1 << (BITS - 1), tl.float32)
    else:
        z = tl.load(z_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)
    if PAIRS:
        # each half of t: BASE's bits + 2^bits + q − z, in [BASE + 1, 2·BASE): the float
        # BASE + 2^bits + (q − z) exactly; one constant (no per-column value) is then subtracted
        HP: tl.constexpr = 16 // BITS
        OFF: tl.constexpr = 1 << BITS
        sh = tl.arange(0, HP) * BITS
        c = ((MAGIC + OFF) - z.to(tl.uint32)) * 65537  # that half in both halves of a word
        t = ((w[None, :, :] >> sh[:, None, None]) & (MASK | (MASK << 16))) + c[None, None, :]
        if WIDEN and XT == tl.bfloat16:
            # Triton's interpreter neither bitcasts to nor subtracts bfloat16: the same bits
            # (a bfloat16 is a float32's top half) and the same exact difference in float32
            lo = (t << 16).to(tl.float32, bitcast=True)
            hi = (t & 0xFFFF0000).to(tl.float32, bitcast=True)
        else:
            lo = t.to(tl.int16).to(XT, bitcast=True)
            hi = (t >> 16).to(tl.int16).to(XT, bitcast=True)
        pair = tl.permute(tl.join(lo, hi), (0, 1, 3, 2))  # [16 / bits, RW, 2, BN]
        return (tl.reshape(pair, (BK, BN)) - (BASE + OFF)).to(XT)
    sh = tl.arange(0, PER) * BITS
    v = (((w[None, :, :] >> sh[:, None, None]) & MASK) | 0x4B000000).to(tl.float32, bitcast=True)
    return tl.reshape(v - (8388608.0 + z)[None, None, :], (BK, BN)).to(XT)


@triton.jit
def _gemv_dot(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, M, N, stride_xm, k_split, LB, LBK,
              BITS: tl.constexpr, GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              SYM: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, SWAP: tl.constexpr,
              PAIRS: tl.constexpr, MAGIC: tl.constexpr, BASE: tl.constexpr, WIDEN: tl.constexpr):
    """``dot`` (``x · Qᵀ``) and ``dot_t`` (``SWAP``: ``(Q · xᵀ)ᵀ``), one ``tl.dot`` per step."""
    pid_k = tl.program_id(1)
    PER: tl.constexpr = 32 // BITS
    RW: tl.constexpr = BK // PER
    XT: tl.constexpr = x_ptr.dtype.element_ty
    rm, rn, rw, m_ok, n_ok, col = _tile(M, N, LB, LBK, BM, BN, RW)
    xo = _order(BK, BITS, PAIRS)
    if SWAP:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    k0 = pid_k * k_split
    for kk in range(k0, k0 + k_split, BK):
        words = tl.load(w_ptr + col[None, :] + (kk // PER + rw)[:, None] * LB, mask=n_ok[None, :], other=0)
        g = kk // GROUP
        s = tl.load(s_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)
        qz = _codes(words, z_ptr, g, N, rn, n_ok, BITS, BK, BN, SYM, PAIRS, MAGIC, BASE, XT, WIDEN)
        if SWAP:
            xt = tl.load(x_ptr + rm[None, :] * stride_xm + (kk + xo)[:, None], mask=m_ok[None, :], other=0.0)
            if WIDEN:  # Triton's interpreter multiplies no 16-bit floats: the same products in float32
                t = tl.dot(tl.trans(qz).to(tl.float32), xt.to(tl.float32), input_precision="ieee")
            else:
                t = tl.dot(tl.trans(qz), xt)
            acc += t * s[:, None]
        else:
            x = tl.load(x_ptr + rm[:, None] * stride_xm + (kk + xo)[None, :], mask=m_ok[:, None], other=0.0)
            if WIDEN:
                t = tl.dot(x.to(tl.float32), qz.to(tl.float32), input_precision="ieee")
            else:
                t = tl.dot(x, qz)
            acc += t * s[None, :]
    if SWAP:
        acc = tl.trans(acc)
    _finish(acc, b_ptr, y_ptr, part_ptr, pid_k, rm, rn, m_ok, n_ok, M, N, SPLIT, HAS_BIAS)


def half_decode(dtype: torch.dtype, bits: int) -> tuple[int, float] | None:
    """The bits and value of ``BASE`` where the tensor-core GEMVs decode code pairs straight
    into the 16-bit input dtype — float16 (1024: codes up to 8 bits; 16 / bits whole codes per
    half word) and bfloat16 (128: up to 4 bits) — else None (float32 decode)."""
    if 16 % bits:
        return None
    if dtype == torch.float16:
        return 0x6400, 1024.0
    if dtype == torch.bfloat16 and bits <= 4:
        return 0x4300, 128.0
    return None


def rows_tile(kind: str, m: int) -> int:
    """The row tile of a call with ``m`` rows: the next power of two (``fma``; at least 1) or 16
    (``dot``: a tensor-core tile)."""
    return 16 if kind.startswith("dot") else 1 << max(0, (m - 1).bit_length())


def gemv(x: torch.Tensor, p, bias: torch.Tensor | None, cfg: GemvConfig, *, interpreting: bool = False,
         pairs: bool = True) -> torch.Tensor:
    """``x`` ``[M, K]`` (contiguous rows, M ≤ 16; ≤ 4 for ``fma``) times the packed weight
    (``pairs=False``: the tensor-core GEMVs decode in float32 even where :func:`half_decode`
    allows code pairs — for benchmarks)."""
    from .wa16 import reduce_parts

    m = x.shape[0]
    y = torch.empty(m, p.n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    split = cfg.split
    parts = split > 1 or interpreting  # the interpreter rounds only in the reduction (see wa16)
    part = torch.empty(split, m, p.n, dtype=torch.float32, device=x.device) if parts else y
    grid = (triton.cdiv(p.n, cfg.bn), split)
    common = dict(BITS=p.bits, GROUP=p.group, BM=rows_tile(cfg.kind, m), BN=cfg.bn, BK=cfg.bk, SYM=p.sym,
                  SPLIT=parts, HAS_BIAS=bias is not None and not parts, num_warps=cfg.warps, num_stages=cfg.stages)
    args = (x, p.words, p.scale, p.zero, y if bias is None else bias, y, part, m, p.n, x.stride(0), p.k // split,
            p.block, p.block * (p.k * p.bits // 32))
    if cfg.kind == "fma":
        _gemv[grid](*args, INT_ZERO=p.int_zero, **common)
    else:
        if not p.int_zero or x.dtype == torch.float32:
            raise ValueError(f"the {cfg.kind} GEMV needs integer zero points and 16-bit inputs")
        decode = half_decode(x.dtype, p.bits) if pairs else None
        _gemv_dot[grid](*args, SWAP=cfg.kind == "dot_t", PAIRS=decode is not None, MAGIC=decode[0] if decode else 0,
                        BASE=decode[1] if decode else 0.0, WIDEN=interpreting, **common)
    if parts:
        reduce_parts(part, y, bias, split, interpreting=interpreting)
    return y
