"""The quantizer ``hqq``: Half-Quadratic Quantization (Badri & Shaji, 2023), no calibration data.

For every group of an affine grid (``value = scale · (code − zero)``), HQQ keeps the scale and
moves the zero point to minimise an ``lp`` norm (``p < 1``: robust to the few large errors) of
the quantization error, by half-quadratic splitting — alternating, for ``iters`` rounds, over
all groups of the tensor at once::

    Wq = clamp(round(W / s + z), qmin, qmax)            # codes on the current grid
    We = shrink_p(W − s·(Wq − z), β)                      # the error's sparse part
    z  = mean_group(Wq − (W − We) / s)                    # closed-form zero point
    β  = κ · β

with ``shrink_p(x, β) = sign(x) · relu(|x| − |x|^(p−1) / β)``, stopping early once the mean
absolute error ``|W − s·(Wq − z)|`` over the tensor stops improving (the hqq library's
``optimize_weights_proximal_legacy``, defaults ``p = 0.7``, ``β = 10``, ``κ = 1.01``, 20
rounds). The zero points go back to the format through ``Format.params_from_affine``: on a
grid with float zero points (``int4-g64-zf16``) exactly as optimised, on an integer one
(``int4-g64``) rounded — HQQ then loses most of its gain (measured in docs/benchmarks.md).

``optimize_scale`` frees the scale too (least squares of ``a·Wq + b`` on the shrunk weights
each round). Lookup grids with one scale per group (``nf4``, ``fp4``: ``Format.scaled_levels``)
have no zero point: there HQQ optimises the scale — nearest level, shrink, least-squares scale
— and hands it back through ``Format.params_from_scale``; bitsandbytes' absmax is the start.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import quantfoundry as qf
import torch
from quantfoundry.toolkit import affine_grid


@dataclass(frozen=True, kw_only=True)
class HQQOptions(qf.Options):
    lp_norm: float = field(default=0.7, metadata={"help": "p of the lp-norm shrinkage (0 < p <= 1)"})
    beta: float = field(default=10.0, metadata={"help": "initial half-quadratic penalty"})
    kappa: float = field(default=1.01, metadata={
        "help": "growth of beta per round (>= 1; the paper's schedule 1.01, the hqq library 0.2.8 keeps beta: 1)"})
    iters: int = field(default=20, metadata={"help": "rounds at most"})
    early_stop: bool = field(default=True, metadata={"help": "stop once the mean absolute error stops improving"})
    init: str = field(default="format", metadata={
        "help": "starting grid on affine grids: format (the format's own fit: int widens each group's range to "
                "include 0) or minmax (each group's own min and max, as the paper and the hqq library start; "
                "needs a free zero point)"})
    cuda_loop: str = field(default="triton", metadata={
        "help": "the zero-point rounds on CUDA: triton (two fused kernels a round, replayed from a CUDA graph per "
                "weight shape; graph when triton cannot be imported), graph (the rounds as torch operations in a "
                "CUDA graph), eager (the CPU loop: a host sync a round)"})
    optimize_scale: bool = field(default=False, metadata={
        "help": "affine grids: fit the scale with the zero point (least squares on the shrunk weights); "
                "lookup grids (nf4, fp4) always optimise their scale"})

    def __post_init__(self) -> None:
        if not 0 < self.lp_norm <= 1:
            raise ValueError(f"lp_norm must be in (0, 1], got {self.lp_norm}")
        if self.beta <= 0 or self.kappa < 1:
            raise ValueError(f"beta must be > 0 and kappa >= 1, got beta={self.beta}, kappa={self.kappa}")
        if self.iters < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")
        if self.cuda_loop not in ("triton", "graph", "eager"):
            raise ValueError(f"cuda_loop must be triton, graph or eager, got {self.cuda_loop!r}")
        if self.init not in ("minmax", "format"):
            raise ValueError(f"init must be minmax or format, got {self.init!r}")


def shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The generalised soft-thresholding of the lp norm (p = 1: plain soft thresholding)."""
    if p == 1:
        return torch.sign(x) * torch.relu(x.abs() - 1.0 / beta)
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * torch.pow(x.abs() + 1e-8, p - 1))


