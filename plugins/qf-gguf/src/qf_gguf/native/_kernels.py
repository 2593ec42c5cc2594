"""llama.cpp's GGML quantization encoders (``ggml-quants.c``) as numba kernels, bit-exact.

Three parts: the numeric primitives and scale searches (``nearest_int``, fp16 conversions,
``make_qx_quants`` … ``make_qp_quants``), the 32-element block types (Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0) and the 256-element super-block types (Q2_K … Q6_K), each with its ``quantize_row_*_ref``
encoder (no importance) and its ``quantize_row_*_impl`` encoder (with ``quant_weights``). The
``rows_*`` kernels encode one row per ``prange`` iteration, its blocks in order inside.
Last, :data:`SEARCH`: every ``rows_*`` kernel again with a faster, lane-summed scale search, for
ranking candidates only (see that section).

**Why one file.** numba's on-disk cache (``cache=True``) keys a function's compiled code on the
hash of *its own* source file only, yet that code embeds every njit function it calls. Were the
searches in another module, editing them would leave the callers' cached machine code stale and
silently wrong. In one file, any edit invalidates every kernel.

**Exactness.** Every float is a float32 and every operation is evaluated as the C evaluates it
(left to right, one rounding per operation, no contraction into FMA, sums sequential in index
order). In numba that means: constants are ``np.float32`` (a Python float literal, or an int
mixed with a float32, would promote the expression to float64), ints are converted with
``np.float32`` where C converts them to ``float``, unsigned bytes are widened with ``np.int64``
before bit arithmetic (uint8/uint64 mixed with int64 types as float64), and nothing is compiled
with ``fastmath``. ``error_model="numpy"`` gives IEEE division (no ``ZeroDivisionError`` checks),
as in C. ``nearest_int`` and the fp16 conversions are the C code's own bit tricks, through two
LLVM bitcast intrinsics (float32 <-> int32 bits). See ``docs/llama-cpp-reference.md``.
"""

# The variable names are ggml-quants.c's (l, L, ...), so that the port reads line by line against it.
# ruff: noqa: E741

from __future__ import annotations

import types as _pytypes

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

JIT = {"cache": True, "nogil": True, "error_model": "numpy", "fastmath": False}
njit = numba.njit(**JIT)
pjit = numba.njit(parallel=True, **JIT)
prange = numba.prange

F0 = np.float32(0.0)
F1 = np.float32(1.0)
F05 = np.float32(0.5)
F01 = np.float32(0.1)
F005 = np.float32(0.05)
FM09 = np.float32(-0.9)
GROUP_MAX_EPS = np.float32(1e-15)
_MAGIC = np.float32(12582912.0)  # 1.5 * 2^23
_SCALE_TO_INF = np.float32(2.0**112)
_SCALE_TO_ZERO = np.float32(2.0**-110)
_EXP_SCALE = np.float32(2.0**-112)


@intrinsic
def f32_bits(typingctx, f):
    """The IEEE bits of a float32 as an int32 (C ``memcpy(&i, &f, 4)``)."""
    if f != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, i):
    """The float32 whose IEEE bits are the low 32 bits of an integer."""
    if not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        width = signature.args[0].bitwidth
        if width > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif width < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(i), codegen


@njit
def nearest_int(fval):
    """``nearest_int`` of ggml-quants.c: add 1.5*2^23 in float32 and read the mantissa bits
    (round half to even for |fval| < 2^22; the same garbage as the C beyond)."""
    val = fval + _MAGIC
    i = np.int64(f32_bits(val))
    return (i & 0x007FFFFF) - 0x00400000


@njit
def _round_clamp(fval, lo, hi):
    """``MAX(lo, MIN(hi, nearest_int(fval)))`` as a float32, for the searches' candidate loops,
    where ``|fval|`` stays within a few units of ``hi`` (the scale is the candidate's own
    ``nmax / range``): there ``nearest_int``'s bit trick is round-half-to-even, which
    ``np.rint`` is, without the trips through the integer unit (a quarter of the loop's time)."""
    return min(max(np.rint(fval), lo), hi)


@njit
def fp32_to_fp16(f):
    """``ggml_compute_fp32_to_fp16`` (ggml-impl.h): round to nearest even, subnormals, overflow to
    inf, NaN to 0x7E00. Returns the half's bits as an int in 0..65535."""
    base = (abs(f) * _SCALE_TO_INF) * _SCALE_TO_ZERO
    w = np.int64(f32_bits(f)) & 0xFFFFFFFF
    shl1_w = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1_w & 0xFF000000
    if bias < 0x71000000:
        bias = 0x71000000
    base = bits_f32((bias >> 1) + 0x07800000) + base
    bits = np.int64(f32_bits(base)) & 0xFFFFFFFF
    exp_bits = (bits >> 13) & 0x00007C00
    mantissa_bits = bits & 0x00000FFF
    nonsign = exp_bits + mantissa_bits
    if shl1_w > 0xFF000000:
        nonsign = 0x7E00
    return ((sign >> 16) | nonsign) & 0xFFFF


@njit
def fp16_to_fp32(h):
    """``ggml_compute_fp16_to_fp32`` (exact)."""
    w = (np.int64(h) << 16) & 0xFFFFFFFF
    sign = w & 0x80000000
    two_w = (w + w) & 0xFFFFFFFF
    normalized = bits_f32((two_w >> 4) + (0xE0 << 23)) * _EXP_SCALE
    denormalized = bits_f32((two_w >> 17) | (126 << 23)) - F05
    if two_w < (1 << 27):
        rest = np.int64(f32_bits(denormalized)) & 0xFFFFFFFF
    else:
        rest = np.int64(f32_bits(normalized)) & 0xFFFFFFFF
    return bits_f32(sign | rest)


@njit
def store_f16(y, pos, h):
    """A half's bits at ``y[pos:pos+2]``, little-endian."""
    y[pos] = h & 0xFF
    y[pos + 1] = (h >> 8) & 0xFF


@njit
def i8(v):
    """C conversion of an int to ``int8_t`` (two's complement wrap)."""
    return ((v + 128) & 0xFF) - 128


@njit
def trunc_int(f):
    """C float → integer conversion (toward zero) of a float32 in int range."""
    return np.int64(f)


@njit
def roundf_int(f):
    """C ``roundf``: nearest, halves away from zero (``x - trunc(x)`` is exact)."""
    t = np.int64(f)
    r = f - np.float32(t)
    if r >= F05:
        t += 1
    elif r <= -F05:
        t -= 1
    return t


