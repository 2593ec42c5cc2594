"""What an optimiser of a grid needs to know about a format before it starts (HQQ, QAT, the
adapters over outside optimisers): its code range and whether it takes a zero point back."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..roles.format import Format


@dataclass(frozen=True)
class AffineGrid:
    """An affine grid (``value = a · code + b``) with integer codes in ``[cmin, cmax]``;
    ``free_zero``: the format stores an offset handed back through
    :meth:`Format.params_from_affine` (an asymmetric grid), rather than keeping its own (a
    symmetric one)."""

    cmin: int
    cmax: int
    free_zero: bool

    @property
    def levels(self) -> int:
        return self.cmax - self.cmin + 1


def affine_grid(fmt: Format, width: int = 256) -> AffineGrid | None:
    """Probe ``fmt`` on one row of ``width`` columns (a multiple of its group size there):
    its :class:`AffineGrid`, or ``None`` when it is not affine or takes no values back."""
    g = fmt.group_size(width)
    if width % g:
        width = g
    probe = torch.linspace(-0.5, 1.0, width).view(1, width)
    params = fmt.fit(probe)
    affine = fmt.affine(params, 0, width)
    if affine is None:
        return None
    a, _, cmin, cmax = affine
    a0 = a[:, ::g]
    want = a0 * (cmin - cmax)  # the top code as zero point: a symmetric grid keeps its own
    moved = fmt.params_from_affine(a0, want, params)
    if moved is None:
        return None
    back = fmt.affine(moved, 0, width)
    free = back is not None and bool(torch.allclose(back[1][:, ::g], want, atol=1e-3))
    return AffineGrid(int(cmin), int(cmax), free)
