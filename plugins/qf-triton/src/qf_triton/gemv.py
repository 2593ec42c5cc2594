"""The split-K GEMVs of ``triton-w4a16`` for decoding (1–16 rows per call).

Both read the weight words of :class:`qf_triton.wa16.Packed` (int32, blocks of ``block``
output columns, each ``[K / per_word, block]`` and contiguous: a tile's loads run along ``N``) and decode a step of ``BK`` input columns — inside one group —
without an integer-to-float conversion: ``(q | 0x4B000000)`` read as a float32 is ``2^23 + q``
exactly, so ``q − z = that − (2^23 + z)`` is one subtraction (two for a fractional float16
zero point). The group's scale is factored out of the step's sum — ``Σ x·(q − z)·s =
s·Σ x·(q − z)`` — and applied once per step and column, not once per weight. Word row ``i`` of a
step holds codes ``i·per_word + j``; each code position ``j`` is shifted out of the whole row of
words at once and meets the inputs ``x[:, k0 + i·per_word + j]`` (a strided load), so no
register shuffle rebuilds the codes' order.

* ``fma`` (1–4 rows): CUDA cores. The products accumulate elementwise in a
  ``[BM, BK / per_word, BN]`` float32 tile, reduced over its middle axis once at the end.
* ``dot`` (up to 16 rows): tensor cores, one ``tl.dot`` per code position on the exact
  integers ``q − z`` in the input's dtype (integer zero points: exact in float16 and
  bfloat16 up to 256), float32 accumulators.

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
          SYM: tl.constexpr, INT_ZERO: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
          TC: tl.constexpr, WIDEN: tl.constexpr):
    """``fma`` (``TC`` false: a ``[BM, BK / per_word, BN]`` float32 product tile on CUDA cores,
    reduced once at the end) and ``dot`` (``TC``: tensor cores, ``[BM, BN]``)."""
    pid_k = tl.program_id(1)
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    RW: tl.constexpr = BK // PER
    rm, rn, rw, m_ok, n_ok, col = _tile(M, N, LB, LBK, BM, BN, RW)
    if TC:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, RW, BN), dtype=tl.float32)
    k0 = pid_k * k_split
    for kk in range(k0, k0 + k_split, BK):
        words = tl.load(w_ptr + col[None, :] + (kk // PER + rw)[:, None] * LB, mask=n_ok[None, :], other=0)
        g = kk // GROUP
        s = tl.load(s_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)
        c, f = _step_consts(z_ptr, g, N, rn, n_ok, BITS, SYM, INT_ZERO)
        if TC:
            t = tl.zeros((BM, BN), dtype=tl.float32)
        else:
            t = tl.zeros((BM, RW, BN), dtype=tl.float32)
        for j in tl.static_range(PER):
            v = (((words >> (j * BITS)) & MASK) | 0x4B000000).to(tl.float32, bitcast=True)
            qz = v - c
            if not INT_ZERO:
                qz = qz - f
            xj = tl.load(x_ptr + rm[:, None] * stride_xm + (kk + rw * PER + j)[None, :], mask=m_ok[:, None],
                         other=0.0)
            if not TC:
                t += xj.to(tl.float32)[:, :, None] * qz[None, :, :]
            elif WIDEN:  # Triton's interpreter multiplies no 16-bit floats: the same products in float32
                t = tl.dot(xj.to(tl.float32), qz.to(xj.dtype).to(tl.float32), t, input_precision="ieee")
            else:
                t = tl.dot(xj, qz.to(xj.dtype), t)
        if TC:
            acc += t * s[None, :]
        else:
            acc += t * s[None, None, :]
    if TC:
        out = acc
    else:
        out = tl.sum(acc, axis=1)
    omask = m_ok[:, None] & n_ok[None, :]
    if SPLIT:
        tl.store(part_ptr + pid_k.to(tl.int64) * M * N + rm[:, None] * N + rn[None, :], out, mask=omask)
    else:
        if HAS_BIAS:
            out += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], out.to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _gemv_dot_t(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, M, N, stride_xm, k_split, LB, LBK,
                BITS: tl.constexpr, GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                SYM: tl.constexpr, INT_ZERO: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                WIDEN: tl.constexpr):
    """``dot`` with the operands swapped: ``yᵀ = W·xᵀ``, the decoded weight the tensor
    cores' first operand (``[BN, 16]`` per code position, fed from registers on Hopper) and the
    few input rows the second."""
    pid_k = tl.program_id(1)
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    RW: tl.constexpr = BK // PER
    rm, rn, rw, m_ok, n_ok, col = _tile(M, N, LB, LBK, BM, BN, RW)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    k0 = pid_k * k_split
    for kk in range(k0, k0 + k_split, BK):
        words = tl.load(w_ptr + col[:, None] + (kk // PER + rw)[None, :] * LB, mask=n_ok[:, None], other=0)  # [BN, RW]
        g = kk // GROUP
        s = tl.load(s_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)
        if SYM:
            c = tl.full((1, 1), 8388608.0 + (1 << (BITS - 1)), tl.float32)
        else:
            c = 8388608.0 + tl.load(z_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        t = tl.zeros((BN, BM), dtype=tl.float32)
        for j in tl.static_range(PER):
            v = (((words >> (j * BITS)) & MASK) | 0x4B000000).to(tl.float32, bitcast=True)
            qz = v - c
            xj = tl.load(x_ptr + rm[None, :] * stride_xm + (kk + rw * PER + j)[:, None], mask=m_ok[None, :],
                         other=0.0)  # [RW, BM]
            if WIDEN:
                t = tl.dot(qz.to(xj.dtype).to(tl.float32), xj.to(tl.float32), t, input_precision="ieee")
            else:
                t = tl.dot(qz.to(xj.dtype), xj, t)
        acc += t * s[:, None]
    omask = n_ok[:, None] & m_ok[None, :]
    if SPLIT:
        tl.store(part_ptr + pid_k.to(tl.int64) * M * N + rm[None, :] * N + rn[:, None], acc, mask=omask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + rm[None, :] * N + rn[:, None], acc.to(y_ptr.dtype.element_ty), mask=omask)


def rows_tile(kind: str, m: int) -> int:
    """The row tile of a call with ``m`` rows: the next power of two (``fma``; at least 1) or 16
    (``dot``: a tensor-core tile)."""
    return 16 if kind.startswith("dot") else 1 << max(0, (m - 1).bit_length())


def gemv(x: torch.Tensor, p, bias: torch.Tensor | None, cfg: GemvConfig, *, interpreting: bool = False) -> torch.Tensor:
    """``x`` ``[M, K]`` (contiguous rows, M ≤ 16; ≤ 4 for ``fma``) times the packed weight."""
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
                  INT_ZERO=p.int_zero, SPLIT=parts, HAS_BIAS=bias is not None and not parts,
                  num_warps=cfg.warps, num_stages=cfg.stages)
    args = (x, p.words, p.scale, p.zero, y if bias is None else bias, y, part, m, p.n, x.stride(0), p.k // split,
            p.block, p.block * (p.k * p.bits // 32))
    if cfg.kind == "dot_t":
        _gemv_dot_t[grid](*args, WIDEN=interpreting, **common)
    else:
        _gemv[grid](*args, TC=cfg.kind == "dot", WIDEN=interpreting, **common)
    if parts:
        reduce_parts(part, y, bias, split, interpreting=interpreting)
    return y
