"""QuIP#'s randomized Hadamard transforms on activations, in one Triton kernel per side: for
decoding, where the torch path (:meth:`quantfoundry.HadamardTransform.apply_input`: casts, a sign
product, a matmul per Kronecker factor) costs more launches than the GEMV itself.

A width ``n = m · P`` (``P = A · B`` a power of two, ``A, B`` in 16–128; ``m`` the dense Paley
factor, often 1) is viewed per row as ``m`` blocks ``X [A, B]``; Sylvester's ``H_P = H_A ⊗ H_B``
acts on a block as ``H_A X H_B`` — two tensor-core products with the ±1 matrices (TF32 for 16-bit
inputs: their values and the ±1 entries are exact there, the intermediate rounds to 11
significant bits; IEEE float32 for float32 inputs). The sign vector is applied inside the kernel
(before ``H`` on the input side, after on the output side), ``1/√n`` too; ``H_m`` (``m > 1``) is one
torch matmul along its axis. Other widths: ``None`` (the caller uses the torch path).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from quantfoundry.toolkit.hadamard import base_matrix, factor, hadamard_matrix


def split(n: int) -> tuple[int, int, int] | None:
    """``(m, A, B)`` for a width the kernel takes, else ``None``."""
    try:
        m, p = factor(n)
    except ValueError:
        return None
    if p < 256 or p > 16384:
        return None
    a = 1 << ((p.bit_length() - 1) // 2)
    return m, a, p // a


@functools.cache
def _sylvester(order: int, device: str) -> torch.Tensor:
    return hadamard_matrix(order).to(device=device, dtype=torch.float32).contiguous()  # m = 1: Sylvester's


@functools.cache
def _base(m: int, transpose: bool, device: str) -> torch.Tensor:
    h = base_matrix(m)
    return (h.T if transpose else h).to(device=device, dtype=torch.float32).contiguous()


@triton.jit
def _rht_rows(x_ptr, y_ptr, s_ptr, ha_ptr, hb_ptr, M_BASE, scale, A: tl.constexpr, B: tl.constexpr,
              PRE: tl.constexpr, IEEE: tl.constexpr):
    r = tl.program_id(0)  # one block of A·B values: row r // M_BASE, block r % M_BASE
    ia = tl.arange(0, A)
    ib = tl.arange(0, B)
    off = ia[:, None] * B + ib[None, :]
    x = tl.load(x_ptr + r * (A * B) + off).to(tl.float32)
    s = tl.load(s_ptr + (r % M_BASE) * (A * B) + off)
    if PRE:
        x = x * s
    ha = tl.load(ha_ptr + ia[:, None] * A + ia[None, :])
    hb = tl.load(hb_ptr + ib[:, None] * B + ib[None, :])
    if IEEE:
        t = tl.dot(ha, x, input_precision="ieee")
        y = tl.dot(t, hb, input_precision="ieee")
    else:
        t = tl.dot(ha, x, input_precision="tf32")
        y = tl.dot(t, hb, input_precision="tf32")
    y = y * scale
    if not PRE:
        y = y * s
    tl.store(y_ptr + r * (A * B) + off, y.to(y_ptr.dtype.element_ty))


def rht(x: torch.Tensor, signs: torch.Tensor, *, inverse: bool, interpreting: bool = False) -> torch.Tensor | None:
    """``x Qᵀ`` (``inverse=False``: the input side) or ``x Q`` (``inverse``: the output side) over
    the last dimension for ``Q = H · diag(signs) / √n`` — :class:`quantfoundry.toolkit.hadamard.RandomHadamard`'s
    ``apply`` / ``apply_t`` — in ``x``'s dtype; ``None`` for a width the kernel does not take."""
    n = x.shape[-1]
    parts = split(n)
    if parts is None or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    m, a, b = parts
    lead = x.shape[:-1]
    dev = str(x.device)
    rows = x.reshape(-1, n)
    if m > 1 and inverse:  # x Q = (x H) ⊙ s: H_mᵀ on the block axis first (H = H_m ⊗ H_P, H_P symmetric)
        rows = torch.matmul(_base(m, True, dev), rows.reshape(-1, m, a * b).to(torch.float32)).reshape(-1, n)
    rows = rows.contiguous()
    out = torch.empty(rows.shape, device=x.device, dtype=x.dtype if m == 1 or inverse else torch.float32)
    ieee = x.dtype == torch.float32 or interpreting
    _rht_rows[(rows.numel() // (a * b),)](rows, out, signs.to(device=x.device, dtype=torch.float32).contiguous(),
                                          _sylvester(a, dev), _sylvester(b, dev), m, 1.0 / math.sqrt(n), A=a, B=b,
                                          PRE=not inverse, IEEE=ieee, num_warps=8)
    if m > 1 and not inverse:  # x Qᵀ = H (s ⊙ x): H_m on the block axis last
        out = torch.matmul(_base(m, False, dev), out.reshape(-1, m, a * b)).to(x.dtype)
    return out.reshape(*lead, n)
