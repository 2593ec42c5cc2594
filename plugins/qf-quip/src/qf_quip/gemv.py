"""The E8P decode-GEMV in Triton: ``y = (x Ŵᵀ) · scale`` for the stored (Hadamard-side) weight
``Ŵ`` of ``e8p`` / ``e8p-rvq3`` / ``e8p-rvq4`` codes, decoded in registers from a codebook table.

Layout (:func:`repack`, once per weight): the first stage's 16-bit codes as ``int16 [N, K/8]``
(row-major: a row's codes are contiguous, as the weight's rows are), the second stage's as
``uint8`` (rvq3, 8-bit codes of the 1-bit E8 codebook) or ``int16`` (rvq4, E8P again), the scale
per row as float32 ``[N]``.

Decoding (:func:`_points`) a tile of codes ``[BLOCK_N, BLOCK_K/8]`` into points
``[BLOCK_N, BLOCK_K/8, 8]`` in the inputs' 16-bit type (exact: E8P's points are multiples of 1/4
below 4): by default as QuIP#'s CUDA kernel does — the high byte gathers one of 256 sign-adjusted
patterns (16 contiguous bytes: one 128-bit load from a 4 KiB, L1-resident table), the low byte's
bits flip the coordinates' sign bits, its parity picks the ±1/4 shift; or (``full``) one 128-bit
gather of the whole point from the 1 MiB table of all 65,536 points (L2-resident: fewer
instructions, 16 bytes of cache traffic per 2 bytes of codes). The residual stage adds
``second · resid`` in float32.

Each program takes ``BLOCK_N`` rows and a ``1/SPLIT`` share of the input dimension. Up to
:data:`FMA_TOKENS` tokens multiply in float32 on CUDA cores, partial sums kept per code and
reduced over the row once at the end; more (up to 16) on tensor cores, the decoded tile
reshaped into the ``tl.dot`` operand. ``SPLIT > 1`` adds the shares atomically into a float32
output. Tiles and splits per call: :func:`default_config`, from an H100 grid search.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import e8p

#: up to this many tokens the GEMV multiplies in float32 on CUDA cores, one pass over the codes
#: for all of them; more: tensor cores
FMA_TOKENS = 4


@dataclass(frozen=True)
class E8PPacked:
    """A weight repacked for the GEMV (see the module docstring)."""

    first: torch.Tensor            # int16 [N, K/8]
    second: torch.Tensor | None    # uint8 (rvq3) or int16 (rvq4) [N, K/8], or None (e8p)
    scale: torch.Tensor            # float32 [N]
    second_book: str | None        # "e8p" or "e81b": the second stage's codebook
    resid: float
    n: int
    k: int


@dataclass(frozen=True)
class E8PConfig:
    block_n: int
    block_k: int
    split: int
    warps: int = 4
    stages: int = 2
    full: bool = False  # decode by the 65,536-point table instead of the 256 patterns and signs
    fma: bool = True    # up to FMA_TOKENS tokens: float32 products on CUDA cores (else tensor cores)
    #: one token of ``e8p``: the patterns as 8 signed bytes (two 32-bit gathers per code) decoded
    #: on 2-D tiles (:func:`_e8p_gemv_bytes`; 2.5-2.7x slower than the default on the H100:
    #: docs/benchmarks.md)
    bytes: bool = False


@functools.cache
def tables(device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The codebooks ``[entries, 8]`` in ``dtype`` (the inputs' 16-bit type: no conversion per
    weight) on ``device``, made once and shared by every weight."""
    patterns = e8p.signed_patterns().to(dtype).view(torch.int16)  # the 16-bit floats' bits
    doubled = (2 * e8p.signed_patterns()).to(torch.int8).contiguous().view(torch.int32)  # [256, 2]: 4 bytes each
    return {"e8p": e8p.table(device).to(dtype).contiguous(), "e8p_patterns": patterns.to(device).contiguous(),
            "e81b": e8p.e81b_table(device).to(dtype).contiguous(), "e8p_bytes": doubled.to(device).contiguous()}


