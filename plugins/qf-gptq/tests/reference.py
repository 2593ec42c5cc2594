"""A straightforward float64 GPTQ (Frantar et al. 2022, Algorithm 1 without lazy batching),
written from the paper and its reference quantizer, independent of qf's solver and formats.

Grid (the GPTQ reference ``Quantizer`` with ``perchannel=True``, min-max): per group of
columns, ``xmin = min(min w, 0)``, ``xmax = max(max w, 0)``; asymmetric
``scale = (xmax - xmin) / maxq``, ``zero = round(-xmin / scale)``; symmetric
``scale = 2 max(|xmin|, xmax) / maxq``, ``zero = (maxq + 1) / 2``; ``q = clamp(round(w / scale)
+ zero, 0, maxq)``, value ``scale (q - zero)``. The scale is rounded to float16, as stored.
"""

from __future__ import annotations

import torch


def fit_int(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of one group ``w`` ``[rows, g]`` (float64 arithmetic, fp16 scale)."""
    maxq = 2 ** bits - 1
    xmin = torch.clamp(w.min(dim=1).values, max=0)
    xmax = torch.clamp(w.max(dim=1).values, min=0)
    if sym:
        scale = 2 * torch.maximum(-xmin, xmax) / maxq
    else:
        scale = (xmax - xmin) / maxq
    scale = torch.where(scale == 0, torch.ones_like(scale), scale).half().double()
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return scale, zero


def quant_int(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.clamp(torch.round(x / scale) + zero, 0, 2 ** bits - 1)
    return q, scale * (q - zero)


def gptq_reference(w: torch.Tensor, h: torch.Tensor, *, bits: int, group: int, sym: bool,
                   damp: float = 0.01, act_order: bool = False, static_groups: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized weights (original column order), float64, one column at a time."""
    w = w.double().clone()
    h = h.double().clone()
    rows, cols = w.shape
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    static = [fit_int(w[:, j:j + group], bits, sym) for j in range(0, cols, group)] if static_groups else None
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.diagonal(h).mean() * torch.eye(cols, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    codes = torch.zeros(rows, cols, dtype=torch.float64)
    values = torch.zeros(rows, cols, dtype=torch.float64)
    scale = zero = None
    for j in range(cols):
        if static is not None:
            scale, zero = static[int(perm[j]) // group]
        elif j % group == 0:
            scale, zero = fit_int(w[:, j:j + group], bits, sym)
        q, v = quant_int(w[:, j], scale, zero, bits)
        codes[:, j], values[:, j] = q, v
        err = (w[:, j] - v) / u[j, j]
        w[:, j + 1:] -= torch.outer(err, u[j, j + 1:])
    inv = torch.argsort(perm)
    return codes[:, inv], values[:, inv]
