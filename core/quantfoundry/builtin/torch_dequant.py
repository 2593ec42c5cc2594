"""Built-in kernel ``torch-dequant``: dequantize with the format, then ``F.linear``.

The reference kernel: it serves every format on every device, and every other kernel is
tested against it. With ``cache=true`` (the default) the dequantized weight is kept in the
compute dtype after the first call, trading memory for speed in evaluation loops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..hookspecs import hookimpl
from ..options import Options
from ..roles.format import QuantizedWeight
from ..roles.kernel import Kernel


@dataclass(frozen=True, kw_only=True)
class TorchDequantOptions(Options):
    cache: bool = field(default=True, metadata={"help": "keep the dequantized weight after the first call"})


class TorchDequantKernel(Kernel):
    name = "torch-dequant"
    description = "reference kernel: dequantize with the format's own decode, then F.linear (any format, any device)"
    Options = TorchDequantOptions
    priority = 0
    weight_transforms = "dense"  # the dequantized weight is the original one

    options: TorchDequantOptions

    def prepare(self, qw: QuantizedWeight) -> dict[str, Any]:
        return {"weight": qw.dequantize(torch.float32) if self.options.cache else None}

    def forward(self, x: torch.Tensor, qw: QuantizedWeight, state: Any, bias: torch.Tensor | None) -> torch.Tensor:
        w = state["weight"] if state and state.get("weight") is not None else qw.dequantize(torch.float32)
        if w.dtype != x.dtype:
            w = w.to(x.dtype)
            if self.options.cache:
                state["weight"] = w
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))


@hookimpl
def qf_register_kernels(register):
    register(TorchDequantKernel)
