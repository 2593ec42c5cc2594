"""llama.cpp's scale searches (``ggml-quants.c``), vectorised over rows in torch, bit-exact.

Each function works on ``x`` ``[B, n]`` (B independent groups of n values) and reproduces the
C code's float32 arithmetic: sums run sequentially in index order (a Python loop over the n
positions, vectorised over B), candidates are tried in the C order with the same strict
running-best tests, and constants are formed in float32 (``docs/llama-cpp-reference.md`` §0, §2).
"""

from __future__ import annotations

import numpy as np
import torch

EPS = 1e-15  # GROUP_MAX_EPS


def _f32(v: float) -> float:
    return float(np.float32(v))


def _seq_sum(t: torch.Tensor, from_zero: bool = True) -> torch.Tensor:
    """Sum over the last dim one element at a time, in index order (C's ``for (...) s += t[i]``)."""
    acc = torch.zeros_like(t[..., 0]) + t[..., 0] if from_zero else t[..., 0].clone()
    for i in range(1, t.shape[-1]):
        acc = acc + t[..., i]
    return acc


def _sqrtf(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (C ``sqrtf``). torch's vectorised CPU ``sqrt`` is off by
    one ulp for about a fifth of inputs; the float64 root rounded to float32 is exact."""
    return torch.sqrt(t.double()).float()


def _running_max(t: torch.Tensor) -> torch.Tensor:
    """C's ``m = 0; if (v > m) m = v`` over the last dim: +0.0 (never -0.0) when nothing is positive."""
    mx = t.amax(-1)
    return torch.where(mx > 0, mx, torch.zeros_like(mx))


def _full(like: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full_like(like, value)


def make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale, min (``the_min`` ≥ 0) and codes of each row of ``x`` ``[B, n]``; the error is
    ``Σ w |diff|`` with ``use_mad``, else ``Σ w diff²``."""

    def dist(diff: torch.Tensor) -> torch.Tensor:
        return diff.abs() if use_mad else diff * diff

    mn = torch.clamp(x.amin(-1), max=0.0)
    mx = x.amax(-1)
    sum_w = _seq_sum(w, from_zero=False)
    sum_x = _seq_sum(w * x, from_zero=False)
    same = mx == mn
    rng = torch.where(same, torch.ones_like(mx), mx - mn)
    xm = x - mn[:, None]
    iscale = _full(mx, float(nmax)) / rng
    scale = torch.ones_like(iscale) / iscale
    L = torch.clamp(torch.round(iscale[:, None] * xm), 0, nmax)
    diff = (scale[:, None] * L + mn[:, None]) - x
    best = _seq_sum(w * dist(diff))
    cur_min = mn.clone()
    for step in range(nstep + 1):
        # llama.cpp keeps searching from the *accepted* min: an accepted candidate moves the
        # origin and range of every later one (`min = this_min` inside the loop)
        c = _f32(_f32(_f32(rmin) + _f32(_f32(rdelta) * np.float32(step))) + np.float32(nmax))
        rng = torch.where(same, torch.ones_like(mx), mx - cur_min)
        isc = _full(mx, c) / rng
        lc = torch.clamp(torch.round(isc[:, None] * (x - cur_min[:, None])), 0, nmax)
        wl = w * lc
        sum_l = _seq_sum(wl)
        sum_l2 = _seq_sum(wl * lc)
        sum_xl = _seq_sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = torch.where(ok, D, torch.ones_like(D))
        s = (sum_w * sum_xl - sum_x * sum_l) / Ds
        m = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = m > 0
        s = torch.where(pos, sum_xl / torch.where(sum_l2 != 0, sum_l2, torch.ones_like(sum_l2)), s)
        m = torch.where(pos, torch.zeros_like(m), m)
        d2 = (s[:, None] * lc + m[:, None]) - x
        err = _seq_sum(w * dist(d2))
        take = ok & (err < best) & ~same
        L = torch.where(take[:, None], lc, L)
        best = torch.where(take, err, best)
        scale = torch.where(take, s, scale)
        cur_min = torch.where(take, m, cur_min)
    L = torch.where(same[:, None], torch.zeros_like(L), L)
    scale = torch.where(same, torch.zeros_like(scale), scale)
    return scale, -cur_min, L.to(torch.int32)


def make_qx_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric scale and codes (``L`` in ``0..2*nmax-1``) of each row of ``x`` (``rmse_type=1``:
    weights ``qw``, or ``x²`` without)."""
    first = x.abs().argmax(-1, keepdim=True)
    mx = x.gather(-1, first).squeeze(-1)
    zero = mx.abs() < EPS
    den = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x if qw is None else qw
    wx = w * x

    def attempt(c: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        iscale = _full(mx, c) / den
        lc = torch.clamp(torch.round(iscale[:, None] * x), -nmax, nmax - 1)
        return lc, _seq_sum(wx * lc), _seq_sum((w * lc) * lc)

    lc, sumlx, suml2 = attempt(float(-nmax))
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, torch.ones_like(suml2)),
                        torch.zeros_like(sumlx))
    best = scale * sumlx
    L = lc
    for step in range(-9, 10):
        if step == 0:
            continue
        c = -_f32(np.float32(nmax) + _f32(np.float32(0.1) * np.float32(step)))
        lc, sumlx, suml2 = attempt(c)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(take[:, None], lc, L)
        new_scale = sumlx / torch.where(suml2 != 0, suml2, torch.ones_like(suml2))
        scale = torch.where(take, new_scale, scale)
        best = torch.where(take, scale * sumlx, best)
    L = torch.where(zero[:, None], torch.full_like(L, -nmax), L)  # all-zero: L = 0 after the +nmax below
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, (L + nmax).to(torch.int32)


def make_q3_quants(x: torch.Tensor, nmax: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Q3_K's symmetric search (``do_rmse``): start from ``-nmax/max``, then 5 coordinate-descent
    passes, sequential over positions. Scale and codes (``0..2*nmax-1``; 0 for an all-zero row)."""
    first = x.abs().argmax(-1, keepdim=True)
    mx = x.gather(-1, first).squeeze(-1)
    zero = mx.abs() < EPS
    iscale = _full(mx, float(-nmax)) / torch.where(zero, torch.ones_like(mx), mx)
    L = torch.clamp(torch.round(iscale[:, None] * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = _seq_sum(wx * L)
    suml2 = _seq_sum((w * L) * L)
    for _ in range(5):  # a pass that changes nothing leaves the state as it is, so no early exit is needed
        for i in range(x.shape[1]):
            li, wi, wxi, xi = L[:, i], w[:, i], wx[:, i], x[:, i]
            slx = sumlx - wxi * li
            sl2 = suml2 - (wi * li) * li
            pos = slx > 0
            new = torch.clamp(torch.round((xi * sl2) / torch.where(pos, slx, torch.ones_like(slx))), -nmax, nmax - 1)
            slx2 = slx + wxi * new
            sl22 = sl2 + (wi * new) * new
            take = pos & (new != li) & (sl22 > 0) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
            L[:, i] = torch.where(take, new, li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)),
                        torch.zeros_like(sumlx))
    L = torch.where(zero[:, None], torch.full_like(L, -nmax), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, (L + nmax).to(torch.int32)


def make_qp_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and codes of non-negative values (sub-block scales or mins) with weights ``qw``
    (the imatrix paths): a 9-candidate scale search, then 5 coordinate-descent passes."""
    mx = torch.clamp(x.amax(-1), min=0.0)
    zero = mx < EPS
    den = torch.where(zero, torch.ones_like(mx), mx)
    iscale = _full(mx, float(nmax)) / den
    L0 = (torch.round(iscale[:, None] * x).to(torch.int64) & 0xFF).to(torch.float32)  # uint8 L[i]
    scale = torch.ones_like(iscale) / iscale
    diff = x - scale[:, None] * L0
    best = _seq_sum((qw * diff) * diff)
    for step in range(-4, 5):
        if step == 0:
            continue
        c = _f32(_f32(np.float32(0.1) * np.float32(step)) + np.float32(nmax))
        isc = _full(mx, c) / den
        sc = torch.ones_like(isc) / isc
        lc = torch.clamp(torch.round(isc[:, None] * x), max=nmax)
        d2 = x - sc[:, None] * lc
        mse = _seq_sum((qw * d2) * d2)
        take = mse < best
        best = torch.where(take, mse, best)
        iscale = torch.where(take, isc, iscale)
    L = torch.clamp(torch.round(iscale[:, None] * x), max=nmax)
    wx = qw * x
    sumlx = _seq_sum(wx * L)
    suml2 = _seq_sum((qw * L) * L)
    for _ in range(5):
        for i in range(x.shape[1]):
            li, wi, wxi, xi = L[:, i], qw[:, i], wx[:, i], x[:, i]
            slx = sumlx - wxi * li
            sl2 = suml2 - (wi * li) * li
            ok = (slx > 0) & (sl2 > 0)
            new = torch.clamp(torch.round((xi * sl2) / torch.where(ok, slx, torch.ones_like(slx))), max=nmax)
            slx2 = slx + wxi * new
            sl22 = sl2 + (wi * new) * new
            take = ok & (new != li) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
            L[:, i] = torch.where(take, new, li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)),
                        torch.zeros_like(sumlx))
    L = torch.where(zero[:, None], torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L.to(torch.int64)
