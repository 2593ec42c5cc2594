"""The element-wise ends of a W8A8 linear on CUDA as two Triton kernels, around PyTorch's own
GEMMs (the GEMM is never written here):

- :func:`quantize_rows` — one pass over the input: per-token absmax and scale (dynamic schemes)
  and the codes, bit for bit :meth:`~quantfoundry.ActQuant.quantize_dynamic` /
  :meth:`~quantfoundry.ActQuant.quantize` (IEEE divisions, round half to even, saturation);
- :func:`rescale` — ``y = acc · s_x · s_w (+ bias)`` from the int32/float32 accumulator into the
  input's dtype.

As torch ops the same work is six to ten kernels, each a round trip through memory; at the
token counts of decoding that is most of a W8A8 linear's time (``docs/benchmarks.md``).
``triton`` comes with PyTorch's CUDA wheels; with ``TRITON_INTERPRET=1`` the kernels run on CPU
tensors (the tests check them there against :class:`~quantfoundry.ActQuant`).
"""

from __future__ import annotations

import torch

from ..roles.activation import FP8_MIN_SCALE, ActQuant

BLOCK = 1024  # input values per step of a row

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU wheels without triton
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:  # (``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates)

    @triton.jit
    def round_even(y):
        # round half to even, exactly (no libdevice: the interpreter has none)
        f = tl.floor(y)
        d = y - f
        odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
        return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)

    @triton.jit
    def round_e4m3(y):
        # y (|y| <= 448) onto the e4m3 grid, to nearest even: the step of y's binade is
        # 2^(e - 3), with e >= -6 (subnormals step by 2^-9); y / step is exact, and the
        # cast that follows is exact whatever rounding the conversion does
        e = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        e = tl.maximum(e, -6)
        step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
        r = round_even(y / step) * step
        return tl.where(r == 0.0, y * 0.0, r)  # the sign of a zero as the cast keeps it

    @triton.jit
    def quant_rows(x_ptr, q_ptr, s_ptr, static_ptr, K, stride_x, stride_q, min_scale,
                   INT8: tl.constexpr, DYNAMIC: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        xr = x_ptr + row * stride_x
        qr = q_ptr + row * stride_q
        cols = tl.arange(0, BLOCK)
        if DYNAMIC:
            peak = tl.zeros((BLOCK,), dtype=tl.float32)
            for start in range(0, K, BLOCK):
                v = tl.load(xr + start + cols, mask=start + cols < K, other=0.0).to(tl.float32)
                peak = tl.maximum(peak, tl.abs(v))
            a = tl.max(peak, axis=0)
            if INT8:  # s = max/127; codes of x · (127 / max), a zero row gives codes 0
                s = tl.math.div_rn(a, 127.0)
                mult = tl.where(a > 0, tl.math.div_rn(a * 0.0 + 127.0, tl.where(a > 0, a, 1.0)), 0.0)
            else:  # s = max(max/448, 1/(448·512)); codes of x / s
                s = tl.maximum(tl.math.div_rn(a, 448.0), min_scale)
                mult = s
            tl.store(s_ptr + row, s)
        else:
            s = tl.load(static_ptr)
            if INT8:  # codes of x / s
                mult = s
            else:  # codes of x · (1 / s)
                mult = tl.math.div_rn(s * 0.0 + 1.0, s)
        for start in range(0, K, BLOCK):
            m = start + cols < K
            v = tl.load(xr + start + cols, mask=m, other=0.0).to(tl.float32)
            if INT8:
                if DYNAMIC:
                    y = v * mult
                else:
                    y = tl.math.div_rn(v, mult)
                y = tl.minimum(tl.maximum(round_even(y), -128.0), 127.0)
                tl.store(qr + start + cols, y.to(tl.int8), mask=m)
            else:
                if DYNAMIC:
                    y = tl.math.div_rn(v, mult)
                else:
                    y = v * mult
                y = round_e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0))
                tl.store(qr + start + cols, y.to(tl.float8e4nv), mask=m)

    @triton.jit
    def rescale_acc(acc_ptr, sx_ptr, sw_ptr, b_ptr, y_ptr, M, N, stride_acc, stride_y,
                    SX_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        rm, cm = rows < M, cols < N
        mask = rm[:, None] & cm[None, :]
        r64 = rows.to(tl.int64)
        acc = tl.load(acc_ptr + r64[:, None] * stride_acc + cols[None, :], mask=mask, other=0).to(tl.float32)
        if SX_ROWS:
            sx = tl.load(sx_ptr + rows, mask=rm, other=0.0)
        else:
            sx = tl.load(sx_ptr + rows * 0)
        sw = tl.load(sw_ptr + cols, mask=cm, other=0.0)
        y = acc * sx[:, None] * sw[None, :]
        if HAS_BIAS:
            y = y + tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + r64[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def quantize_rows(x: torch.Tensor, act: ActQuant, scale: torch.Tensor | None = None,
                  min_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[max(M, min_rows), K]`` (int8 or float8_e4m3fn) of the rows of ``x`` ``[M, K]``
    and their scales: ``[M, 1]`` float32 per token (dynamic), else the static ``scale`` as
    ``[1, 1]``. Rows past ``M`` (padding for ``torch._int_mm``) are left unwritten."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, n_in = x.shape
    dtype = torch.int8 if act.dtype == "int8" else torch.float8_e4m3fn
    codes = torch.empty(max(m, min_rows), n_in, dtype=dtype, device=x.device)
    if act.dynamic:
        sx = torch.empty(m, 1, dtype=torch.float32, device=x.device)
        static = sx  # unused
    else:
        if scale is None:
            raise ValueError(f"the static activation scheme {act.spec} needs its calibrated scale")
        sx = static = scale.to(device=x.device, dtype=torch.float32).reshape(1, 1)
    if m:
        quant_rows[(m,)](x, codes, sx, static, n_in, x.stride(0), codes.stride(0), FP8_MIN_SCALE,
                         INT8=act.dtype == "int8", DYNAMIC=act.dynamic, BLOCK=min(BLOCK, _pow2(n_in)))
    return codes, sx


def rescale(acc: torch.Tensor, rows: int, sx: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None,
            dtype: torch.dtype) -> torch.Tensor:
    """``acc[:rows] · s_x · s_w (+ bias)`` in ``dtype``: ``acc`` the GEMM's int32/float32
    ``[≥rows, N]``, ``s_x`` ``[rows, 1]`` or ``[1, 1]``, ``s_w`` ``[1, N]``, computed in float32."""
    n = acc.shape[1]
    y = torch.empty(rows, n, dtype=dtype, device=acc.device)
    if rows:
        bm, bn = 16, 128
        grid = ((rows + bm - 1) // bm, (n + bn - 1) // bn)
        rescale_acc[grid](acc, sx, sw.reshape(-1), y if bias is None else bias, y, rows, n, acc.stride(0),
                           y.stride(0), SX_ROWS=sx.numel() > 1,
                           HAS_BIAS=bias is not None, BM=bm, BN=bn)
    return y


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()
