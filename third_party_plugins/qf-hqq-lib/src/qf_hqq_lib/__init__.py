"""qf-hqq-lib: an adapter over the hqq library (mobiusml) — the quantizer ``hqq-lib`` runs
hqq's own ``Quantizer.quantize(..., optimize=True)`` on each weight and stores its scale and
zero point in a quantfoundry format.

For users who want the reference implementation inside qf's pipeline (plans, exporters,
evaluation), and as the cross-check of the native ``hqq`` (plugin qf-hqq). It serves
asymmetric affine grids of 1, 2, 3, 4 or 8 bits whose groups run along the input dimension
(``int4-g64-zf16``, ``int3-g128``, …): hqq's layout (``axis=1``: groups of ``group_size``
consecutive values of a row). hqq fits its own starting grid (min/max of each group, not
widened to include 0, as qf's ``int`` format does), optimises the zero point, and hands back
``scale`` and ``zero``; they go to the format as ``value = scale · code − scale · zero`` through
``Format.params_from_affine`` (rounded to its storage dtypes: a float16 scale, and the zero
point that keeps hqq's offset on that scale — float16 on ``-zf16`` grids, an integer
otherwise) and the codes are then rounded on those stored values, so what is stored is what is
used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import quantfoundry as qf
import torch
from quantfoundry import hookimpl
from quantfoundry.toolkit import affine_grid

BITS = (1, 2, 3, 4, 8)  # hqq's Quantizer.SUPPORTED_BITS


def _hqq() -> Any:
    """hqq's ``Quantizer``, or a one-line error naming the pip command."""
    try:
        from hqq.core.quantize import Quantizer
    except ImportError:
        raise qf.QFError("the hqq-lib quantizer needs the hqq library: pip install hqq") from None
    return Quantizer


@dataclass(frozen=True, kw_only=True)
class HQQLibOptions(qf.Options):
    optimize: bool = field(default=True, metadata={
        "help": "run hqq's zero-point optimiser (false: hqq's min/max grid, rounded to nearest)"})


class HQQLibQuantizer(qf.Quantizer):
    name = "hqq-lib"
    description = "the hqq library's own HQQ optimiser (adapter; asymmetric int grids of 1-4 or 8 bits)"
    Options = HQQLibOptions
    scope = "tensor"

    options: HQQLibOptions

    def check_format(self, fmt: qf.Format) -> str | None:
        grid = affine_grid(fmt)
        if grid is None or grid.cmin != 0 or grid.levels not in {2 ** b for b in BITS}:
            return f"hqq quantizes asymmetric integer grids of {', '.join(map(str, BITS))} bits, not {fmt.spec}"
        if not grid.free_zero:
            return f"hqq's grids are asymmetric; {fmt.spec} is symmetric (drop -sym)"
        _hqq()  # the library is there, before any work
        return None

    def quantize_tensor(self, name: str, weight: torch.Tensor, fmt: qf.Format, ctx: qf.QuantContext
                        ) -> qf.QuantizedWeight:
        quantizer = _hqq()
        w = weight.to(ctx.device, torch.float32)
        rows, cols = w.shape
        g = fmt.group_size(cols)
        grid = affine_grid(fmt, g)
        if grid is None:
            raise qf.QFError(f"{name}: {fmt.spec} is not an integer affine grid")
        _, meta = quantizer.quantize(w, nbits=grid.levels.bit_length() - 1, channel_wise=True, group_size=g, optimize=self.options.optimize,
                                     round_zero=False, axis=1, bitpack=False, compute_dtype=torch.float32,
                                     device=str(ctx.device))
        scale = meta["scale"].reshape(rows, cols // g).float()  # hqq's dequantization scale, per group
        zero = meta["zero"].reshape(rows, cols // g).float()
        params = fmt.params_from_affine(scale, -zero * scale, fmt.fit(w))
        if params is None:
            raise qf.QFError(f"{name}: {fmt.spec} takes no fitted values back")
        return qf.QuantizedWeight(fmt, (rows, cols), weight.dtype, fmt.pack(fmt.round(w, params)), params)


@hookimpl
def qf_register_quantizers(register):
    register(HQQLibQuantizer)
