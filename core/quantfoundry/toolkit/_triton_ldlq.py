"""One lazy batch of the LDLQ (GPTQ) column loop in one Triton kernel (CUDA), for affine grids.

On a GPU the plain loop costs some twenty tiny kernel launches per column, so a 1B model's
quarter-million columns are launch-bound. Rows are independent in GPTQ, so each program takes
``BLOCK_R`` rows and keeps the batch's ``[n, BLOCK_R]`` weights in registers; for each column
``i``: ``q = clamp(rint((w_i − b_i) / a_i), cmin, cmax)`` (the format's :meth:`~Format.affine`
grid), ``v = a_i q + b_i``, ``e = (w_i − v) / U_ii``, and the batch's later columns get
``w_k −= e · U_ik``. It writes codes, values and errors; the caller applies the batch's error
to the columns after it with one matmul, as the plain loop does.
"""

from __future__ import annotations

import torch

try:  # triton ships with CUDA builds of torch; CPU-only machines run the plain loop
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _rint(y):
        """Round half to even, as ``torch.round`` (``y − floor(y)`` is exact below 2²³)."""
        f = tl.floor(y)
        d = y - f
        return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + (f - 2.0 * tl.floor(f * 0.5))))

    @triton.jit
    def _gptq_batch(w_ptr, u_ptr, a_ptr, b_ptr, lo_ptr, hi_ptr, q_ptr, v_ptr, e_ptr,
                    rows, ldu, n: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = r < rows
        k = tl.arange(0, BLOCK)
        kmask = k < n
        w = tl.load(w_ptr + k[:, None] * rows + r[None, :], mask=kmask[:, None] & rmask[None, :], other=0.0)
        lo = tl.load(lo_ptr + r, mask=rmask, other=0.0)
        hi = tl.load(hi_ptr + r, mask=rmask, other=0.0)
        for i in range(n):
            x = tl.sum(tl.where(k[:, None] == i, w, 0.0), axis=0)
            a = tl.load(a_ptr + i * rows + r, mask=rmask, other=1.0)
            b = tl.load(b_ptr + i * rows + r, mask=rmask, other=0.0)
            nz = a != 0.0
            q = _rint((x - b) / tl.where(nz, a, 1.0))
            q = tl.minimum(tl.maximum(tl.where(nz, q, lo), lo), hi)
            v = a * q + b
            d = tl.load(u_ptr + i * ldu + i)
            err = (x - v) / d
            urow = tl.load(u_ptr + i * ldu + k, mask=kmask & (k > i), other=0.0)
            w = w - urow[:, None] * err[None, :]
            tl.store(q_ptr + i * rows + r, q.to(tl.int32), mask=rmask)
            tl.store(v_ptr + i * rows + r, v, mask=rmask)
            tl.store(e_ptr + i * rows + r, err, mask=rmask)


def gptq_batch(w1: torch.Tensor, u1: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lo: torch.Tensor,
               hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, values and scaled errors ``[n, rows]`` of one batch.

    :param w1: the batch's weights, transposed and contiguous, ``[n, rows]`` float32.
    :param u1: the batch's block of the upper Cholesky factor ``[n, n]`` (unit column stride).
    :param a: grid slopes ``[n, rows]``; ``b``: grid offsets ``[n, rows]``.
    :param lo: smallest code per row ``[rows]`` (float32); ``hi``: largest.
    """
    n, rows = w1.shape
    if not (w1.is_contiguous() and a.is_contiguous() and b.is_contiguous() and u1.stride(1) == 1):
        raise ValueError("gptq_batch needs contiguous w1, a, b and a unit column stride in u1")
    q = torch.empty(n, rows, dtype=torch.int32, device=w1.device)
    v = torch.empty_like(w1)
    e = torch.empty_like(w1)
    block = max(16, triton.next_power_of_2(n))
    block_r = 32 if block <= 128 else 16
    grid = (triton.cdiv(rows, block_r),)
    _gptq_batch[grid](w1, u1, a, b, lo, hi, q, v, e, rows, u1.stride(0), n=n, BLOCK=block, BLOCK_R=block_r,
                      num_warps=4)
    return q, v, e
