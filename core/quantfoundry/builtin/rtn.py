"""Built-in quantizer ``rtn``: round-to-nearest onto the planned format, tensor by tensor."""

from __future__ import annotations

import torch

from ..hookspecs import hookimpl
from ..roles.block import QuantContext
from ..roles.format import Format, QuantizedWeight
from ..roles.quantizer import Quantizer


class RTNQuantizer(Quantizer):
    name = "rtn"
    description = "round-to-nearest: fit each group's grid to its weights, round every weight; no calibration"
    scope = "tensor"
    needs_calibration = False

    def quantize_tensor(self, name: str, weight: torch.Tensor, fmt: Format, ctx: QuantContext) -> QuantizedWeight:
        w = weight.to(ctx.device, torch.float32)
        return fmt.quantize(w, ctx.importance.get(name))


@hookimpl
def qf_register_quantizers(register):
    register(RTNQuantizer)
