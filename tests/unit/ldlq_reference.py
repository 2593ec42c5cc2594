"""Independent float64 references of the LDLQ column loop, written from the papers, sharing no
code with ``quantfoundry.toolkit.ldlq``:

* :func:`gptq_reference` — GPTQ (Frantar et al. 2022, Algorithm 1, without lazy batching) with the
  GPTQ reference ``Quantizer``'s min-max grid (``perchannel=True``): per group of columns,
  ``xmin = min(min w, 0)``, ``xmax = max(max w, 0)``; asymmetric ``scale = (xmax - xmin) / maxq``,
  ``zero = round(-xmin / scale)``; symmetric ``scale = 2 max(|xmin|, xmax) / maxq``,
  ``zero = (maxq + 1) / 2``; ``q = clamp(round(w / scale) + zero, 0, maxq)``, value
  ``scale (q - zero)``. The scale is rounded to float16, as stored.
* :func:`block_ldlq_reference` — QuIP#'s BlockLDLQ from the block LDL decomposition of ``H``
  (vector grids rounding ``b`` columns jointly; ``b = 1`` is QuIP's LDLQ, which equals GPTQ
  with grids fixed beforehand).
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


def block_ldl(h: torch.Tensor, b: int) -> torch.Tensor:
    """The strictly block-upper factor ``Ů`` of ``H = (Ů + I) D (Ů + I)ᵀ`` (``D`` block diagonal
    with ``b × b`` blocks), from a Cholesky factorisation of ``H`` with its order reversed."""
    n = h.shape[0]
    rev = torch.arange(n - 1, -1, -1)
    c = torch.linalg.cholesky(h[rev][:, rev])
    lower = torch.empty_like(c)
    for k in range(0, n, b):
        lower[:, k:k + b] = c[:, k:k + b] @ torch.linalg.inv(c[k:k + b, k:k + b])
    u = lower[rev][:, rev]
    for k in range(0, n, b):
        u[k:k + b, k:k + b] = 0
    return u


def block_ldlq_reference(w: torch.Tensor, h: torch.Tensor, b: int, round_block, damp: float = 0.01
                         ) -> torch.Tensor:
    """QuIP#'s BlockLDLQ (Tseng et al. 2024, eq. 3; QuIP's LDLQ for ``b = 1``) in float64:
    ``Ŵ_k = Q(W_k + (W_{<k} − Ŵ_{<k}) Ů_{<k,k})`` for column blocks ``k`` of width ``b`` in order,
    ``Q`` = ``round_block(target [rows, b], first column) → values``, the grid fixed beforehand.
    Returns ``Ŵ``."""
    w = w.double()
    h = h.double().clone()
    n = h.shape[0]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    h += damp * torch.diagonal(h).mean() * torch.eye(n, dtype=torch.float64)
    u = block_ldl(h, b)
    wh = torch.zeros_like(w)
    for k in range(0, n, b):
        target = w[:, k:k + b] + (w[:, :k] - wh[:, :k]) @ u[:k, k:k + b]
        wh[:, k:k + b] = round_block(target, k)
    return wh