def optimize_zero(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int,
                  o: HQQOptions) -> torch.Tensor:
    """HQQ's zero points for groups ``w`` ``[..., g]`` with ``scale``/``zero`` ``[..., 1]``.

    The rounds above, in code units: with ``u = W/s + z``, ``Wq = clamp(round(u))`` and
    ``d = u − Wq`` (so ``W − s·(Wq − z) = s·d``), the update ``mean(Wq − (W − We)/s)`` with
    ``We = shrink_p(s·d, β)`` is exactly ``z − mean(clamp(d, −t, t))``, where
    ``t = (s·|d| + 1e-8)^(p−1) / (β·s)`` (the soft-threshold written as a clamp). ``t ≥ |d|``
    — nothing shrunk, the update is ``z − mean(d)`` — holds for a whole group when it holds
    for the group's largest ``|d|`` (``t`` falls as ``|d|`` grows), which one ``pow`` per group
    decides; only the other groups pay for an element-wise ``pow`` (all groups, in place, once
    more than an eighth of them need it). (With the paper's ``β = 10``
    that is nearly every group of a trained weight: ``t`` stays above ``|d|`` until
    ``s·|d| ≈ 0.17``.) The result is the textbook loop's (:func:`shrink`; the tests compare).
    On CUDA the same rounds run without host syncs — fused Triton kernels, or torch operations,
    replayed from a CUDA graph (:mod:`qf_hqq.cuda_loop`)."""
    if w.is_cuda and o.cuda_loop != "eager":
        from .cuda_loop import optimize_zero_cuda

        return optimize_zero_cuda(w, scale, zero, qmin, qmax, o)
    inv = 1.0 / scale
    v = w * inv  # W / s: constant over the rounds
    u, a = torch.empty_like(v), torch.empty_like(v)
    g = v.shape[-1]
    zero = zero.clone()
    beta, best = o.beta, float("inf")
    for _ in range(o.iters):
        torch.add(v, zero, out=u)
        torch.sub(u, torch.round(u, out=a).clamp_(qmin, qmax), out=u)  # d = u - Wq
        torch.abs(u, out=a)
        error = float((a.mean(-1, keepdim=True) * scale).mean())  # mean |W - s(Wq - z)|, before the update
        step = u.mean(-1, keepdim=True)
        y = a.amax(-1, keepdim=True) * scale
        shrunk = (beta * y > (y + 1e-8).pow(o.lp_norm - 1)).reshape(-1)
        n_shrunk = int(shrunk.sum())
        if n_shrunk > shrunk.numel() // 8:  # many groups: the dense pass beats gathering them
            a.mul_(scale).add_(1e-8).pow_(o.lp_norm - 1).mul_(inv / beta)  # t
            step = torch.minimum(u.abs(), a, out=a).copysign_(u).mean(-1, keepdim=True)
        elif n_shrunk:
            d = u.reshape(-1, g)[shrunk]
            sg = scale.reshape(-1, 1)[shrunk]
            t = (sg * d.abs() + 1e-8).pow_(o.lp_norm - 1).div_(beta * sg)
            step.view(-1)[shrunk] = torch.minimum(d.abs(), t).copysign_(d).mean(-1)
        zero.sub_(step)
        beta *= o.kappa
        if error < best:
            best = error
        elif o.early_stop:
            break
    return zero


