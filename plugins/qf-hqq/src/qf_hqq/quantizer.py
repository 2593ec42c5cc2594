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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import quantfoundry as qf
import torch


@dataclass(frozen=True, kw_only=True)
class HQQOptions(qf.Options):
    lp_norm: float = field(default=0.7, metadata={"help": "p of the lp-norm shrinkage (0 < p <= 1)"})
    beta: float = field(default=10.0, metadata={"help": "initial half-quadratic penalty"})
    kappa: float = field(default=1.01, metadata={
        "help": "growth of beta per round (>= 1; the paper's schedule 1.01, the hqq library 0.2.8 keeps beta: 1)"})
    iters: int = field(default=20, metadata={"help": "rounds at most"})
    early_stop: bool = field(default=True, metadata={"help": "stop once the mean absolute error stops improving"})

    def __post_init__(self) -> None:
        if not 0 < self.lp_norm <= 1:
            raise ValueError(f"lp_norm must be in (0, 1], got {self.lp_norm}")
        if self.beta <= 0 or self.kappa < 1:
            raise ValueError(f"beta must be > 0 and kappa >= 1, got beta={self.beta}, kappa={self.kappa}")
        if self.iters < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")


def shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The generalised soft-thresholding of the lp norm (p = 1: plain soft thresholding)."""
    if p == 1:
        return torch.sign(x) * torch.relu(x.abs() - 1.0 / beta)
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * torch.pow(x.abs() + 1e-8, p - 1))


def optimize_zero(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int,
                  o: HQQOptions) -> torch.Tensor:
    """HQQ's zero points for groups ``w`` ``[..., g]`` with ``scale``/``zero`` ``[..., 1]``."""
    beta, best = o.beta, float("inf")
    for _ in range(o.iters):
        wq = torch.clamp(torch.round(w / scale + zero), qmin, qmax)
        wr = (wq - zero) * scale
        we = shrink(w - wr, beta, o.lp_norm)
        zero = torch.mean(wq - (w - we) / scale, dim=-1, keepdim=True)
        beta *= o.kappa
        error = float((w - wr).abs().mean())
        if error < best:
            best = error
        elif o.early_stop:
            break
    return zero


class HQQQuantizer(qf.Quantizer):
    name = "hqq"
    description = "Half-Quadratic Quantization: zero points optimised per group, no calibration (any affine grid)"
    Options = HQQOptions
    scope = "tensor"

    options: HQQOptions

    def check_format(self, fmt: qf.Format) -> str | None:
        g = fmt.group_size(256)
        width = g if 256 % g else 256
        probe = fmt.fit(torch.linspace(-1, 1, width).view(1, width))
        if fmt.affine(probe, 0, width) is None:
            return f"{fmt.spec} is not an affine grid (value = a · code + b): HQQ optimises affine grids"
        if type(fmt).params_from_affine is qf.Format.params_from_affine:
            return f"{fmt.spec} takes no fitted values back (Format.params_from_affine)"
        return None

    def quantize_tensor(self, name: str, weight: torch.Tensor, fmt: qf.Format, ctx: qf.QuantContext
                        ) -> qf.QuantizedWeight:
        w = weight.to(ctx.device, torch.float32)
        rows, cols = w.shape
        g = fmt.group_size(cols)
        params = fmt.fit(w)
        affine = fmt.affine(params, 0, cols)
        if affine is None:  # check_format refused it before any work; a format may still vary per tensor
            raise qf.QFError(f"{name}: {fmt.spec} is not an affine grid")
        a, b, qmin, qmax = affine
        groups = w.view(rows, cols // g, g)
        scale = a.view(rows, cols // g, g)[..., :1]
        zero = -b.view(rows, cols // g, g)[..., :1] / scale
        zero = optimize_zero(groups, scale, zero, qmin, qmax, self.options)
        new = fmt.params_from_affine(scale.squeeze(-1), (-zero * scale).squeeze(-1), params)
        if new is None:
            raise qf.QFError(f"{name}: {fmt.spec} takes no fitted values back")
        return qf.QuantizedWeight(fmt, (rows, cols), weight.dtype, fmt.pack(fmt.round(w, new)), new)
