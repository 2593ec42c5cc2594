"""AWQ's two searches, on the planned format's own quantize-dequantize (Lin et al. 2023).

Both minimise the paper's objective, the output error of the linears on the calibration
inputs ``X`` (Eq. 4: ``‖Q(W·diag(s)) (diag(s)⁻¹ X) − W X‖²``), computed exactly over every
calibration token from the Gram matrix ``H = XᵀX``: for an error ``E = W − Ŵ`` it is
``tr(E H Eᵀ)``. So a grid point costs one quantize-dequantize and one ``[rows, in] × [in, in]``
product, whatever the number of tokens.

* scale: ``s = mean|x|^α`` (``duo_scaling``: ``mean|x|^α / mean|ŵ|^(1−α)``, AutoAWQ's default),
  normalised so ``max(s)·min(s) = 1``, for α on ``n_grid`` points in ``[0, 1)`` — α = 0 is
  ``s = 1``, plain round-to-nearest, so the chosen scale never does worse than RTN on the
  objective;
* clipping: per output row and fitting unit (the format's group: an int group, a 256-wide
  K-quant super-block), the largest magnitude shrunk by ``1 − i/n_grid`` for ``i <
  max_shrink·n_grid``, each unit's loss ``e H_gg eᵀ`` on its own columns (as AutoAWQ), the
  best ratio kept per unit.

Candidates are scored in batches: the scaled (or clipped) weights of several grid points are
stacked along the rows and fitted in one call of the format (with a per-row importance when the
format weights its fit), so a format whose fit is a sequence of small vectorised steps — the
llama.cpp-exact K-quant searches — runs those steps once per batch instead of once per grid
point. A batch holds at most :data:`BATCH_ELEMENTS` weights; every row's fit is independent
of the others', so batching changes no value.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from quantfoundry import Format
from quantfoundry.toolkit import Tie, phase

#: most weights fitted in one batch of candidates (a format's fit holds a few temporaries of
#: this many float32 values: 32 MiB each)
BATCH_ELEMENTS = 1 << 23


def quant_dequant(fmt: Format, w: torch.Tensor, importance: torch.Tensor | None, exact: bool = True) -> torch.Tensor:
    """What ``fmt.quantize(w, importance)`` decodes to (float32), without packing; with ``exact``
    False, through the format's cheaper fit for ranking candidates (``Format.fit_for_search``)."""
    return fmt.roundtrip(w, importance, for_search=not exact)