def minmax_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ's starting grid: each group's own min and max on the end codes (``value =
    scale · (code − zero)``), as the paper and the hqq library start — not widened to include 0
    as the ``int`` format's fit is. A group whose range is below 1e-4, or whose scale would fall
    below 5e-5 (the library's guards, against huge zero points), keeps ``scale``/``zero``."""
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    s = (hi - lo) / (qmax - qmin)
    ok = ((hi - lo) > 1e-4) & (s >= 5e-5)
    s = torch.where(ok, s, scale)
    return s, torch.where(ok, qmin - lo / s, zero)


def _shrunk_part(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """``shrink(x, β, p)`` for groups ``x`` ``[n, g]``, the element-wise ``pow`` only in groups
    where it can act (``|x|^(p−1)/β`` falls as ``|x|`` grows: a group whose largest ``|x|``
    is not past it has nothing shrunk)."""
    out = torch.zeros_like(x)
    y = x.abs().amax(-1, keepdim=True)
    acts = (beta * y > (y + 1e-8).pow(p - 1)).reshape(-1)
    if bool(acts.any()):
        out[acts] = shrink(x[acts], beta, p)
    return out


def optimize_scale_affine(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int,
                          o: HQQOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ with the scale free too: each round fits ``W − We ≈ a·Wq + b`` per group by least
    squares (``s = a``, ``z = −b/a``; a group whose codes are all equal keeps its scale).
    Groups ``w`` ``[n, g]``, ``scale``/``zero`` ``[n, 1]``. Returns the best ``(scale, zero)``
    seen (by the mean absolute error)."""
    beta, best = o.beta, float("inf")
    best_sz = (scale, zero)
    for _ in range(o.iters):
        wq = torch.clamp(torch.round(w / scale + zero), qmin, qmax)
        x = w - (wq - zero) * scale
        error = float(x.abs().mean())
        if error < best:
            best, best_sz = error, (scale, zero)
        elif o.early_stop:
            break
        target = w - _shrunk_part(x, beta, o.lp_norm)
        mq, mt = wq.mean(-1, keepdim=True), target.mean(-1, keepdim=True)
        var = ((wq - mq) ** 2).sum(-1, keepdim=True)
        a = ((wq - mq) * (target - mt)).sum(-1, keepdim=True) / var.clamp(min=1e-30)
        ok = (var > 0) & (a > 0) & torch.isfinite(a)
        scale = torch.where(ok, a, scale)
        zero = torch.where(ok, (mq * a - mt) / torch.where(ok, a, 1.0), zero)
        beta *= o.kappa
    return best_sz


def optimize_scale_levels(w: torch.Tensor, scale: torch.Tensor, levels: torch.Tensor, o: HQQOptions) -> torch.Tensor:
    """HQQ's splitting for a lookup grid ``value = s · levels[code]`` (NF4, FP4): each round
    picks the nearest level of ``W / s``, splits off the sparse error ``We = shrink_p(W − s·L, β)``
    and sets ``s = <W − We, L> / <L, L>`` per group (least squares). Groups ``w`` ``[n, g]``,
    ``scale`` ``[n, 1]``; returns the best scale seen (by the mean absolute error)."""
    ordered, order = torch.sort(levels)
    mids = (ordered[:-1] + ordered[1:]) / 2
    beta, best, best_s = o.beta, float("inf"), scale
    for _ in range(o.iters):
        lv = ordered[torch.bucketize((w / scale).contiguous(), mids)]
        x = w - scale * lv
        error = float(x.abs().mean())
        if error < best:
            best, best_s = error, scale
        elif o.early_stop:
            break
        target = w - _shrunk_part(x, beta, o.lp_norm)
        norm = (lv * lv).sum(-1, keepdim=True)
        s = (target * lv).sum(-1, keepdim=True) / norm.clamp(min=1e-30)
        scale = torch.where((norm > 0) & (s > 0) & torch.isfinite(s), s, scale)
        beta *= o.kappa
    del order
    return best_s


class HQQQuantizer(qf.Quantizer):
    name = "hqq"
    description = ("Half-Quadratic Quantization: zero points (and scales) optimised per group, no calibration "
                   "(affine grids; the scale of nf4/fp4)")
    Options = HQQOptions
    scope = "tensor"

    options: HQQOptions

    def check_format(self, fmt: qf.Format) -> str | None:
        g = fmt.group_size(256)
        width = g if 256 % g else 256
        probe = fmt.fit(torch.linspace(-1, 1, width).view(1, width))
        if fmt.affine(probe, 0, width) is not None:
            if type(fmt).params_from_affine is qf.Format.params_from_affine:
                return f"{fmt.spec} takes no fitted values back (Format.params_from_affine)"
            return None
        if fmt.scaled_levels(probe, 0, width) is not None:
            if type(fmt).params_from_scale is qf.Format.params_from_scale:
                return f"{fmt.spec} takes no scale back (Format.params_from_scale)"
            return None
        return (f"{fmt.spec} is neither an affine grid (value = a · code + b) nor a scaled lookup grid "
                "(value = s · level): HQQ optimises those (int-*, nf4, fp4 without -dq)")

    def quantize_tensor(self, name: str, weight: torch.Tensor, fmt: qf.Format, ctx: qf.QuantContext
                        ) -> qf.QuantizedWeight:
        w = weight.to(ctx.device, torch.float32)
        rows, cols = w.shape
        g = fmt.group_size(cols)
        params = fmt.fit(w)
        groups = w.view(rows, cols // g, g)
        affine = fmt.affine(params, 0, cols)
        if affine is not None:
            a, b, qmin, qmax = affine
            scale = a.view(rows, cols // g, g)[..., :1]
            zero = -b.view(rows, cols // g, g)[..., :1] / scale
            grid = affine_grid(fmt, g)
            if self.options.init == "minmax" and grid is not None and grid.free_zero:
                scale, zero = minmax_grid(groups, scale, zero, qmin, qmax)
            if self.options.optimize_scale:
                scale, zero = optimize_scale_affine(groups.reshape(-1, g), scale.reshape(-1, 1),
                                                    zero.reshape(-1, 1), qmin, qmax, self.options)
                scale, zero = scale.view(rows, -1, 1), zero.view(rows, -1, 1)
            else:
                zero = optimize_zero(groups, scale, zero, qmin, qmax, self.options)
            new = fmt.params_from_affine(scale.squeeze(-1), (-zero * scale).squeeze(-1), params)
        else:
            found = fmt.scaled_levels(params, 0, cols)
            if found is None:  # check_format refused it before any work; a format may still vary per tensor
                raise qf.QFError(f"{name}: {fmt.spec} is neither an affine nor a scaled lookup grid")
            s, levels = found
            scale = optimize_scale_levels(groups.reshape(-1, g), s.reshape(-1, g)[:, :1], levels, self.options)
            new = fmt.params_from_scale(scale.view(rows, -1), params)
        if new is None:
            raise qf.QFError(f"{name}: {fmt.spec} takes no fitted values back")
        return qf.QuantizedWeight(fmt, (rows, cols), weight.dtype, fmt.pack(fmt.round(w, new)), new)
