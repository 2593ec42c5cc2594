"""The Triton kernels of ``triton-w4a16``: ``y = x · Wᵀ (+ b)`` with ``W = (q − z) · s`` decoded
tile by tile inside the matmul, never written out.

Weight layout (built once by :func:`repack`): codes transposed and packed along the input
dimension into int32 words, word ``(i, n)`` holding codes ``k = per_word·i … per_word·i +
per_word − 1`` of column ``n``, code ``j`` at bits ``BITS·j``; stored in blocks of ``block``
output columns (256 where ``N`` allows), each block ``[K / per_word, block]`` and contiguous, so
a tile's loads run along ``N`` and a program streams through one region of memory; scales
``[K / g, N]`` in their storage dtype and zero points in float16. Each program computes a ``BM × BN`` tile of ``y`` over one ``K / SPLIT_K`` slice:
it loads the ``BK / per_word`` rows of words that hold a step's codes (each word once), shifts
and masks the codes out, decodes them exactly in float32, rounds them to the input's
dtype (as the reference kernel rounds its dequantized weight) and multiplies on tensor cores
with a float32 accumulator. With ``SPLIT_K > 1`` (small batches: more programs than output
tiles) the slices' partial sums go to a float32 buffer and :func:`_reduce` adds them in a
fixed order (deterministic) with the bias.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Packed:
    """A weight repacked for the kernels."""

    words: torch.Tensor  # int32 [N / block, K / per_word, block]: word (i, n) at [n // block, i, n % block]
    scale: torch.Tensor  # [K / g, N], in the format's storage dtype (the kernels widen it to float32)
    zero: torch.Tensor   # float16 [K / g, N] (integer and float16 zero points are exact in it)
    bits: int
    group: int
    n: int
    k: int
    sym: bool = False       # the zero point is 2^(bits - 1) everywhere
    int_zero: bool = True   # every zero point is an integer
    block: int = 0          # output columns per contiguous block of words (0: N, one block)

    def word_matrix(self) -> torch.Tensor:
        """The words as ``[K / per_word, N]`` (word ``(i, n)`` holds codes ``per_word·i …`` of column ``n``)."""
        return self.words.permute(1, 0, 2).reshape(self.words.shape[1], self.n)


def repack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group: int,
           *, int_zero: bool = True) -> Packed:
    """``codes`` ``[N, K]`` (uint8, stored column order), ``scale``/``zero`` ``[N, K / group]``
    (``zero`` None: symmetric, ``2^(bits - 1)``)."""
    n, k = codes.shape
    per = 32 // bits
    c = codes.t().to(torch.int32).reshape(k // per, per, n)
    shifts = (torch.arange(per, device=codes.device, dtype=torch.int32) * bits).view(1, per, 1)
    words = (c << shifts).sum(dim=1, dtype=torch.int64).to(torch.int64)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement
    sym = zero is None
    if sym:
        zero = torch.full_like(scale, float(1 << (bits - 1)), dtype=torch.float16)
    # blocks of output columns, each contiguous over the whole input dimension: a program's
    # loads stream through one region instead of rows N words apart
    block = next((b for b in (256, 128, 64, 32, 16) if n % b == 0), n)
    words = words.view(k // per, n // block, block).permute(1, 0, 2).contiguous()
    return Packed(words, scale.t().contiguous(), zero.t().to(torch.float16).contiguous(), bits, group,
                  n, k, sym=sym, int_zero=int_zero or sym, block=block)


@triton.jit
def _bf16_grid(v):
    """float32 ``v`` rounded to bfloat16's grid, half to even (the interpreter's cast truncates)."""
    b = v.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _wa16(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, M, N, K, stride_xm, stride_ym, k_split, LB, LBK,
          GROUP: tl.constexpr, BITS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
          SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, WIDEN: tl.constexpr, BF16: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rw = tl.arange(0, BK // PER)  # the rows of words that hold a step's BK codes
    shifts = tl.arange(0, PER) * BITS
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    col = (rn // LB).to(tl.int64) * LBK + rn % LB  # word row 0 of each column (Packed.block layout)
    k0 = pid_k * k_split
    for kk in range(0, k_split, BK):
        ks = k0 + kk + rk
        a = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + ks[None, :], mask=m_ok[:, None], other=0.0)
        words = tl.load(w_ptr + col[None, :] + ((k0 + kk) // PER + rw)[:, None] * LB, mask=n_ok[None, :], other=0)
        # each word once: [BK/PER, PER, BN] codes, row i·PER + j is code j of word row i
        q = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & MASK, (BK, BN))
        g = (k0 + kk) // GROUP  # BK divides GROUP: one group per step
        s = tl.load(s_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)
        w = (q.to(tl.float32) - z[None, :]) * s[None, :]
        if WIDEN and BF16:
            w = _bf16_grid(w)
        w = w.to(a.dtype)
        if WIDEN:  # the same products in float32 (Triton's interpreter multiplies no 16-bit floats)
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        elif IEEE:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if WIDEN and BF16:
            acc = _bf16_grid(acc)
        tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])
    else:
        base = part_ptr + pid_k.to(tl.int64) * M * N
        tl.store(base + rm[:, None].to(tl.int64) * N + rn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _reduce(part_ptr, b_ptr, y_ptr, M, N, stride_ym, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
            BLOCK: tl.constexpr, WIDEN: tl.constexpr, BF16: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(SPLIT_K):  # a fixed order: the same sum every call
        acc += tl.load(part_ptr + i * M * N + offs, mask=ok, other=0.0)
    col = offs % N
    if HAS_BIAS:
        acc += tl.load(b_ptr + col, mask=ok, other=0.0).to(tl.float32)
    row = offs // N
    if WIDEN and BF16:
        acc = _bf16_grid(acc)
    tl.store(y_ptr + row.to(tl.int64) * stride_ym + col, acc.to(y_ptr.dtype.element_ty), mask=ok)


@dataclass(frozen=True)
class Config:
    bm: int
    bn: int
    bk: int
    split_k: int
    warps: int
    stages: int


def config(m: int, p: Packed, sms: int, dtype: torch.dtype, device_name: str):
    """The kernel and tile shape for ``m`` rows (:func:`qf_triton.configs.pick`)."""
    from .configs import pick

    return pick(m, p, sms, dtype, device_name)


def reduce_parts(part: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None, split: int, *,
                 interpreting: bool = False) -> None:
    """``y = Σ part[i] (+ bias)`` over the ``split`` float32 partial sums, in a fixed order."""
    m, n = y.shape
    block = 1024
    _reduce[(triton.cdiv(m * n, block),)](part, y if bias is None else bias, y, m, n, y.stride(0), SPLIT_K=split,
                                          HAS_BIAS=bias is not None, BLOCK=block, WIDEN=interpreting,
                                          BF16=y.dtype == torch.bfloat16)


def matmul(x: torch.Tensor, p: Packed, bias: torch.Tensor | None, cfg: Config) -> torch.Tensor:
    """``x`` ``[M, K]`` (contiguous rows) times the packed weight with the tiled kernel:
    ``[M, N]`` in ``x``'s dtype."""
    m = x.shape[0]
    y = torch.empty(m, p.n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    k_split = p.k // cfg.split_k
    part = torch.empty(cfg.split_k, m, p.n, dtype=torch.float32, device=x.device) if cfg.split_k > 1 else y
    grid = (triton.cdiv(m, cfg.bm), triton.cdiv(p.n, cfg.bn), cfg.split_k)
    b = y if bias is None else bias
    _wa16[grid](x, p.words, p.scale, p.zero, b, y, part, m, p.n, p.k, x.stride(0), y.stride(0), k_split,
                p.block, p.block * (p.k * p.bits // 32),
                GROUP=p.group, BITS=p.bits, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, SPLIT_K=cfg.split_k,
                HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, WIDEN=_INTERPRETING, BF16=x.dtype == torch.bfloat16, num_warps=cfg.warps,
                num_stages=cfg.stages)
    if cfg.split_k > 1:
        reduce_parts(part, y, bias, cfg.split_k, interpreting=_INTERPRETING)
    return y


def run(x: torch.Tensor, p: Packed, bias: torch.Tensor | None, cfg) -> torch.Tensor:
    """``x`` times the packed weight with the kernel ``cfg`` names (a :class:`Config`: the tiled
    kernel; a :class:`qf_triton.gemv.GemvConfig`: a GEMV)."""
    if isinstance(cfg, Config):
        return matmul(x, p, bias, cfg)
    from .gemv import gemv

    return gemv(x, p, bias, cfg, interpreting=_INTERPRETING)
