"""Kernel ``triton-w4a16``: integer weights (4 or 8 bits; group-wise with groups of 16–256
columns, or per channel; symmetric or asymmetric, integer or float16 zero points; act-order)
with 16/32-bit float inputs, the dequantization fused into the matmul (:mod:`qf_triton.wa16`).

``prepare`` repacks our codes once (:func:`qf_triton.wa16.repack`: int32 words along the input
dimension in blocks of output columns, scales and float16 zero points as ``[groups, N]``): a
tile then loads along ``N``, contiguously. Weights whose shapes the
kernels do not tile (input features not a multiple of 16) are dequantized as the reference
kernel does. Calls with more than ``max_tokens`` rows go to the next kernel (dequantize +
cuBLAS) — :meth:`Kernel.serves` with ``tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import quantfoundry as qf
import torch
import torch.nn.functional as F
from quantfoundry.toolkit import triton_unavailable

BITS = (4, 8)


@dataclass(frozen=True, kw_only=True)
class TritonWA16Options(qf.Options):
    max_tokens: int = field(default=16, metadata={
        "help": "calls with more rows (batch x sequence) go to the next kernel (dequantize + cuBLAS): above 16 "
                "the tiled kernel measured slower than cuBLAS on the H100"})

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")


class TritonWA16(qf.Kernel):
    name = "triton-w4a16"
    description = "4/8-bit integer weights x fp16/bf16/fp32 inputs, dequantization fused into a Triton GEMM/GEMV"
    Options = TritonWA16Options
    #: ahead of the reference kernel (dequantize + cuBLAS) up to ``max_tokens``, behind
    #: ``torch-int4`` (tinygemm, 10) on its one grid, which it beats at a single token on the H100
    #: (docs/benchmarks.md, "W4A16 GEMVs for decoding")
    priority = 5
    examples = ("int4-g128", "int4-g32-sym", "int8-g128", "int8")

    options: TritonWA16Options

    def serves(self, fmt: qf.Format, device: torch.device, tokens: int | None = None) -> str | None:
        o = fmt.options
        if fmt.name != "int" or getattr(o, "bits", 0) not in BITS:
            return "it runs 4- and 8-bit integer grids"
        if o.group_size and (o.group_size % 16 or o.group_size > 256):
            return "groups must be 16-256 input columns, a multiple of 16 (or per channel)"
        return triton_unavailable(device, tokens, self.options.max_tokens)

    def prepare(self, qw: qf.QuantizedWeight) -> dict[str, Any]:
        from .wa16 import repack

        n, k = qw.shape
        o = qw.format.options
        group = o.group_size or k
        if k % 16 or k % 8 or group % 16:
            return {"packed": None}
        scale = qw.params["scale"]
        zero = qw.params.get("zero")
        if not o.group_size:
            scale, zero = scale[:, :1], None if zero is None else zero[:, :1]
        dev = qw.packed.device
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if qw.packed.is_cuda else 132
        name = torch.cuda.get_device_name(dev) if qw.packed.is_cuda else "interpreter"
        packed = repack(qw.codes(), scale, zero, o.bits, group, int_zero=getattr(o, "zero_dtype", "uint8") == "uint8")
        return {"packed": packed, "sms": sms, "device_name": name, "configs": {}}

    def forward(self, x: torch.Tensor, qw: qf.QuantizedWeight, state: Any, bias: torch.Tensor | None) -> torch.Tensor:
        p = state["packed"]
        if p is None or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return F.linear(x, qw.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))
        from .wa16 import config, run

        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if qw.perm is not None:  # stored column i is input column perm[i]
            x2 = x2.index_select(1, qw.perm)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        m = x2.shape[0]
        key = (m, x2.dtype)
        cfg = state["configs"].get(key)
        if cfg is None:
            cfg = state["configs"][key] = config(m, p, state["sms"], x2.dtype, state["device_name"])
        y = run(x2, p, None if bias is None else bias.to(x.dtype), cfg)
        return y.reshape(*shape[:-1], qw.shape[0])