def output_error(e: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``tr(E H Eᵀ)`` (float64) of each ``E`` in a stack ``[k, rows, in]`` → ``[k]``."""
    k, rows, n_in = e.shape
    flat = e.reshape(k * rows, n_in)
    return ((flat @ gram) * flat).view(k, rows * n_in).sum(1, dtype=torch.float64)


def batches(n: int, elements_each: int) -> Iterator[slice]:
    """Slices of ``range(n)`` holding at most :data:`BATCH_ELEMENTS` elements (at least one)."""
    step = max(1, BATCH_ELEMENTS // max(1, elements_each))
    for i in range(0, n, step):
        yield slice(i, min(n, i + step))


def quant_dequant_stack(fmt: Format, ws: torch.Tensor, importance: torch.Tensor | None,
                        exact: bool = True) -> torch.Tensor:
    """:func:`quant_dequant` of each weight of a stack ``[k, rows, in]`` in one fit;
    ``importance`` ``[in]`` (shared) or ``[k, in]`` (one per weight)."""
    k, rows, n_in = ws.shape
    imp = importance
    if imp is not None and imp.ndim == 2:
        imp = imp[:, None, :].expand(k, rows, n_in).reshape(k * rows, n_in)
    return quant_dequant(fmt, ws.reshape(k * rows, n_in), imp, exact).view(k, rows, n_in)


def weight_magnitude(weights: list[torch.Tensor], formats: list[Format]) -> torch.Tensor:
    """AutoAWQ's ``w_mean``: |w| normalised by its group's largest |w|, averaged over rows."""
    parts = []
    for w, fmt in zip(weights, formats, strict=True):
        rows, cols = w.shape
        g = fmt.group_size(cols)
        a = w.abs().view(rows, cols // g, g)
        parts.append((a / (a.amax(-1, keepdim=True) + 1e-6)).view(rows, cols))
    return torch.cat(parts).mean(0)


def candidate_scale(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
    s = x_mean.pow(alpha)
    if w_mean is not None:
        s = s / w_mean.pow(1 - alpha).clamp(min=1e-4)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@dataclass
class ScaleResult:
    scale: torch.Tensor      # [in] float32, per input channel of the group's linears
    searched: torch.Tensor   # the scale per searched channel (a KV channel under GQA ties)
    alpha: float
    loss: float              # objective at the chosen scale
    loss_rtn: float          # objective at s = 1
    losses: torch.Tensor     # [n_grid] float64: the objective at every α


@torch.no_grad()
@phase("search")
def search_scale(weights: list[torch.Tensor], formats: list[Format | None], x_mean: torch.Tensor,
                 gram: torch.Tensor | list[torch.Tensor], importance: torch.Tensor | list[torch.Tensor | None] | None,
                 *, n_grid: int, duo_scaling: bool, tie: Tie | None = None, exact: bool = True) -> ScaleResult:
    """The per-input-channel scale minimising the group's output error.

    :param weights: float32 ``[rows, in]`` weights of the group's linears (a ``None`` format:
        kept in float, exact at any scale, not counted).
    :param x_mean: mean |x| of the ``in`` input channels.
    :param gram: ``H`` of the group's input, or one per weight (MoE experts reading one input
        on different tokens: the objective is the sum of each weight's ``tr(E H_i Eᵀ)``).
    :param importance: the format's fit weights of the unscaled input, or one per weight.
    :param tie: channels that must share one scale (GQA: an o_proj input channel of every
        query head reading one KV head); statistics are averaged over each tied set.
    """
    n = len(weights)
    grams = gram if isinstance(gram, list) else [gram] * n
    importances = importance if isinstance(importance, list) else [importance] * n
    planned = [(w, f, h, i) for w, f, h, i in zip(weights, formats, grams, importances, strict=True) if f is not None]
    w_mean = weight_magnitude([p[0] for p in planned], [p[1] for p in planned]) if duo_scaling else None
    if tie is not None:
        x_mean = tie.reduce(x_mean)
        w_mean = None if w_mean is None else tie.reduce(w_mean)
    alphas = [i / n_grid for i in range(n_grid)]
    searched = torch.stack([candidate_scale(x_mean, w_mean, a) for a in alphas])  # [n_grid, n]
    scales = tie.expand(searched) if tie is not None else searched                  # [n_grid, in]
    losses = torch.zeros(n_grid, dtype=torch.float64, device=x_mean.device)
    for w, fmt, h, imp in planned:
        imps = None if imp is None else imp / scales.square()
        for b in batches(n_grid, w.numel()):
            s = scales[b, None, :]
            q = quant_dequant_stack(fmt, w * s, None if imps is None else imps[b], exact) / s
            losses[b] += output_error(w - q, h)
    best = int(torch.argmin(losses))  # the first of equal minima: α = 0 (RTN) wins a tie
    return ScaleResult(scales[best], searched[best], alphas[best], float(losses[best]), float(losses[0]), losses)


@dataclass
class ClipResult:
    clipped: torch.Tensor    # [rows, in]: w with each unit's chosen shrink
    loss_before: float       # objective unclipped
    loss_after: float        # objective at the chosen shrinks
    losses: torch.Tensor     # [n_shrinks, rows, units] float64: every unit's objective at every shrink
    best: torch.Tensor       # [rows, units]: the chosen shrink's index


@torch.no_grad()
@phase("search")
def search_clip(w: torch.Tensor, fmt: Format, gram: torch.Tensor, importance: torch.Tensor | None, *,
                n_grid: int, max_shrink: float, exact: bool = True) -> ClipResult:
    """Per row and fitting unit, the shrink of the largest magnitude that minimises the unit's
    own output error."""
    rows, cols = w.shape
    g = fmt.group_size(cols)
    n_units = cols // g
    blocks = gram.view(n_units, g, n_units, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [G, g, g]
    w3 = w.view(rows, n_units, g)
    top = w3.abs().amax(-1, keepdim=True)
    shrinks = torch.tensor([1 - i / n_grid for i in range(max(1, int(max_shrink * n_grid)))],
                           device=w.device)
    tops = top * shrinks[:, None, None, None]                                   # [k, rows, G, 1]
    losses = torch.empty(len(shrinks), rows, n_units, dtype=torch.float64, device=w.device)
    for b in batches(len(shrinks), w.numel()):
        m = tops[b]
        wc = torch.maximum(torch.minimum(w3, m), -m).view(-1, rows, cols)
        e = (w - quant_dequant_stack(fmt, wc, importance, exact)).view(-1, rows, n_units, g)
        losses[b] = torch.einsum("krgi,gij,krgj->krg", e, blocks, e).double()
    best = losses.argmin(0)                                                     # first of equal minima
    best_top = tops.gather(0, best[None, :, :, None]).squeeze(0)
    clipped = torch.maximum(torch.minimum(w3, best_top), -best_top).reshape(rows, cols)
    return ClipResult(clipped, float(losses[0].sum()), float(losses.gather(0, best[None]).sum()), losses, best)
