"""qf-bitsandbytes: an adapter over the bitsandbytes library — the kernel ``bnb-4bit`` runs
quantfoundry's ``nf4``/``fp4`` weights (plugin qf-nf4: the same bytes bitsandbytes stores)
through ``bitsandbytes.matmul_4bit``, on the CPU and on CUDA.

It is chosen on request (``--kernel bnb-4bit``; priority below the reference kernel): what it
buys is bitsandbytes' own arithmetic — the numbers a bitsandbytes deployment computes — and
its fused 4-bit GEMV for single-token decoding on a GPU.
"""

from __future__ import annotations

from typing import Any

import quantfoundry as qf
import torch
from quantfoundry import hookimpl

KINDS = ("nf4", "fp4")


def _bnb() -> Any:
    """bitsandbytes, or None when it is not installed."""
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes


class BnB4BitKernel(qf.Kernel):
    name = "bnb-4bit"
    description = "bitsandbytes' matmul_4bit for nf4/fp4 weights (adapter; CPU and CUDA)"
    priority = -5  # used when asked for: --kernel bnb-4bit

    def serves(self, fmt: qf.Format, device: torch.device, tokens: int | None = None) -> str | None:
        if fmt.name not in KINDS:
            return f"it runs bitsandbytes' nf4 and fp4, not {fmt.spec}"
        if device.type not in ("cpu", "cuda"):
            return f"bitsandbytes 4-bit runs on cpu and cuda here, not {device.type}"
        if _bnb() is None:
            return "it needs bitsandbytes: pip install bitsandbytes"
        return None

    def prepare(self, qw: qf.QuantizedWeight) -> dict[str, Any]:
        import bitsandbytes.functional as F

        kind = qw.format.name
        absmax, offset, nested = qw.params["absmax"].reshape(-1).contiguous(), None, None
        if qw.tensor_params:  # double quantization: 8-bit absmax codes, their scales and offset
            tp = qw.tensor_params
            nested = F.QuantState(absmax=tp["nested_absmax"].float().contiguous(), code=tp["nested_map"].float(),
                                  blocksize=256, dtype=torch.float32)
            offset = tp["offset"].float().reshape(())
        else:
            absmax = absmax.float()
        state = F.QuantState(absmax=absmax, shape=torch.Size(qw.shape),
                             code=F.get_4bit_type(kind, device=qw.device), blocksize=qw.format.options.blocksize,
                             quant_type=kind, dtype=torch.float32, offset=offset, state2=nested)
        return {"weight": qw.packed.reshape(-1, 1).contiguous(), "state": state}

    def forward(self, x: torch.Tensor, qw: qf.QuantizedWeight, state: Any, bias: torch.Tensor | None) -> torch.Tensor:
        bnb = _bnb()
        if state is None:
            state = self.prepare(qw)
        if qw.perm is not None:  # codes stored in act-order: feed the inputs in that order
            x = x[..., qw.perm]
        state["state"].dtype = x.dtype  # bitsandbytes dequantizes in the input's dtype
        return bnb.matmul_4bit(x, state["weight"].t(), quant_state=state["state"],
                               bias=None if bias is None else bias.to(x.dtype))


@hookimpl
def qf_register_kernels(register):
    register(BnB4BitKernel)
