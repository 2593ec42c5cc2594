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
* ``h2`` (one row of 16-bit inputs, 4-bit codes, integer zero points): CUDA cores, two codes
  per paired 16-bit instruction from inline PTX (:func:`_h2_ptx`); a word's products (or a
  chain of two words') are summed in the input's dtype, those sums in float32.
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
  At 4 bits the pair is decoded by a PTX block instead (:data:`_DEC_F16`, :data:`_DEC_BF16`):
  a shift, a ``lop3`` and one paired FMA give ``(q − z)/16`` in float16 (the 16 is folded into
  the scale) or ``q − z`` in bfloat16. Elsewhere (8-bit codes in bfloat16) the codes decode in
  float32 as ``fma``'s do and are rounded to the input's dtype (exact: integers below 256).

The input dimension is cut into ``split`` slices so that small outputs still fill the GPU; the
slices' float32 partial sums are added in a fixed order by :func:`qf_triton.wa16.reduce_parts`
(deterministic), which adds the bias; without a split the kernel adds it and stores the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .wa16 import _bf16_grid, reduce_parts


@dataclass(frozen=True)
class GemvConfig:
    kind: str  # "fma", "h2", "dot" or "dot_t"
    bn: int
    bk: int
    split: int
    warps: int
    stages: int
    chain: int = 1          # h2: words per 16-bit sum (1 or 2)
    prefetch: bool = False  # h2: the next step's words loaded before this step's arithmetic


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


#: one pair of codes of a word into two 16-bit floats for the tensor-core GEMVs: ``$1`` the word,
#: ``$2`` the shift, ``$3`` the mask, ``$4`` the paired multiplier, ``$5`` the paired constant
#: (:func:`_h2_ptx` explains the masks and constants)
def _dec_ptx(magic: int, op: str) -> str:
    return f"""{{
.reg .b32 s, t;
shr.u32 s, $1, $2;
lop3.b32 t, s, $3, {magic:#010x}, 0xEA;
fma.rn.{op} $0, t, $4, $5;
}}"""


