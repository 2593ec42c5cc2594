"""The quantizer ``output-clip`` of docs/writing-a-block-quantizer.md: round to nearest after a
per-group search of the clipping ratio that minimises each linear's *output* error on the
calibration inputs — a block-scope quantizer built on the toolkit.

For a linear ``W`` reading inputs ``X`` (``n`` tokens), rounding error ``E = W − Ŵ`` costs
``‖E Xᵀ‖² / n = tr(E H Eᵀ)`` with ``H = XᵀX / n``. Restricted to one group of columns ``g`` of one
row that is ``e_g H_gg e_gᵀ`` — the objective AWQ's clipping search uses. One float forward of
the block collects ``XᵀX`` for every planned linear (linears reading one input share it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import quantfoundry as qf
import torch
from quantfoundry.toolkit import collect_input_stats


@dataclass(frozen=True, kw_only=True)
class OutputClipOptions(qf.Options):
    grid: int = field(default=20, metadata={"help": "number of clipping ratios tried"})
    min_ratio: float = field(default=0.5, metadata={"help": "smallest clipping ratio tried (1 = no clipping)"})

    def __post_init__(self) -> None:
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")
        if not 0 < self.min_ratio <= 1:
            raise ValueError(f"min_ratio must be in (0, 1], got {self.min_ratio}")


class OutputClip(qf.Quantizer):
    name = "output-clip"
    description = "RTN with a per-group clipping search minimising each linear's output error on calibration data"
    Options = OutputClipOptions
    scope = "block"
    needs_calibration = True

    options: OutputClipOptions

    def quantize_block(self, block: qf.Block, ctx: qf.QuantContext) -> dict[str, qf.QuantizedWeight]:
        names = list(block.formats)
        stats = collect_input_stats(block, names, want=("gram",), device=ctx.device)
        out = {}
        for name in names:
            st = stats[name]
            fmt = block.formats[name]
            w = block.linear(name).weight.detach().to(ctx.device, torch.float32)
            if st.count == 0:  # an input no calibration token reached: nothing to weigh the error by
                ctx.note(f"output-clip: {block.full_name(name)} saw no calibration token: rounded to nearest")
                out[name] = fmt.quantize(w)
                continue
            params = self.search(w, fmt, st.gram / st.count)
            out[name] = qf.QuantizedWeight(fmt, tuple(w.shape), block.linear(name).weight.dtype,
                                           fmt.pack(fmt.round(w, params)), params)
        return out

    def search(self, w: torch.Tensor, fmt: qf.Format, h: torch.Tensor) -> qf.Params:
        """Per (row, group): the ratio whose fitted grid gives the lowest ``e_g H_gg e_gᵀ``."""
        rows, cols = w.shape
        g = fmt.group_size(cols)
        k = cols // g
        h_blocks = h.view(k, g, k, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [k, g, g]: H_gg

        def loss(params: qf.Params) -> torch.Tensor:
            e = (w - fmt.quantize_dequantize(w, params)).view(rows, k, g)
            return torch.einsum("rki,kij,rkj->rk", e, h_blocks, e)

        ratios = torch.linspace(1.0, self.options.min_ratio, self.options.grid).tolist()
        best = fmt.fit(w)  # ratio 1: plain round-to-nearest is always a candidate
        best_loss = loss(best)
        for ratio in ratios[1:]:
            params = fmt.fit(w * ratio)  # a grid fitted to shrunk weights = a clipped range
            cand = loss(params)
            better = cand < best_loss
            best_loss = torch.where(better, cand, best_loss)
            best = {n: torch.where(better.view(*better.shape, *[1] * (v.dim() - 2)), v, best[n])
                    for n, v in params.items()}
        return best