def repack(first: torch.Tensor, second: torch.Tensor | None, scale: torch.Tensor, second_book: str | None,
           resid: float) -> E8PPacked:
    """``first``/``second``: integer codes ``[N, K/8]`` (second: 0–255 for ``e81b``, 0–65535 for
    ``e8p``); ``scale``: ``[N]`` or ``[N, 1]``."""
    n, k8 = first.shape
    f = first.to(torch.int32)
    f = torch.where(f >= 32768, f - 65536, f).to(torch.int16).contiguous()  # the same 16 bits
    s = None
    if second is not None:
        s2 = second.to(torch.int32)
        s = (s2.to(torch.uint8) if second_book == "e81b"
             else torch.where(s2 >= 32768, s2 - 65536, s2).to(torch.int16)).contiguous()
    return E8PPacked(f, s, scale.reshape(n).to(torch.float32).contiguous(), second_book, float(resid), n, k8 * 8)


@triton.jit
def _points(c, tab_ptr, ee, FULL: tl.constexpr, DT: tl.constexpr):
    """The E8P points ``[BLOCK_N, BLOCK_K/8, 8]`` (in ``DT``, exact) of the codes ``c`` (int32,
    0-65535): looked up whole (``FULL``: the 65,536-point table, 16 bytes per code from L2), or
    built from the 256 sign-adjusted patterns ``b`` (their ``DT`` bits, int16; 4 KiB, L1-resident):
    the sign bits' parity ``p`` picks the shift ``±1/4`` and corrects bit 0; coordinate ``i`` is
    negated (its sign bit flipped) where bit ``7 − π(i)`` is set, ``π`` swapping coordinates 1, 2
    and 5, 6 (see :mod:`qf_quip.e8p`). (A 256-entry table of the ±1 signs, one multiply per
    weight, measured slower on the H100 than these integer operations: a second gather per code.)"""
    if FULL:
        return tl.load(tab_ptr + (c * 8)[:, :, None] + ee[None, None, :])
    sb = c & 255
    p = sb ^ (sb >> 4)
    p = p ^ (p >> 2)
    p = (p ^ (p >> 1)) & 1
    sg = sb ^ p
    r = ee % 4
    bitpos = 7 - (ee + (r == 1).to(tl.int32) - (r == 2).to(tl.int32))
    flip = ((sg[:, :, None] >> bitpos[None, None, :]) & 1) << 15
    bits = tl.load(tab_ptr + ((c >> 8) * 8)[:, :, None] + ee[None, None, :]).to(tl.int32)
    w = (bits ^ flip).to(tl.int16).to(DT, bitcast=True)
    return w + (0.25 - 0.5 * p.to(tl.float32)).to(DT)[:, :, None]