_DEC_F16 = tl.constexpr(_dec_ptx(0x64006400, "f16x2"))
_DEC_BF16 = tl.constexpr(_dec_ptx(0x43004300, "bf16x2"))


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
    if PAIRS and BITS == 4 and not WIDEN:
        # pair j (codes j, j + 4) of each word by :data:`_DEC_F16`/:data:`_DEC_BF16`: a shift
        # (shared by pairs 2 and 3 in float16), a lop3 and a paired FMA; float16 gives (q − z)/16
        # (the caller scales by 16), bfloat16 q − z
        j = tl.arange(0, 4)[:, None, None]
        even = j % 2 == 0
        if XT == tl.float16:
            sh = (j // 2) * 8
            m = tl.where(even, 0x000F000F, 0x00F000F0)
            mul = tl.where(even, 0x2C002C00, 0x1C001C00)  # 1/16, 1/256 in both halves
            c = tl.where(even, _half_bits(-(64.0 + z * 0.0625))[None, None, :],
                         _half_bits(-(4.0 + z * 0.0625))[None, None, :])
            t = tl.inline_asm_elementwise(_DEC_F16, "=r,r,r,r,r,r", [w[None, :, :], sh, m, mul, c], dtype=tl.int32,
                                          is_pure=True, pack=1)
        else:
            sh = j * 4
            m = tl.full((4, 1, 1), 0x000F000F, tl.int32)
            mul = tl.full((4, 1, 1), 0x3F803F80, tl.int32)  # 1.0 in both halves
            c = _bf16_bits(-(128.0 + z))[None, None, :]
            t = tl.inline_asm_elementwise(_DEC_BF16, "=r,r,r,r,r,r", [w[None, :, :], sh, m, mul, c], dtype=tl.int32,
                                          is_pure=True, pack=1)
        lo = t.to(tl.int16).to(XT, bitcast=True)
        hi = (t >> 16).to(tl.int16).to(XT, bitcast=True)
        pair = tl.permute(tl.join(lo, hi), (0, 1, 3, 2))  # [4, RW, 2, BN]
        return tl.reshape(pair, (BK, BN))
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
    # pointer tiles built once; a step adds a scalar
    wp = w_ptr + col[None, :] + rw[:, None] * LB
    if SWAP:
        xp = x_ptr + rm[None, :] * stride_xm + xo[:, None]
    else:
        xp = x_ptr + rm[:, None] * stride_xm + xo[None, :]
    for kk in range(k0, k0 + k_split, BK):
        words = tl.load(wp + (kk // PER) * LB, mask=n_ok[None, :], other=0)
        g = kk // GROUP
        s = tl.load(s_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)
        qz = _codes(words, z_ptr, g, N, rn, n_ok, BITS, BK, BN, SYM, PAIRS, MAGIC, BASE, XT, WIDEN)
        if PAIRS and BITS == 4 and not WIDEN and XT == tl.float16:
            s = s * 16.0  # the decode gave (q − z) / 16
        if SWAP:
            xt = tl.load(xp + kk, mask=m_ok[None, :], other=0.0)
            if WIDEN:  # Triton's interpreter multiplies no 16-bit floats: the same products in float32
                t = tl.dot(tl.trans(qz).to(tl.float32), xt.to(tl.float32), input_precision="ieee")
            else:
                t = tl.dot(tl.trans(qz), xt)
            acc += t * s[:, None]
        else:
            x = tl.load(xp + kk, mask=m_ok[:, None], other=0.0)
            if WIDEN:
                t = tl.dot(x.to(tl.float32), qz.to(tl.float32), input_precision="ieee")
            else:
                t = tl.dot(x, qz)
            acc += t * s[None, :]
    if SWAP:
        acc = tl.trans(acc)
    _finish(acc, b_ptr, y_ptr, part_ptr, pid_k, rm, rn, m_ok, n_ok, M, N, SPLIT, HAS_BIAS)


def _h2_ptx(bf16: bool, chain: int) -> str:
    """The PTX of the ``h2`` GEMV for ``chain`` words (1 or 2) of a column — 8 four-bit codes
    each — times their inputs; operands: ``$0`` the float32 result, ``$1..$chain`` the words,
    then 4 input pairs per word (``x_j, x_{j+4}`` of the word's 8 inputs, as two 16-bit floats),
    then the column's constants. Codes ``j`` and ``j + 4`` of a word sit 16 bits apart, so one
    ``lop3`` masks a pair into the mantissas of two 16-bit floats at once:

    * float16: masked into two ``1024`` (codes 1 and 3 unshifted, as ``16·q``); one paired FMA
      gives ``(q − z) / 16`` exactly (constants ``−(64 + z/16)`` and ``−(4 + z/16)``); the 1/16
      keeps the float16 sums within ``4·chain·|x|`` (they overflow only for inputs over
      ``16384 / chain``);
    * bfloat16: each pair shifted down and masked into two ``128`` (``128 + q``), one paired FMA
      with ``−(128 + z)`` gives ``q − z``.

    The products of all ``chain`` words are summed in one pair of 16-bit lanes (paired FMAs),
    whose two halves are added in float32."""
    lines = [".reg .b32 t<4>, sh<3>, a, k0, k1;", ".reg .f32 fl, fh;"]
    x0, consts = 1 + chain, 1 + chain + 4 * chain
    if bf16:
        lines.append("mov.b32 k0, 0x3F803F80;")  # 1.0 in both halves
    else:
        lines += ["mov.b32 k0, 0x2C002C00;", "mov.b32 k1, 0x1C001C00;"]  # 1/16, 1/256
    first = True
    for c in range(chain):
        w = f"${1 + c}"
        if bf16:
            lines += [f"shr.u32 sh{i}, {w}, {4 * (i + 1)};" for i in range(3)]
            srcs = [w, "sh0", "sh1", "sh2"]
            lines += [f"lop3.b32 t{i}, {srcs[i]}, 0x000F000F, 0x43004300, 0xEA;" for i in range(4)]
            lines += [f"fma.rn.bf16x2 t{i}, t{i}, k0, ${consts};" for i in range(4)]
        else:
            lines += [f"lop3.b32 t0, {w}, 0x000F000F, 0x64006400, 0xEA;",
                      f"lop3.b32 t1, {w}, 0x00F000F0, 0x64006400, 0xEA;",
                      f"shr.u32 sh0, {w}, 8;",
                      "lop3.b32 t2, sh0, 0x000F000F, 0x64006400, 0xEA;",
                      "lop3.b32 t3, sh0, 0x00F000F0, 0x64006400, 0xEA;"]
            lines += [f"fma.rn.f16x2 t{i}, t{i}, k{i % 2}, ${consts + i % 2};" for i in range(4)]
        op = "bf16x2" if bf16 else "f16x2"
        for i in range(4):
            xi = f"${x0 + 4 * c + i}"
            lines.append(f"mul.rn.{op} a, t{i}, {xi};" if first else f"fma.rn.{op} a, t{i}, {xi}, a;")
            first = False
    if bf16:  # a bfloat16 is the top half of a float32
        lines += ["shl.b32 sh0, a, 16;", "and.b32 sh1, a, 0xFFFF0000;", "mov.b32 fl, sh0;", "mov.b32 fh, sh1;"]
    else:
        lines += ["{ .reg .f16 l, h; mov.b32 {l, h}, a; cvt.f32.f16 fl, l; cvt.f32.f16 fh, h; }"]
    lines.append("add.f32 $0, fl, fh;")
    return "{\n" + "\n".join(lines) + "\n}"


_H2_F16_1 = tl.constexpr(_h2_ptx(False, 1))
_H2_F16_2 = tl.constexpr(_h2_ptx(False, 2))
_H2_BF16_1 = tl.constexpr(_h2_ptx(True, 1))
_H2_BF16_2 = tl.constexpr(_h2_ptx(True, 2))
_H2_CONSTRAINTS_1 = tl.constexpr("=f" + ",r" * 7)  # a word, 4 input pairs, 2 constants (bfloat16 reads 1)
_H2_CONSTRAINTS_2 = tl.constexpr("=f" + ",r" * 12)
_PRMT_LO = tl.constexpr("prmt.b32 $0, $1, $2, 0x5410;")  # low halves of $1 and $2
_PRMT_HI = tl.constexpr("prmt.b32 $0, $1, $2, 0x7632;")  # high halves


@triton.jit
def _prmt(a, b, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(ASM, "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _half_bits(v):
    """float32 ``v`` (exact in float16) as float16 bits in both halves of an int32."""
    h = v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return h | (h << 16)


@triton.jit
def _bf16_bits(v):
    """float32 ``v`` (exact in bfloat16) as bfloat16 bits in both halves of an int32."""
    h = (v.to(tl.uint32, bitcast=True) >> 16).to(tl.int32)
    return h | (h << 16)


@triton.jit
def _round16(v, BF16: tl.constexpr):
    """float32 ``v`` rounded to the 16-bit float's grid (the interpreter's emulation of a paired
    instruction's rounding)."""
    if BF16:
        return _bf16_grid(v)
    return v.to(tl.float16).to(tl.float32)


@triton.jit
def _word_emulated(words, x_ptr, kk, rw, z, BF16: tl.constexpr):
    """What :func:`_h2_ptx`'s code computes for one word per chain, in float32 with each paired
    instruction's rounding (Triton's interpreter runs no inline assembly)."""
    w = words.to(tl.uint32, bitcast=True)
    lo = tl.zeros(words.shape, tl.float32)
    hi = tl.zeros(words.shape, tl.float32)
    for j in tl.static_range(4):
        q_lo = ((w >> (4 * j)) & 15).to(tl.float32)
        q_hi = ((w >> (16 + 4 * j)) & 15).to(tl.float32)
        if BF16:
            d_lo = q_lo - z
            d_hi = q_hi - z
        else:
            d_lo = (q_lo - z) * 0.0625
            d_hi = (q_hi - z) * 0.0625
        x_lo = tl.load(x_ptr + kk + rw * 8 + j).to(tl.float32)[:, None]
        x_hi = tl.load(x_ptr + kk + rw * 8 + j + 4).to(tl.float32)[:, None]
        lo = _round16(lo + x_lo * d_lo, BF16)
        hi = _round16(hi + x_hi * d_hi, BF16)
    return lo + hi


@triton.jit
def _pairs(xi_ptr, kk, rw, RW: tl.constexpr):
    """The input pairs ``(x_j, x_{j+4})``, ``j < 4``, of word rows ``rw`` (``[RW, 1]`` each):
    one 16-byte load of a row's 8 inputs and four byte permutes, shared by every column a thread
    holds."""
    xa = tl.load(xi_ptr + kk // 2 + rw[:, None] * 4 + tl.arange(0, 4)[None, :])
    ev, od = tl.split(tl.reshape(xa, (RW, 2, 2)))
    a0, a2 = tl.split(ev)
    a1, a3 = tl.split(od)
    return (_prmt(a0, a2, _PRMT_LO)[:, None], _prmt(a0, a2, _PRMT_HI)[:, None], _prmt(a1, a3, _PRMT_LO)[:, None],
            _prmt(a1, a3, _PRMT_HI)[:, None])


@triton.jit
def _h2_words(wp, n_ok, EVEN_N: tl.constexpr):
    if EVEN_N:
        return tl.load(wp)
    return tl.load(wp, mask=n_ok[None, :], other=0)


@triton.jit
def _gemv_h2(x_ptr, xi_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, N, k_split, LB, LBK,
             GROUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SYM: tl.constexpr, SPLIT: tl.constexpr,
             HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr, BF16: tl.constexpr, WIDEN: tl.constexpr,
             CHAIN: tl.constexpr, PREFETCH: tl.constexpr):
    """``h2``: one row of 16-bit inputs times 4-bit codes on CUDA cores, two codes per paired
    16-bit instruction (:func:`_h2_ptx`): the products of ``CHAIN`` words of a column are summed
    in the input's dtype, those sums in float32. A step's ``BK / 8`` word rows are cut into
    ``CHAIN`` slabs (slab ``c`` holds rows ``c·RW …``), one tile each, so a chain's words sit in
    one thread. ``xi_ptr`` is the input row as int32 (pairs of 16-bit floats); ``BN`` divides the
    block width ``LB``, so a program's columns are contiguous. ``PREFETCH`` loads the next step's
    words before this step's arithmetic."""
    pid_k = tl.program_id(1)
    RW: tl.constexpr = BK // 8 // CHAIN
    n0 = tl.program_id(0) * BN
    rn = n0 + tl.arange(0, BN)
    rw = tl.arange(0, RW)
    n_ok = rn < N
    wp = w_ptr + (n0 // LB).to(tl.int64) * LBK + n0 % LB + rw[:, None] * LB + tl.arange(0, BN)[None, :]
    acc = tl.zeros((RW, BN), dtype=tl.float32)
    k0 = pid_k * k_split
    k_end = k0 + k_split
    if PREFETCH:
        wa = _h2_words(wp + (k0 // 8) * LB, n_ok, EVEN_N)
        if CHAIN == 2:
            wb = _h2_words(wp + (k0 // 8 + RW) * LB, n_ok, EVEN_N)
    for kk in range(k0, k_end, BK):
        if PREFETCH:
            words = wa
            if CHAIN == 2:
                words_b = wb
            kn = tl.minimum(kk + BK, k_end - BK)  # the last step reloads itself
            wa = _h2_words(wp + (kn // 8) * LB, n_ok, EVEN_N)
            if CHAIN == 2:
                wb = _h2_words(wp + (kn // 8 + RW) * LB, n_ok, EVEN_N)
        else:
            words = _h2_words(wp + (kk // 8) * LB, n_ok, EVEN_N)
            if CHAIN == 2:
                words_b = _h2_words(wp + (kk // 8 + RW) * LB, n_ok, EVEN_N)
        # per-column values: loaded as vectors (each converted once to the tile's layout), the
        # constants derived after the conversion
        g = kk // GROUP
        s = tl.load(s_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if SYM:
            z = tl.full((1, BN), 8.0, tl.float32)
        else:
            z = tl.load(z_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if WIDEN:
            part = _word_emulated(words, x_ptr, kk, rw, z, BF16)
            if CHAIN == 2:
                part += _word_emulated(words_b, x_ptr, kk, rw + RW, z, BF16)
        else:
            p0, p1, p2, p3 = _pairs(xi_ptr, kk, rw, RW)
            if BF16:
                c0 = _bf16_bits(-(128.0 + z))
                c1 = c0
            else:
                c0 = _half_bits(-(64.0 + z * 0.0625))
                c1 = _half_bits(-(4.0 + z * 0.0625))
            if CHAIN == 2:
                r0, r1, r2, r3 = _pairs(xi_ptr, kk, rw + RW, RW)
                part = tl.inline_asm_elementwise(_H2_BF16_2 if BF16 else _H2_F16_2, _H2_CONSTRAINTS_2,
                                                 [words, words_b, p0, p1, p2, p3, r0, r1, r2, r3, c0, c1],
                                                 dtype=tl.float32, is_pure=True, pack=1)
            else:
                part = tl.inline_asm_elementwise(_H2_BF16_1 if BF16 else _H2_F16_1, _H2_CONSTRAINTS_1,
                                                 [words, p0, p1, p2, p3, c0, c1], dtype=tl.float32, is_pure=True,
                                                 pack=1)
        if not BF16:
            s = s * 16.0
        acc += part * s
    out = tl.sum(acc, axis=0)
    if SPLIT:
        tl.store(part_ptr + pid_k.to(tl.int64) * N + rn, out, mask=n_ok)
    else:
        if HAS_BIAS:
            out += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rn, out.to(y_ptr.dtype.element_ty), mask=n_ok)


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


def h2_serves(m: int, dtype: torch.dtype, p, bn: int, bk: int) -> bool:
    """Whether the ``h2`` GEMV runs this call: one row of float16/bfloat16 inputs, 4-bit codes
    with integer zero points, steps of ``bk`` columns inside one group, and tiles of ``bn``
    columns inside one block of the packed words."""
    return (m == 1 and dtype in (torch.float16, torch.bfloat16) and p.bits == 4 and p.int_zero
            and p.group % bk == 0 and bk % 16 == 0 and (p.block % bn == 0 or p.block == p.n))


def rows_tile(kind: str, m: int) -> int:
    """The row tile of a call with ``m`` rows: the next power of two (``fma``; at least 1) or 16
    (``dot``: a tensor-core tile)."""
    return 16 if kind.startswith("dot") else 1 << max(0, (m - 1).bit_length())


def gemv(x: torch.Tensor, p, bias: torch.Tensor | None, cfg: GemvConfig, *, interpreting: bool = False,
         pairs: bool = True) -> torch.Tensor:
    """``x`` ``[M, K]`` (contiguous rows, M ≤ 16; ≤ 4 for ``fma``) times the packed weight
    (``pairs=False``: the tensor-core GEMVs decode in float32 even where :func:`half_decode`
    allows code pairs — for benchmarks)."""
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
    elif cfg.kind == "h2":
        if not h2_serves(m, x.dtype, p, cfg.bn, cfg.bk) or cfg.chain not in (1, 2) or cfg.bk % (16 * cfg.chain):
            raise ValueError("the h2 GEMV runs one row of 16-bit inputs on 4-bit codes with integer zero points")
        xs = x if x.data_ptr() % 4 == 0 else x.clone()
        _gemv_h2[grid](xs, xs.view(torch.int32), p.words, p.scale, p.zero, args[4], y, part, p.n, p.k // split,
                       p.block, p.block * (p.k // 8), GROUP=p.group, BN=cfg.bn, BK=cfg.bk, SYM=p.sym, SPLIT=parts,
                       HAS_BIAS=common["HAS_BIAS"], EVEN_N=p.n % cfg.bn == 0, BF16=x.dtype == torch.bfloat16,
                       WIDEN=interpreting, CHAIN=cfg.chain, PREFETCH=cfg.prefetch, num_warps=cfg.warps,
                       num_stages=cfg.stages)
    else:
        if not p.int_zero or x.dtype == torch.float32:
            raise ValueError(f"the {cfg.kind} GEMV needs integer zero points and 16-bit inputs")
        decode = half_decode(x.dtype, p.bits) if pairs else None
        _gemv_dot[grid](*args, SWAP=cfg.kind == "dot_t", PAIRS=decode is not None, MAGIC=decode[0] if decode else 0,
                        BASE=decode[1] if decode else 0.0, WIDEN=interpreting, **common)
    if parts:
        reduce_parts(part, y, bias, split, interpreting=interpreting)
    return y
