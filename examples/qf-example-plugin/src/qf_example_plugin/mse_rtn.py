"""The quantizer ``mse-rtn`` of docs/writing-a-plugin.md: round to nearest after a per-group
search of the clipping range that minimises the squared rounding error — tensor by tensor, no
calibration. With ``--imatrix`` the error of each input column is weighted by its importance
(mean squared activation), as llama.cpp's imatrix-aware quantizers do."""

from __future__ import annotations

from dataclasses import dataclass, field

import quantfoundry as qf
import torch


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
        importance = ctx.importance.get(name)  # [cols] mean x² with --imatrix, else None
        col_weight = torch.ones(cols, device=w.device) if importance is None else importance.to(w.device)

        def error(params: qf.Params) -> torch.Tensor:  # [rows, groups]: weighted squared error per group
            return ((fmt.quantize_dequantize(w, params) - w).pow(2) * col_weight).view(rows, -1, g).sum(-1)

        ratios = torch.linspace(1.0, self.options.min_ratio, self.options.grid).tolist()
        best = fmt.fit(w, importance)  # ratio 1: plain RTN is always a candidate
        best_err = error(best)
        for ratio in ratios[1:]:
            params = fmt.fit(w * ratio, importance)  # a grid fitted to shrunk weights = a clipped range
            err = error(params)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = {k: torch.where(better.view(*better.shape, *[1] * (v.dim() - 2)), v, best[k])
                    for k, v in params.items()}
        return qf.QuantizedWeight(fmt, (rows, cols), weight.dtype, fmt.pack(fmt.round(w, best)), best)