@njit
def make_qx_quants(n, nmax, x, L, qw):
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``: symmetric search, ``L`` in
    ``0..2*nmax-1`` (all 0 for an all-zero group); returns the scale. Without quant weights
    the C weighs element ``i`` by ``x[i]*x[i]``: pass that array as ``qw`` (the same float32
    products, computed once instead of in every candidate's loop)."""
    mx = F0
    amax = F0
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F0
    fnmax = np.float32(nmax)
    lo = np.float32(-nmax)
    hi = np.float32(nmax - 1)
    iscale = np.float32(-nmax) / mx
    sumlx = F0
    suml2 = F0
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
        w = qw[i]
        fl = np.float32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != F0 else F0
    best = scale * sumlx
    for is_ in range(-9, 10):
        if is_ == 0:
            continue
        iscale = -(fnmax + F01 * np.float32(is_)) / mx
        sumlx = F0
        suml2 = F0
        for i in range(n):
            fl = _round_clamp(iscale * x[i], lo, hi)
            w = qw[i]
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        if suml2 > F0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                l = nearest_int(iscale * x[i])
                L[i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit
def make_q3_quants(n, nmax, x, L):
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)`` (Q3_K ref): ``L`` in ``0..2*nmax-1``."""
    mx = F0
    amax = F0
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F0
    iscale = np.float32(-nmax) / mx
    sumlx = F0
    suml2 = F0
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l
        w = x[i] * x[i]
        fl = np.float32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    for _itry in range(5):
        n_changed = 0
        for i in range(n):
            w = x[i] * x[i]
            fli = np.float32(L[i])
            slx = sumlx - w * x[i] * fli
            if slx > F0:
                sl2 = suml2 - w * fli * fli
                new_l = nearest_int(x[i] * sl2 / slx)
                new_l = max(-nmax, min(nmax - 1, new_l))
                if new_l != L[i]:
                    fnl = np.float32(new_l)
                    slx += w * x[i] * fnl
                    sl2 += w * fnl * fnl
                    if sl2 > F0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > F0 else F0


@njit
def _qkx_start(n, nmax, x, weights, L, nstep, use_mad, le_test):
    """The first part of ``make_qkx2/3_quants``: ``(done, scale, min, max, sum_w, sum_x,
    best_error)``, ``L`` the codes of the plain ``nmax / (max - min)`` scale (all 0 when
    degenerate); ``done``: the search ends here with ``(scale, -min)`` (degenerate, or no steps)."""
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if mn > F0:
        mn = F0
    if (mx <= mn) if le_test else (mx == mn):
        for i in range(n):
            L[i] = 0
        return True, F0, mn, mx, sum_w, sum_x, F0
    iscale = np.float32(nmax) / (mx - mn)
    scale = F1 / iscale
    best_error = F0
    for i in range(n):
        l = nearest_int(iscale * (x[i] - mn))
        L[i] = max(0, min(nmax, l))
        diff = scale * np.float32(L[i]) + mn - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += weights[i] * diff
    return nstep < 1, scale, mn, mx, sum_w, sum_x, best_error


@njit
def _qkx_fit(sum_w, sum_x, sum_l, sum_l2, sum_xl):
    """A candidate's least-squares ``(ok, scale, min)`` from its weighted sums (``ok``: ``D > 0``)."""
    D = sum_w * sum_l2 - sum_l * sum_l
    if not D > F0:
        return False, F0, F0
    this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
    this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
    if this_min > F0:
        this_min = F0
        this_scale = sum_xl / sum_l2
    return True, this_scale, this_min


@njit
def make_qkx_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad, le_test):
    """``make_qkx2_quants`` (``le_test=False``: degenerate when ``max == min``) and
    ``make_qkx3_quants`` with weights (``le_test=True``: ``max <= min``). Returns
    ``(scale, the_min)``; ``L`` in ``0..nmax``. An accepted candidate moves ``min`` for the later
    ones, as in the C."""
    done, scale, mn, mx, sum_w, sum_x, best_error = _qkx_start(n, nmax, x, weights, L, nstep, use_mad, le_test)
    if done:
        return scale, -mn
    fnmax = np.float32(nmax)
    for is_ in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(is_) + fnmax) / (mx - mn)
        sum_l = F0
        sum_l2 = F0
        sum_xl = F0
        for i in range(n):
            fl = _round_clamp(iscale * (x[i] - mn), F0, fnmax)
            Laux[i] = np.int32(fl)
            w = weights[i]
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        ok, this_scale, this_min = _qkx_fit(sum_w, sum_x, sum_l, sum_l2, sum_xl)
        if ok:
            cur_error = F0
            for i in range(n):
                diff = this_scale * np.float32(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                cur_error += weights[i] * diff
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn


LANES = 8


@njit
def _lane_sum(p, n):
    """``p[0..n)`` summed in :data:`LANES` (8) interleaved partial sums (element ``i`` into lane
    ``i mod 8``, in index order), then the lanes pairwise, ``((0+4)+(2+6))+((1+5)+(3+7))``
    (``n`` a multiple of 8; ``p`` is overwritten). A fixed order, so the same bits on every
    machine; the lanes run side by side in SIMD registers."""
    for i0 in range(LANES, n, LANES):
        for j in range(LANES):
            p[j] += p[i0 + j]
    return ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]))