@triton.jit
def _tile(N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A program's rows (and which exist), its share of the input dimension, the codes per row and
    the code offsets of a step."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, rows < N, tl.program_id(1), K // 8, tl.arange(0, BLOCK_K // 8)


@triton.jit
def _e8p_gemv(x_ptr, first_ptr, second_ptr, t1_ptr, t2_ptr, scale_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
              resid, SPLIT, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr, SECOND: tl.constexpr,
              DOT: tl.constexpr, BLOCK_M: tl.constexpr, IEEE: tl.constexpr, FULL: tl.constexpr,
              DT: tl.constexpr, FMA_M: tl.constexpr):
    rows, row_ok, pid_k, k8, jj = _tile(N, K, BLOCK_N, BLOCK_K)
    ee = tl.arange(0, 8)
    cols = tl.arange(0, BLOCK_K)
    tok = tl.arange(0, BLOCK_M)
    if DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:  # per token (up to 4), partial sums per code, reduced once at the end
        acc0 = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
    steps = tl.cdiv(K, BLOCK_K * SPLIT)
    for i in range(0, steps):
        k0 = (pid_k * steps + i) * BLOCK_K
        code_ok = row_ok[:, None] & ((k0 // 8 + jj) < k8)[None, :]
        cptr = rows[:, None] * k8 + (k0 // 8 + jj)[None, :]
        c1 = tl.load(first_ptr + cptr, mask=code_ok, other=0).to(tl.int32) & 0xFFFF
        w = _points(c1, t1_ptr, ee, FULL, DT)  # [BLOCK_N, BLOCK_K/8, 8]
        if SECOND == 1:  # the 1-bit E8 codebook: 256 points, looked up
            c2 = tl.load(second_ptr + cptr, mask=code_ok, other=0).to(tl.int32) & 0xFF
            w = w.to(tl.float32) + tl.load(t2_ptr + (c2 * 8)[:, :, None] + ee[None, None, :]).to(tl.float32) * resid
        elif SECOND == 2:  # E8P again
            c2 = tl.load(second_ptr + cptr, mask=code_ok, other=0).to(tl.int32) & 0xFFFF
            w = w.to(tl.float32) + _points(c2, t1_ptr, ee, FULL, DT).to(tl.float32) * resid
        if DOT:
            w2 = tl.reshape(w, (BLOCK_N, BLOCK_K))
            col_ok = (k0 + cols) < K
            xt = tl.load(x_ptr + tok[None, :] * stride_xm + (k0 + cols)[:, None],
                         mask=col_ok[:, None] & (tok < M)[None, :], other=0.0)  # [BLOCK_K, BLOCK_M]
            if IEEE:  # float32 inputs; and Triton's interpreter, which multiplies no 16-bit floats
                acc += tl.dot(w2.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(w2.to(xt.dtype), xt)
        else:
            xcol = k0 + jj[:, None] * 8 + ee[None, :]  # [BLOCK_K/8, 8]
            xok = xcol < K
            wf = w.to(tl.float32)
            acc0 += tl.sum(wf * tl.load(x_ptr + xcol, mask=xok, other=0.0).to(tl.float32)[None, :, :], axis=2)
            if FMA_M > 1:
                acc1 += tl.sum(wf * tl.load(x_ptr + stride_xm + xcol, mask=xok, other=0.0).to(tl.float32)[None, :, :],
                               axis=2)
            if FMA_M > 2:
                acc2 += tl.sum(wf * tl.load(x_ptr + 2 * stride_xm + xcol, mask=xok, other=0.0).to(tl.float32)[None, :, :],
                               axis=2)
            if FMA_M > 3:
                acc3 += tl.sum(wf * tl.load(x_ptr + 3 * stride_xm + xcol, mask=xok, other=0.0).to(tl.float32)[None, :, :],
                               axis=2)
    s = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    if DOT:
        out = acc * s[:, None]
        optr = y_ptr + tok[None, :] * stride_ym + rows[:, None]
        omask = row_ok[:, None] & (tok < M)[None, :]
        if not ATOMIC:
            tl.store(optr, out.to(y_ptr.dtype.element_ty), mask=omask)
        else:
            tl.atomic_add(optr, out, mask=omask)
    else:
        _put(tl.sum(acc0, axis=1) * s, y_ptr, rows, row_ok, ATOMIC)
        if FMA_M > 1:
            _put(tl.sum(acc1, axis=1) * s, y_ptr + stride_ym, rows, row_ok, ATOMIC)
        if FMA_M > 2:
            _put(tl.sum(acc2, axis=1) * s, y_ptr + 2 * stride_ym, rows, row_ok, ATOMIC)
        if FMA_M > 3:
            _put(tl.sum(acc3, axis=1) * s, y_ptr + 3 * stride_ym, rows, row_ok, ATOMIC)


@triton.jit
def _put(out, y_ptr, rows, row_ok, ATOMIC: tl.constexpr):
    if not ATOMIC:
        tl.store(y_ptr + rows, out.to(y_ptr.dtype.element_ty), mask=row_ok)
    else:
        tl.atomic_add(y_ptr + rows, out, mask=row_ok)


@triton.jit
def _e8p_gemv_bytes(x_ptr, codes_ptr, tab_ptr, scale_ptr, y_ptr, N, K, SPLIT, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr):
    """One token of 2-bit ``e8p`` on 2-D tiles of codes ``[BLOCK_N, BLOCK_K/8]`` only: a pattern is
    8 signed bytes (twice its coordinates: odd integers up to ±7) in two 32-bit words, gathered
    once per code; coordinate ``e`` is its byte ``e`` sign-extended, negated where sign bit
    ``7 − π(e)`` is set, times input column ``e`` of the code (loaded once per step for all rows);
    the ±1/4 shift once per code against the input's 8-sum; the factor 1/2 once per row."""
    rows, row_ok, pid_k, k8, jj = _tile(N, K, BLOCK_N, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
    steps = tl.cdiv(K, BLOCK_K * SPLIT)
    for i in range(0, steps):
        k0 = (pid_k * steps + i) * BLOCK_K
        col_ok = (k0 // 8 + jj) < k8
        c = tl.load(codes_ptr + rows[:, None] * k8 + (k0 // 8 + jj)[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0).to(tl.int32) & 0xFFFF
        sb = c & 255
        p = sb ^ (sb >> 4)
        p = p ^ (p >> 2)
        p = (p ^ (p >> 1)) & 1
        sg = sb ^ p
        lo = tl.load(tab_ptr + (c >> 8) * 2)
        hi = tl.load(tab_ptr + (c >> 8) * 2 + 1)
        xs = tl.zeros((BLOCK_K // 8,), dtype=tl.float32)
        for e in tl.static_range(8):
            word = lo if e < 4 else hi
            b = (word << (24 - 8 * (e % 4))) >> 24  # byte e % 4, sign-extended
            bit = 7 - (e + (1 if e % 4 == 1 else 0) - (1 if e % 4 == 2 else 0))  # 7 − π(e)
            v = b * (1 - 2 * ((sg >> bit) & 1))
            xe = tl.load(x_ptr + k0 + jj * 8 + e, mask=col_ok, other=0.0).to(tl.float32)
            xs += xe
            acc += v.to(tl.float32) * xe[None, :]
        acc += (0.5 - p.to(tl.float32)) * xs[None, :]  # twice the ±1/4 shift
    out = 0.5 * tl.sum(acc, axis=1) * tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    _put(out, y_ptr, rows, row_ok, ATOMIC)


def gemv(x: torch.Tensor, p: E8PPacked, cfg: E8PConfig, *, interpreting: bool = False) -> torch.Tensor:
    """``x [M, K] → [M, N]`` in ``x``'s dtype (``M`` ≤ 16; one token runs the float32 product
    path, more the tensor-core one — float32 inputs at full precision)."""
    m = x.shape[0]
    if m > 16:
        raise ValueError(f"the E8P GEMV takes up to 16 rows, got {m}")
    dot = m > FMA_TOKENS or not cfg.fma
    y = (torch.zeros if cfg.split > 1 else torch.empty)(
        (m, p.n), device=x.device, dtype=torch.float32 if cfg.split > 1 else x.dtype)
    second = {None: 0, "e81b": 1, "e8p": 2}[p.second_book]
    # points in the inputs' 16-bit type (float16 for float32 inputs, and in Triton's interpreter,
    # which has no bfloat16 bit casts; its products run in float32 anyway)
    dt = torch.float16 if x.dtype == torch.float32 or interpreting else x.dtype
    books = tables(str(x.device), dt)
    grid = (triton.cdiv(p.n, cfg.block_n), cfg.split)
    if cfg.bytes and m == 1 and p.second is None:
        _e8p_gemv_bytes[grid](x, p.first, books["e8p_bytes"], p.scale, y, p.n, p.k, cfg.split, BLOCK_N=cfg.block_n,
                              BLOCK_K=cfg.block_k, ATOMIC=cfg.split > 1, num_warps=cfg.warps, num_stages=cfg.stages)
        return y.to(x.dtype)
    _e8p_gemv[grid](x, p.first, p.first if p.second is None else p.second,
                    books["e8p" if cfg.full else "e8p_patterns"], books["e81b"], p.scale, y, m, p.n, p.k, x.stride(0), y.stride(0),
                    p.resid, cfg.split, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, ATOMIC=cfg.split > 1, SECOND=second, DOT=dot,
                    BLOCK_M=16, IEEE=x.dtype == torch.float32 or interpreting, FULL=cfg.full,
                    DT=tl.float16 if dt == torch.float16 else tl.bfloat16, FMA_M=1 if dot else m,
                    num_warps=cfg.warps, num_stages=cfg.stages)
    return y.to(x.dtype)


def default_config(m: int, n: int, k: int, sms: int) -> E8PConfig:
    """The tiles the H100 grid search (``benchmarks/e8p_speed.py --tune``) found best: up to
    :data:`FMA_TOKENS` tokens 16 rows × 512 columns built from the patterns, more 64 × 128 from the
    full table on tensor cores; the input dimension split so that a program takes at most about
    8 steps and every SM gets two programs or more."""
    block_n, block_k, full = (16, 512, False) if m <= FMA_TOKENS else (64, 128, True)
    programs = triton.cdiv(n, block_n)
    split = 1
    while split < 16 and k % (block_k * split * 2) == 0 and (
            k // (block_k * split) > 8 or programs * split < 2 * sms):
        split *= 2
    return E8PConfig(block_n, block_k, split, full=full)
