"""qf-example-plugin: the finished plugins of the two tutorials.

* ``mse-rtn`` (docs/writing-a-plugin.md) — round to nearest after a per-group search of the
  clipping range that minimises the squared rounding error; tensor by tensor, no calibration;
* ``output-clip`` (docs/writing-a-block-quantizer.md, :mod:`.output_clip`) — the same search
  scored by each linear's output error on calibration data; block by block, with the toolkit.

Both only talk to the Format interface, so they work on any format whose ``fit`` returns
per-group parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

import quantfoundry as qf
import torch
from quantfoundry import hookimpl

from .output_clip import OutputClip


@dataclass(frozen=True, kw_only=True)
class MSERTNOptions(qf.Options):
    grid: int = field(default=20, metadata={"help": "number of clipping ratios tried"})
    min_ratio: float = field(default=0.7, metadata={"help": "smallest clipping ratio tried (1 = no clipping)"})

    def __post_init__(self) -> None:
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")
        if not 0 < self.min_ratio <= 1:
            raise ValueError(f"min_ratio must be in (0, 1], got {self.min_ratio}")


class MSERTN(qf.Quantizer):
    name = "mse-rtn"
    description = "RTN with a per-group clipping search minimising the squared rounding error"
    Options = MSERTNOptions
    scope = "tensor"

    options: MSERTNOptions

    def quantize_tensor(self, name: str, weight: torch.Tensor, fmt: qf.Format, ctx: qf.QuantContext
                        ) -> qf.QuantizedWeight:
        w = weight.to(ctx.device, torch.float32)
        rows, cols = w.shape
        g = fmt.group_size(cols)
        ratios = torch.linspace(1.0, self.options.min_ratio, self.options.grid).tolist()
        best = fmt.fit(w * ratios[0])  # ratio 1: plain RTN is always a candidate
        best_err = (fmt.quantize_dequantize(w, best) - w).pow(2).view(rows, -1, g).sum(-1)
        for ratio in ratios[1:]:
            params = fmt.fit(w * ratio)  # a grid fitted to shrunk weights = a clipped range
            err = (fmt.quantize_dequantize(w, params) - w).pow(2).view(rows, -1, g).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = {k: torch.where(better.view(*better.shape, *[1] * (v.dim() - 2)), v, best[k])
                    for k, v in params.items()}
        return qf.QuantizedWeight(fmt, (rows, cols), weight.dtype, fmt.pack(fmt.round(w, best)), best)


@hookimpl
def qf_register_quantizers(register):
    register(MSERTN)
    register(OutputClip)