@njit
def make_qkx_quants_lanes(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad, le_test):
    """:func:`make_qkx_quants` with every candidate's three sums and its error summed by
    :func:`_lane_sum` instead of sequentially (about twice as fast): for ranking candidates
    only (the search kernels, :data:`SEARCH`). The sums round differently, so a candidate
    within a rounding error of the best may win or lose the other way."""
    done, scale, mn, mx, sum_w, sum_x, best_error = _qkx_start(n, nmax, x, weights, L, nstep, use_mad, le_test)
    if done:
        return scale, -mn
    fnmax = np.float32(nmax)
    fl_ = np.empty(n, np.float32)
    pl = np.empty(n, np.float32)
    pl2 = np.empty(n, np.float32)
    pxl = np.empty(n, np.float32)
    for is_ in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(is_) + fnmax) / (mx - mn)
        for i in range(n):
            fl = _round_clamp(iscale * (x[i] - mn), F0, fnmax)
            fl_[i] = fl
            wl = weights[i] * fl
            pl[i] = wl
            pl2[i] = wl * fl
            pxl[i] = wl * x[i]
        ok, this_scale, this_min = _qkx_fit(sum_w, sum_x, _lane_sum(pl, n), _lane_sum(pl2, n), _lane_sum(pxl, n))
        if ok:
            for i in range(n):
                diff = this_scale * fl_[i] + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                pl[i] = weights[i] * diff
            cur_error = _lane_sum(pl, n)
            if cur_error < best_error:
                for i in range(n):
                    L[i] = np.int32(fl_[i])
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit
def make_qp_quants(n, nmax, x, L, qw):
    """``make_qp_quants`` (imatrix paths: quantizes sub-block scales/mins). ``L`` holds C's
    ``uint8_t`` values (a negative code wraps modulo 256, as in the C)."""
    mx = F0
    for i in range(n):
        mx = mx if mx > x[i] else x[i]  # MAX(max, x[i])
    if mx < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F0
    fnmax = np.float32(nmax)
    iscale = fnmax / mx
    for i in range(n):
        L[i] = nearest_int(iscale * x[i]) & 0xFF
    scale = F1 / iscale
    best_mse = F0
    for i in range(n):
        diff = x[i] - scale * np.float32(L[i])
        best_mse += qw[i] * diff * diff
    for is_ in range(-4, 5):
        if is_ == 0:
            continue
        iscale_is = (F01 * np.float32(is_) + fnmax) / mx
        scale_is = F1 / iscale_is
        mse = F0
        for i in range(n):
            l = nearest_int(iscale_is * x[i])
            l = min(nmax, l)
            diff = x[i] - scale_is * np.float32(l)
            mse += qw[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = F0
    suml2 = F0
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = min(nmax, l)
        L[i] = l & 0xFF
        w = qw[i]
        fl = np.float32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    for _itry in range(5):
        n_changed = 0
        for i in range(n):
            w = qw[i]
            fli = np.float32(L[i])
            slx = sumlx - w * x[i] * fli
            sl2 = suml2 - w * fli * fli
            if slx > F0 and sl2 > F0:
                new_l = nearest_int(x[i] * sl2 / slx)
                new_l = min(nmax, new_l)
                if new_l != L[i]:
                    fnl = np.float32(new_l)
                    slx += w * x[i] * fnl
                    sl2 += w * fnl * fnl
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > F0 else F0


@njit
def qrow(qw, r):
    """The importance row of row ``r``: ``qw`` is ``[1, cols]`` (shared) or ``[rows, cols]``.
    (A ``prange`` index is unsigned: mixing it with a signed 0 in a conditional would type as
    float64, hence this function.)"""
    if qw.shape[0] > 1:
        return np.int64(r)
    return np.int64(0)


@njit
def row_sigma2(x):
    """``Σ x²`` over a whole row, sequentially (the legacy ``_impl`` paths divide it by n)."""
    s = F0
    for j in range(x.shape[0]):
        s += x[j] * x[j]
    return s

# ==================================================================================================
# 32-element block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
# ==================================================================================================

QK = 32
F15 = np.float32(15.0)
F31 = np.float32(31.0)
F127 = np.float32(127.0)
FM8 = np.float32(-8.0)
FM16 = np.float32(-16.0)
F85 = np.float32(8.5)
F165 = np.float32(16.5)
FLT_MAX = np.float32(np.finfo(np.float32).max)


@njit
def _absmax_signed(x):
    """The signed value of the first element of largest magnitude (strict ``<`` update)."""
    amax = F0
    mx = F0
    for j in range(QK):
        v = x[j]
        if amax < abs(v):
            amax = abs(v)
            mx = v
    return mx


@njit
def _min_max(x):
    mn = FLT_MAX
    mx = -FLT_MAX
    for j in range(QK):
        v = x[j]
        if v < mn:
            mn = v
        if v > mx:
            mx = v
    return mn, mx


# ---------------------------------------------------------------- _ref blocks

@njit
def q4_0_ref_block(x, y):
    d = _absmax_signed(x) / FM8
    id_ = F1 / d if d != F0 else F0
    store_f16(y, 0, fp32_to_fp16(d))
    for j in range(16):
        xi0 = min(15, i8(trunc_int(x[j] * id_ + F85)))
        xi1 = min(15, i8(trunc_int(x[16 + j] * id_ + F85)))
        y[2 + j] = (xi0 | (xi1 << 4)) & 0xFF


@njit
def q5_0_ref_block(x, y):
    d = _absmax_signed(x) / FM16
    id_ = F1 / d if d != F0 else F0
    store_f16(y, 0, fp32_to_fp16(d))
    qh = 0
    for j in range(16):
        xi0 = min(31, i8(trunc_int(x[j] * id_ + F165))) & 0xFF
        xi1 = min(31, i8(trunc_int(x[16 + j] * id_ + F165))) & 0xFF
        y[6 + j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4)
        qh |= ((xi0 & 0x10) >> 4) << j
        qh |= ((xi1 & 0x10) >> 4) << (j + 16)
    for b in range(4):
        y[2 + b] = (qh >> (8 * b)) & 0xFF


@njit
def q4_1_ref_block(x, y):
    mn, mx = _min_max(x)
    d = (mx - mn) / F15
    id_ = F1 / d if d != F0 else F0
    store_f16(y, 0, fp32_to_fp16(d))
    store_f16(y, 2, fp32_to_fp16(mn))
    for j in range(16):
        xi0 = min(15, i8(trunc_int((x[j] - mn) * id_ + F05))) & 0xFF
        xi1 = min(15, i8(trunc_int((x[16 + j] - mn) * id_ + F05))) & 0xFF
        y[4 + j] = (xi0 | (xi1 << 4)) & 0xFF


@njit
def q5_1_ref_block(x, y):
    mn, mx = _min_max(x)
    d = (mx - mn) / F31
    id_ = F1 / d if d != F0 else F0
    store_f16(y, 0, fp32_to_fp16(d))
    store_f16(y, 2, fp32_to_fp16(mn))
    qh = 0
    for j in range(16):
        xi0 = trunc_int((x[j] - mn) * id_ + F05) & 0xFF  # (uint8_t), no MIN in the C
        xi1 = trunc_int((x[16 + j] - mn) * id_ + F05) & 0xFF
        y[8 + j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4)
        qh |= ((xi0 & 0x10) >> 4) << j
        qh |= ((xi1 & 0x10) >> 4) << (j + 16)
    for b in range(4):
        y[4 + b] = (qh >> (8 * b)) & 0xFF


@njit
def q8_0_ref_block(x, y):
    amax = F0
    for j in range(QK):
        a = abs(x[j])
        amax = amax if amax > a else a  # MAX(amax, fabsf(v))
    d = amax / F127
    id_ = F1 / d if d != F0 else F0
    store_f16(y, 0, fp32_to_fp16(d))
    for j in range(QK):
        y[2 + j] = roundf_int(x[j] * id_) & 0xFF


# ---------------------------------------------------------------- _impl rows

@njit
def _weights(xb, qwb, sigma2, weight):
    for j in range(QK):
        weight[j] = qwb[j] * np.sqrt(sigma2 + xb[j] * xb[j])


@njit
def q4_0_impl_row(x, qw, y, weight, L):
    sigma2 = row_sigma2(x) / np.float32(x.shape[0])
    for ib in range(x.shape[0] // QK):
        xb = x[QK * ib:QK * ib + QK]
        yb = y[18 * ib:18 * ib + 18]
        _weights(xb, qw[QK * ib:QK * ib + QK], sigma2, weight)
        d = make_qx_quants(QK, 8, xb, L, weight)
        store_f16(yb, 0, fp32_to_fp16(d))
        for j in range(16):
            yb[2 + j] = (L[j] | (L[j + 16] << 4)) & 0xFF


@njit
def q5_0_impl_row(x, qw, y, weight, L):
    sigma2 = row_sigma2(x) / np.float32(x.shape[0])
    for ib in range(x.shape[0] // QK):
        xb = x[QK * ib:QK * ib + QK]
        yb = y[22 * ib:22 * ib + 22]
        _weights(xb, qw[QK * ib:QK * ib + QK], sigma2, weight)
        d = make_qx_quants(QK, 16, xb, L, weight)
        store_f16(yb, 0, fp32_to_fp16(d))
        qh = 0
        for j in range(16):
            xi0 = L[j] & 0xFF
            xi1 = L[j + 16] & 0xFF
            yb[6 + j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4)
            qh |= ((xi0 & 0x10) >> 4) << j
            qh |= ((xi1 & 0x10) >> 4) << (j + 16)
        for b in range(4):
            yb[2 + b] = (qh >> (8 * b)) & 0xFF


@njit
def q4_1_impl_row(x, qw, y, weight, L, Laux):
    sigma2 = row_sigma2(x) / np.float32(x.shape[0])
    for ib in range(x.shape[0] // QK):
        xb = x[QK * ib:QK * ib + QK]
        yb = y[20 * ib:20 * ib + 20]
        _weights(xb, qw[QK * ib:QK * ib + QK], sigma2, weight)
        d, the_min = make_qkx_quants(QK, 15, xb, weight, L, Laux, FM09, F005, 36, False, True)
        store_f16(yb, 0, fp32_to_fp16(d))
        store_f16(yb, 2, fp32_to_fp16(-the_min))
        for j in range(16):
            yb[4 + j] = (L[j] | (L[j + 16] << 4)) & 0xFF


@njit
def q5_1_impl_row(x, qw, y, weight, L, Laux):
    sigma2 = row_sigma2(x) / np.float32(x.shape[0])
    for ib in range(x.shape[0] // QK):
        xb = x[QK * ib:QK * ib + QK]
        yb = y[24 * ib:24 * ib + 24]
        _weights(xb, qw[QK * ib:QK * ib + QK], sigma2, weight)
        d, the_min = make_qkx_quants(QK, 31, xb, weight, L, Laux, FM09, F005, 36, False, True)
        store_f16(yb, 0, fp32_to_fp16(d))
        store_f16(yb, 2, fp32_to_fp16(-the_min))
        qh = 0
        for j in range(16):
            xi0 = L[j] & 0xFF
            xi1 = L[j + 16] & 0xFF
            yb[8 + j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4)
            qh |= ((xi0 & 0x10) >> 4) << j
            qh |= ((xi1 & 0x10) >> 4) << (j + 16)
        for b in range(4):
            yb[4 + b] = (qh >> (8 * b)) & 0xFF


# ---------------------------------------------------------------- row kernels
# ``qw`` is ``[0, cols]`` (no importance: the _ref encoder), ``[1, cols]`` (one vector for every
# row, as llama.cpp) or ``[rows, cols]`` (row r uses qw[r]).

@pjit
def rows_q4_0(x, qw, out):
    nb = x.shape[1] // QK
    for r in prange(x.shape[0]):
        if qw.shape[0] == 0:
            for b in range(nb):
                q4_0_ref_block(x[r, QK * b:QK * b + QK], out[r, 18 * b:18 * b + 18])
        else:
            weight = np.empty(QK, np.float32)
            L = np.empty(QK, np.int32)
            q4_0_impl_row(x[r], qw[qrow(qw, r)], out[r], weight, L)


@pjit
def rows_q5_0(x, qw, out):
    nb = x.shape[1] // QK
    for r in prange(x.shape[0]):
        if qw.shape[0] == 0:
            for b in range(nb):
                q5_0_ref_block(x[r, QK * b:QK * b + QK], out[r, 22 * b:22 * b + 22])
        else:
            weight = np.empty(QK, np.float32)
            L = np.empty(QK, np.int32)
            q5_0_impl_row(x[r], qw[qrow(qw, r)], out[r], weight, L)


@pjit
def rows_q4_1(x, qw, out):
    nb = x.shape[1] // QK
    for r in prange(x.shape[0]):
        if qw.shape[0] == 0:
            for b in range(nb):
                q4_1_ref_block(x[r, QK * b:QK * b + QK], out[r, 20 * b:20 * b + 20])
        else:
            weight = np.empty(QK, np.float32)
            L = np.empty(QK, np.int32)
            Laux = np.empty(QK, np.int32)
            q4_1_impl_row(x[r], qw[qrow(qw, r)], out[r], weight, L, Laux)


@pjit
def rows_q5_1(x, qw, out):
    nb = x.shape[1] // QK
    for r in prange(x.shape[0]):
        if qw.shape[0] == 0:
            for b in range(nb):
                q5_1_ref_block(x[r, QK * b:QK * b + QK], out[r, 24 * b:24 * b + 24])
        else:
            weight = np.empty(QK, np.float32)
            L = np.empty(QK, np.int32)
            Laux = np.empty(QK, np.int32)
            q5_1_impl_row(x[r], qw[qrow(qw, r)], out[r], weight, L, Laux)


@pjit
def rows_q8_0(x, qw, out):  # quantize_q8_0 ignores quant_weights
    nb = x.shape[1] // QK
    for r in prange(x.shape[0]):
        for b in range(nb):
            q8_0_ref_block(x[r, QK * b:QK * b + QK], out[r, 34 * b:34 * b + 34])

# ==================================================================================================
# 256-element super-block types: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (codes are recomputed from the
# fp16-rounded d/dmin times the integer sub-block scale, except where that product is 0)
# ==================================================================================================

QK_K = 256
F2 = np.float32(2.0)
F32 = np.float32(32.0)
F63 = np.float32(63.0)
F256 = np.float32(256.0)
FM05 = np.float32(-0.5)
FM1 = np.float32(-1.0)
FM32 = np.float32(-32.0)
FM128 = np.float32(-128.0)


@njit
def _sum_x2(x):
    s = F0
    for j in range(QK_K):
        s += x[j] * x[j]
    return s


@njit
def _pack_2bit(L, y, off):
    """``qs``: element e → byte ``32*(e/128) + e%32``, bit shift ``2*((e%128)/32)``."""
    for j in range(0, QK_K, 128):
        for l in range(32):
            y[off + j // 4 + l] = (L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4)
                                   | (L[j + l + 96] << 6)) & 0xFF


# ---------------------------------------------------------------- Q2_K
# layout: scales[16]@0, qs[64]@16, d@80, dmin@82

@njit
def _q2_k_finish(x, y, L, dh, mh):
    store_f16(y, 80, dh)
    store_f16(y, 82, mh)
    dm = fp16_to_fp32(dh)
    mm = fp16_to_fp32(mh)
    for j in range(16):
        sj = np.int64(y[j])
        d = dm * np.float32(sj & 0xF)
        if d == F0:
            continue
        m = mm * np.float32(sj >> 4)
        for ii in range(16):
            l = nearest_int((x[16 * j + ii] + m) / d)
            L[16 * j + ii] = max(0, min(3, l))
    _pack_2bit(L, y, 16)


@njit
def q2_k_ref_block(x, y, L, Laux, weights, scales, mins):
    max_scale = F0
    max_min = F0
    for j in range(16):
        for l in range(16):
            weights[l] = abs(x[16 * j + l])
        sc, mn = make_qkx_quants(16, 3, x[16 * j:16 * j + 16], weights, L[16 * j:16 * j + 16], Laux,
                                 FM05, F01, 15, True, False)
        scales[j] = sc
        mins[j] = mn
        if sc > max_scale:
            max_scale = sc
        if mn > max_min:
            max_min = mn
    if max_scale > F0:
        iscale = F15 / max_scale
        for j in range(16):
            y[j] = nearest_int(iscale * scales[j]) & 0xFF
        dh = fp32_to_fp16(max_scale / F15)
    else:
        for j in range(16):
            y[j] = 0
        dh = fp32_to_fp16(F0)
    if max_min > F0:
        iscale = F15 / max_min
        for j in range(16):
            y[j] = (np.int64(y[j]) | (nearest_int(iscale * mins[j]) << 4)) & 0xFF
        mh = fp32_to_fp16(max_min / F15)
    else:
        mh = fp32_to_fp16(F0)
    _q2_k_finish(x, y, L, dh, mh)


@njit
def q2_k_impl_block(x, qw, y, L, Laux, weight, scales, mins, sw, Ls, Lm):
    sigma2 = _sum_x2(x) / F256
    for j in range(16):
        for l in range(16):
            weight[l] = qw[16 * j + l] * np.sqrt(sigma2 + x[16 * j + l] * x[16 * j + l])
        s = F0
        for l in range(16):
            s += weight[l]
        sw[j] = s
        sc, mn = make_qkx_quants(16, 3, x[16 * j:16 * j + 16], weight, L[16 * j:16 * j + 16], Laux,
                                 FM09, F005, 36, False, True)
        scales[j] = sc
        mins[j] = mn
    dm = make_qp_quants(16, 15, scales, Ls, sw)
    mm = make_qp_quants(16, 15, mins, Lm, sw)
    for j in range(16):
        y[j] = (Ls[j] | (Lm[j] << 4)) & 0xFF
    _q2_k_finish(x, y, L, fp32_to_fp16(dm), fp32_to_fp16(mm))


# ---------------------------------------------------------------- Q3_K
# layout: hmask[32]@0, qs[64]@32, scales[12]@96, d@108

@njit
def _q3_k_pack_scale(y, j, l):
    """One 6-bit scale code (0..63, offset +32 included) into the 12 scale bytes."""
    if j < 8:
        y[96 + j] = l & 0xF
    else:
        y[96 + j - 8] = (np.int64(y[96 + j - 8]) | ((l & 0xF) << 4)) & 0xFF
    l >>= 4
    y[96 + 8 + j % 4] = (np.int64(y[96 + 8 + j % 4]) | (l << (2 * (j // 4)))) & 0xFF


@njit
def _q3_k_finish(x, y, L, dh):
    store_f16(y, 108, dh)
    df = fp16_to_fp32(dh)
    for j in range(16):
        if j < 8:
            sc = np.int64(y[96 + j]) & 0xF
        else:
            sc = np.int64(y[96 + j - 8]) >> 4
        sc = i8((sc | (((np.int64(y[96 + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32)
        d = df * np.float32(sc)
        if d == F0:
            continue
        for ii in range(16):
            l = nearest_int(x[16 * j + ii] / d)
            L[16 * j + ii] = max(-4, min(3, l)) + 4
    for m in range(32):
        y[m] = 0
    m = 0
    hm = 1
    for j in range(QK_K):
        if L[j] > 3:
            y[m] = (np.int64(y[m]) | hm) & 0xFF
            L[j] -= 4
        m += 1
        if m == 32:
            m = 0
            hm <<= 1
    _pack_2bit(L, y, 32)


@njit
def q3_k_ref_block(x, y, L, scales):
    max_scale = F0
    amax = F0
    for j in range(16):
        sc = make_q3_quants(16, 4, x[16 * j:16 * j + 16], L[16 * j:16 * j + 16])
        scales[j] = sc
        a = abs(sc)
        if a > amax:
            amax = a
            max_scale = sc
    for b in range(12):
        y[96 + b] = 0
    if max_scale != F0:
        iscale = FM32 / max_scale
        for j in range(16):
            l = i8(nearest_int(iscale * scales[j]))  # int8_t l = nearest_int(...)
            l = max(-32, min(31, l)) + 32
            _q3_k_pack_scale(y, j, l)
        dh = fp32_to_fp16(F1 / iscale)
    else:
        dh = fp32_to_fp16(F0)
    _q3_k_finish(x, y, L, dh)


@njit
def q3_k_impl_block(x, qw, y, L, weight, scales, sw, Ls):
    sigma2 = F2 * _sum_x2(x) / F256
    for j in range(16):
        for l in range(16):
            weight[l] = qw[16 * j + l] * np.sqrt(sigma2 + x[16 * j + l] * x[16 * j + l])
        s = F0
        for l in range(16):
            s += weight[l]
        sw[j] = s
        scales[j] = make_qx_quants(16, 4, x[16 * j:16 * j + 16], L[16 * j:16 * j + 16], weight)
    for b in range(12):
        y[96 + b] = 0
    d_block = make_qx_quants(16, 32, scales, Ls, sw)
    for j in range(16):
        _q3_k_pack_scale(y, j, Ls[j])
    _q3_k_finish(x, y, L, fp32_to_fp16(d_block))


# ---------------------------------------------------------------- Q4_K / Q5_K
# layout: d@0, dmin@2, scales[12]@4, then Q4_K qs[128]@16; Q5_K qh[32]@16, qs[128]@48

@njit
def _k4_pack_scales(y, Ls, Lm):
    for j in range(8):
        ls = Ls[j]
        lm = Lm[j]
        if j < 4:
            y[4 + j] = ls
            y[4 + j + 4] = lm
        else:
            y[4 + j + 4] = ((ls & 0xF) | ((lm & 0xF) << 4)) & 0xFF
            y[4 + j - 4] = (np.int64(y[4 + j - 4]) | ((ls >> 4) << 6)) & 0xFF
            y[4 + j] = (np.int64(y[4 + j]) | ((lm >> 4) << 6)) & 0xFF


@njit
def _k4_requantize(x, y, L, nmax):
    """``get_scale_min_k4`` each sub-block and recompute its codes from the stored fp16 d/dmin."""
    df = fp16_to_fp32(np.int64(y[0]) | (np.int64(y[1]) << 8))
    mf = fp16_to_fp32(np.int64(y[2]) | (np.int64(y[3]) << 8))
    for j in range(8):
        if j < 4:
            sc = np.int64(y[4 + j]) & 63
            m = np.int64(y[4 + j + 4]) & 63
        else:
            sc = (np.int64(y[4 + j + 4]) & 0xF) | ((np.int64(y[4 + j - 4]) >> 6) << 4)
            m = (np.int64(y[4 + j + 4]) >> 4) | ((np.int64(y[4 + j]) >> 6) << 4)
        d = df * np.float32(sc)
        if d == F0:
            continue
        dm = mf * np.float32(m)
        for ii in range(32):
            l = nearest_int((x[32 * j + ii] + dm) / d)
            L[32 * j + ii] = max(0, min(nmax, l))


@njit
def _k4_finish(x, y, L, nmax):
    _k4_requantize(x, y, L, nmax)
    if nmax == 15:
        for j in range(0, QK_K, 64):
            for l in range(32):
                y[16 + j // 2 + l] = (L[j + l] | (L[j + l + 32] << 4)) & 0xFF
    else:
        for j in range(32):
            y[16 + j] = 0
        m1 = 1
        m2 = 2
        for n in range(0, QK_K, 64):
            for j in range(32):
                l1 = L[n + j]
                if l1 > 15:
                    l1 -= 16
                    y[16 + j] = (np.int64(y[16 + j]) | m1) & 0xFF
                l2 = L[n + j + 32]
                if l2 > 15:
                    l2 -= 16
                    y[16 + j] = (np.int64(y[16 + j]) | m2) & 0xFF
                y[48 + n // 2 + j] = (l1 | (l2 << 4)) & 0xFF
            m1 <<= 2
            m2 <<= 2


@njit
def k4_ref_block(x, y, L, Laux, weights, scales, mins, Ls, Lm, nmax):
    """Q4_K (``nmax`` 15: rmin -1, 20 steps) or Q5_K (31: rmin -0.5, 15 steps) ``_ref``."""
    max_scale = F0
    max_min = F0
    for j in range(8):
        xs = x[32 * j:32 * j + 32]
        sum_x2 = F0
        for l in range(32):
            sum_x2 += xs[l] * xs[l]
        av_x = np.sqrt(sum_x2 / F32)
        for l in range(32):
            weights[l] = av_x + abs(xs[l])
        if nmax == 15:
            sc, mn = make_qkx_quants(32, 15, xs, weights, L[32 * j:32 * j + 32], Laux, FM1, F01, 20, False, False)
        else:
            sc, mn = make_qkx_quants(32, 31, xs, weights, L[32 * j:32 * j + 32], Laux, FM05, F01, 15, False, False)
        scales[j] = sc
        mins[j] = mn
        if sc > max_scale:
            max_scale = sc
        if mn > max_min:
            max_min = mn
    inv_scale = F63 / max_scale if max_scale > F0 else F0
    inv_min = F63 / max_min if max_min > F0 else F0
    for j in range(8):
        Ls[j] = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)  # uint8_t, then MIN(63, .)
        Lm[j] = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
    _k4_pack_scales(y, Ls, Lm)
    store_f16(y, 0, fp32_to_fp16(max_scale / F63))
    store_f16(y, 2, fp32_to_fp16(max_min / F63))
    _k4_finish(x, y, L, nmax)


@njit
def k4_impl_block(x, qw, y, L, Laux, weights, scales, mins, sw, Ls, Lm, nmax):
    """Q4_K / Q5_K ``_impl`` with quant_weights (Q5_K's extra ``MIN(63, .)`` is a no-op on
    ``make_qp_quants``' codes, which are already ``MIN(63, .)``, or a wrapped uint8 in both)."""
    sigma2 = F2 * _sum_x2(x) / F256
    for j in range(8):
        xs = x[32 * j:32 * j + 32]
        for l in range(32):
            weights[l] = qw[32 * j + l] * np.sqrt(sigma2 + xs[l] * xs[l])
        s = F0
        for l in range(32):
            s += weights[l]
        sw[j] = s
        sc, mn = make_qkx_quants(32, nmax, xs, weights, L[32 * j:32 * j + 32], Laux, FM09, F005, 36, False, True)
        scales[j] = sc
        mins[j] = mn
    d_block = make_qp_quants(8, 63, scales, Ls, sw)
    m_block = make_qp_quants(8, 63, mins, Lm, sw)
    if nmax == 31:
        for j in range(8):
            Ls[j] = min(63, Ls[j])
            Lm[j] = min(63, Lm[j])
    _k4_pack_scales(y, Ls, Lm)
    store_f16(y, 0, fp32_to_fp16(d_block))
    store_f16(y, 2, fp32_to_fp16(m_block))
    _k4_finish(x, y, L, nmax)


# ---------------------------------------------------------------- Q6_K
# layout: ql[128]@0, qh[64]@128, scales[16] (int8)@192, d@208

@njit
def q6_k_block(x, qw, y, L, scales):
    max_scale = F0
    max_abs_scale = F0
    for ib in range(16):
        sc = make_qx_quants(16, 32, x[16 * ib:16 * ib + 16], L[16 * ib:16 * ib + 16],
                            qw[16 * ib:16 * ib + 16])
        scales[ib] = sc
        a = abs(sc)
        if a > max_abs_scale:
            max_abs_scale = a
            max_scale = sc
    if max_abs_scale < GROUP_MAX_EPS:
        for b in range(210):
            y[b] = 0
        store_f16(y, 208, fp32_to_fp16(F0))
        return
    iscale = FM128 / max_scale
    dh = fp32_to_fp16(F1 / iscale)
    store_f16(y, 208, dh)
    for ib in range(16):
        y[192 + ib] = min(127, nearest_int(iscale * scales[ib])) & 0xFF  # int8_t
    df = fp16_to_fp32(dh)
    for j in range(16):
        d = df * np.float32(i8(np.int64(y[192 + j])))
        if d == F0:
            continue
        for ii in range(16):
            l = nearest_int(x[16 * j + ii] / d)
            L[16 * j + ii] = max(-32, min(31, l)) + 32
    for j in range(0, QK_K, 128):
        ql = j // 2
        qh = 128 + j // 4
        for l in range(32):
            q1 = L[j + l] & 0xF
            q2 = L[j + l + 32] & 0xF
            q3 = L[j + l + 64] & 0xF
            q4 = L[j + l + 96] & 0xF
            y[ql + l] = q1 | (q3 << 4)
            y[ql + l + 32] = q2 | (q4 << 4)
            y[qh + l] = ((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4)
                         | ((L[j + l + 96] >> 4) << 6)) & 0xFF


# ---------------------------------------------------------------- row kernels
# ``qw`` is ``[0, cols]`` (no importance: the _ref encoder), ``[1, cols]`` (one vector for every
# row, as llama.cpp) or ``[rows, cols]`` (row r uses qw[r]).

@pjit
def rows_q2_k(x, qw, out):
    nb = x.shape[1] // QK_K
    for r in prange(x.shape[0]):
        L = np.empty(QK_K, np.int32)
        Laux = np.empty(16, np.int32)
        weight = np.empty(16, np.float32)
        scales = np.empty(16, np.float32)
        mins = np.empty(16, np.float32)
        sw = np.empty(16, np.float32)
        Ls = np.empty(16, np.int32)
        Lm = np.empty(16, np.int32)
        xr = x[r]
        yr = out[r]
        for b in range(nb):
            xb = xr[QK_K * b:QK_K * b + QK_K]
            yb = yr[84 * b:84 * b + 84]
            if qw.shape[0] == 0:
                q2_k_ref_block(xb, yb, L, Laux, weight, scales, mins)
            else:
                q = qw[qrow(qw, r)]
                q2_k_impl_block(xb, q[QK_K * b:QK_K * b + QK_K], yb, L, Laux, weight, scales, mins, sw, Ls, Lm)


@pjit
def rows_q3_k(x, qw, out):
    nb = x.shape[1] // QK_K
    for r in prange(x.shape[0]):
        L = np.empty(QK_K, np.int32)
        weight = np.empty(16, np.float32)
        scales = np.empty(16, np.float32)
        sw = np.empty(16, np.float32)
        Ls = np.empty(16, np.int32)
        xr = x[r]
        yr = out[r]
        for b in range(nb):
            xb = xr[QK_K * b:QK_K * b + QK_K]
            yb = yr[110 * b:110 * b + 110]
            if qw.shape[0] == 0:
                q3_k_ref_block(xb, yb, L, scales)
            else:
                q = qw[qrow(qw, r)]
                q3_k_impl_block(xb, q[QK_K * b:QK_K * b + QK_K], yb, L, weight, scales, sw, Ls)


@njit
def _rows_k4_body(x, qw, out, r, nmax, block_bytes):
    nb = x.shape[1] // QK_K
    L = np.empty(QK_K, np.int32)
    Laux = np.empty(32, np.int32)
    weights = np.empty(32, np.float32)
    scales = np.empty(8, np.float32)
    mins = np.empty(8, np.float32)
    sw = np.empty(8, np.float32)
    Ls = np.empty(8, np.int32)
    Lm = np.empty(8, np.int32)
    xr = x[r]
    yr = out[r]
    for b in range(nb):
        xb = xr[QK_K * b:QK_K * b + QK_K]
        yb = yr[block_bytes * b:block_bytes * b + block_bytes]
        if qw.shape[0] == 0:
            k4_ref_block(xb, yb, L, Laux, weights, scales, mins, Ls, Lm, nmax)
        else:
            q = qw[qrow(qw, r)]
            k4_impl_block(xb, q[QK_K * b:QK_K * b + QK_K], yb, L, Laux, weights, scales, mins, sw, Ls, Lm, nmax)


@pjit
def rows_q4_k(x, qw, out):
    for r in prange(x.shape[0]):
        _rows_k4_body(x, qw, out, r, 15, 144)


@pjit
def rows_q5_k(x, qw, out):
    for r in prange(x.shape[0]):
        _rows_k4_body(x, qw, out, r, 31, 176)


@pjit
def rows_q6_k(x, qw, out):
    nb = x.shape[1] // QK_K
    for r in prange(x.shape[0]):
        L = np.empty(QK_K, np.int32)
        scales = np.empty(16, np.float32)
        xr = x[r]
        yr = out[r]
        # without importance, the C's make_qx_quants weighs each element by its square
        q = qw[qrow(qw, r)] if qw.shape[0] != 0 else xr * xr
        for b in range(nb):
            q6_k_block(xr[QK_K * b:QK_K * b + QK_K], q[QK_K * b:QK_K * b + QK_K],
                       yr[210 * b:210 * b + 210], L, scales)


# ---------------------------------------------------------------- search kernels
# For *ranking* candidates (AWQ's scale and clip grids), not for the bytes of a file: every kernel
# above compiled a second time with ``make_qkx_quants`` (the scale search of Q2_K, Q4_K, Q5_K,
# Q4_1 and Q5_1) replaced by :func:`make_qkx_quants_lanes`. Same flags (no ``fastmath``), so
# these are as deterministic as the exact kernels, on every machine. The clones have their own
# qualified names (``<name>__search``), hence their own cache files, and call each other.


def _search_kernels() -> dict:
    scope = dict(globals())
    out = {}
    for name, f in list(globals().items()):
        if not isinstance(f, numba.core.registry.CPUDispatcher) or name.startswith("make_qkx_quants"):
            continue
        py = f.py_func
        clone = _pytypes.FunctionType(py.__code__, scope, name, py.__defaults__, py.__closure__)
        clone.__qualname__ = f"{name}__search"
        clone.__doc__ = py.__doc__
        out[name] = scope[name] = numba.njit(parallel=f.targetoptions.get("parallel", False), **JIT)(clone)
    scope["make_qkx_quants"] = make_qkx_quants_lanes
    return out


#: ``rows_*`` kernel name → its search kernel
SEARCH = {name: f for name, f in _search_kernels().items() if name.startswith("rows_")}


# ---------------------------------------------------------------- decoders
# ``dequantize_row_q{2,3,4,5,6}_K`` of ggml-quants.c: the values of encoded rows, in float32 as the C
# computes them (``d * sc`` first, then times the code, minus ``dmin * m``). For AWQ's ranking of
# candidates (the search kernels' bytes → values without a round trip through torch tensors).


@njit
def _scale_min_k4(y, j):
    if j < 4:
        return np.int64(y[4 + j]) & 63, np.int64(y[4 + j + 4]) & 63
    sc = (np.int64(y[4 + j + 4]) & 0xF) | ((np.int64(y[4 + j - 4]) >> 6) << 4)
    m = (np.int64(y[4 + j + 4]) >> 4) | ((np.int64(y[4 + j]) >> 6) << 4)
    return sc, m


@njit
def _k45_values(y, out, five):
    d = fp16_to_fp32(np.int64(y[0]) | (np.int64(y[1]) << 8))
    dmin = fp16_to_fp32(np.int64(y[2]) | (np.int64(y[3]) << 8))
    qs = 48 if five else 16
    for j in range(4):
        sc1, m1 = _scale_min_k4(y, 2 * j)
        sc2, m2 = _scale_min_k4(y, 2 * j + 1)
        d1 = d * np.float32(sc1)
        d2 = d * np.float32(sc2)
        mm1 = dmin * np.float32(m1)
        mm2 = dmin * np.float32(m2)
        for l in range(32):
            b = np.int64(y[qs + 32 * j + l])
            q1 = b & 0xF
            q2 = b >> 4
            if five:
                h = np.int64(y[16 + l])
                q1 += 16 if h & (1 << (2 * j)) else 0
                q2 += 16 if h & (2 << (2 * j)) else 0
            out[64 * j + l] = d1 * np.float32(q1) - mm1
            out[64 * j + 32 + l] = d2 * np.float32(q2) - mm2


@njit
def _q6_k_values(y, out):
    d = fp16_to_fp32(np.int64(y[208]) | (np.int64(y[209]) << 8))
    for n in range(2):
        ql = 64 * n
        qh = 128 + 32 * n
        sc = 192 + 8 * n
        for l in range(32):
            s = l // 16
            h = np.int64(y[qh + l])
            a = np.int64(y[ql + l])
            b = np.int64(y[ql + l + 32])
            q1 = ((a & 0xF) | ((h & 3) << 4)) - 32
            q2 = ((b & 0xF) | (((h >> 2) & 3) << 4)) - 32
            q3 = ((a >> 4) | (((h >> 4) & 3) << 4)) - 32
            q4 = ((b >> 4) | (((h >> 6) & 3) << 4)) - 32
            o = 128 * n + l
            out[o] = d * np.float32(i8(np.int64(y[sc + s]))) * np.float32(q1)
            out[o + 32] = d * np.float32(i8(np.int64(y[sc + s + 2]))) * np.float32(q2)
            out[o + 64] = d * np.float32(i8(np.int64(y[sc + s + 4]))) * np.float32(q3)
            out[o + 96] = d * np.float32(i8(np.int64(y[sc + s + 6]))) * np.float32(q4)


@njit
def _low2_codes(y, qs, codes):
    """The 2-bit codes of Q2_K's and Q3_K's ``qs[64]`` (at ``y[qs]``) in value order: 128-value
    halves of 32 bytes, four 2-bit planes each, every plane two runs of 16 bytes."""
    o = 0
    for n in range(2):
        for j in range(4):
            for i in range(32):
                codes[o] = (np.int64(y[qs + 32 * n + i]) >> (2 * j)) & 3
                o += 1


@njit
def _q2_k_values(y, out, codes):
    d = fp16_to_fp32(np.int64(y[80]) | (np.int64(y[81]) << 8))
    dmin = fp16_to_fp32(np.int64(y[82]) | (np.int64(y[83]) << 8))
    _low2_codes(y, 16, codes)
    for s in range(16):
        sc = np.int64(y[s])
        dl = d * np.float32(sc & 0xF)
        ml = dmin * np.float32(sc >> 4)
        for l in range(16):
            out[16 * s + l] = dl * np.float32(codes[16 * s + l]) - ml


@njit
def _q3_k_scale(y, j):
    g = j // 4
    k = j % 4
    hi = np.int64(y[104 + k])
    if g == 0:
        v = (np.int64(y[96 + k]) & 0xF) | ((hi & 3) << 4)
    elif g == 1:
        v = (np.int64(y[100 + k]) & 0xF) | (((hi >> 2) & 3) << 4)
    elif g == 2:
        v = (np.int64(y[96 + k]) >> 4) | (((hi >> 4) & 3) << 4)
    else:
        v = (np.int64(y[100 + k]) >> 4) | (((hi >> 6) & 3) << 4)
    return v - 32


@njit
def _q3_k_values(y, out, codes):
    d = fp16_to_fp32(np.int64(y[108]) | (np.int64(y[109]) << 8))
    _low2_codes(y, 32, codes)
    for s in range(16):
        dl = d * np.float32(_q3_k_scale(y, s))
        m = 1 << (s // 2)  # the hmask bit of this plane
        for l in range(16):
            i = 16 * (s % 2) + l
            h = 0 if np.int64(y[i]) & m else 4
            out[16 * s + l] = dl * np.float32(codes[16 * s + l] - h)


@pjit
def values_k(raw, out, kind):
    """Rows of Q2_K … Q6_K blocks (``kind`` 2 … 6) → float32 values."""
    nbytes = (84, 110, 144, 176, 210)[kind - 2]
    nb = raw.shape[1] // nbytes
    for r in prange(raw.shape[0]):
        codes = np.empty(QK_K, np.int64)
        for b in range(nb):
            y = raw[r, nbytes * b:nbytes * b + nbytes]
            o = out[r, QK_K * b:QK_K * b + QK_K]
            if kind == 6:
                _q6_k_values(y, o)
            elif kind == 2:
                _q2_k_values(y, o, codes)
            elif kind == 3:
                _q3_k_values(y, o, codes)
            else:
                _k45_values(y, o, kind == 5)
