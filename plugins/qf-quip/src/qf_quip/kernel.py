"""Kernel ``triton-e8p``: ``e8p`` / ``e8p-rvq3`` / ``e8p-rvq4`` weights decoded inside a Triton GEMV
(:mod:`qf_quip.gemv`) for calls of up to ``max_tokens`` rows — decoding, where a quantized model
spends its time at small batch. It multiplies by the *stored* weight and runs the weight's
randomized Hadamard transforms itself (``weight_transforms = "fused"``): one Triton kernel per side
(:mod:`qf_quip.rht`; the dense Paley factor, where a width has one, a torch matmul), the torch
path (:meth:`quantfoundry.HadamardTransform.apply_input`) for widths that kernel does not take.

``prepare`` splits the codes into their stages once (int16 E8P codes, the second stage's uint8 or
int16) and expands the scale per row; the codebook tables are made once per device and dtype.
Larger calls go to the next kernel (the reference: dequantize + cuBLAS).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import quantfoundry as qf
import torch
from quantfoundry.toolkit import triton_interpreting, triton_unavailable

from .formats import CODEBOOKS, E8PFormat


@dataclass(frozen=True, kw_only=True)
class TritonE8POptions(qf.Options):
    max_tokens: int = field(default=1, metadata={
        "help": "calls with more rows (batch x sequence) go to the next kernel (dequantize + cuBLAS): from 4 "
                "tokens the GEMV measured slower than cuBLAS on the H100 (docs/benchmarks.md)"})

    def __post_init__(self) -> None:
        if not 1 <= self.max_tokens <= 16:
            raise ValueError(f"max_tokens must be 1-16 (the GEMV's tile), got {self.max_tokens}")


class TritonE8P(qf.Kernel):
    name = "triton-e8p"
    description = "QuIP#'s E8P codes (2/3/4 bits) decoded inside a Triton GEMV with its Hadamard transforms; decoding (1 token)"
    Options = TritonE8POptions
    priority = 5
    weight_transforms = "fused"
    examples = ("e8p", "e8p-rvq3", "e8p-rvq4", "e8p-row")

    options: TritonE8POptions

    def serves(self, fmt: qf.Format, device: torch.device, tokens: int | None = None) -> str | None:
        if not isinstance(fmt, E8PFormat):
            return "it runs QuIP#'s e8p formats"
        return triton_unavailable(device, tokens, self.options.max_tokens)

    def prepare(self, qw: qf.QuantizedWeight) -> dict[str, Any]:
        from .gemv import repack

        fmt: E8PFormat = qw.format  # type: ignore[assignment]
        bits = fmt.options.bits
        _, resid, shift = CODEBOOKS[bits]
        codes = qw.codes().to(torch.int64)
        first, second = (codes, None) if not shift else (codes >> shift, codes & ((1 << shift) - 1))
        dev = qw.packed.device
        scale = fmt._scale(qw.full_params()).to(dev)
        packed = repack(first, second, scale, None if not shift else ("e81b" if shift == 8 else "e8p"), resid)
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if packed.first.is_cuda else 4
        return {"packed": packed, "sms": sms, "configs": {}}

    def forward(self, x: torch.Tensor, qw: qf.QuantizedWeight, state: Any, bias: torch.Tensor | None) -> torch.Tensor:
        from .gemv import default_config, gemv

        p = state["packed"]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        for t in qw.transforms:
            x2 = _transform(t, x2, inverse=False)
        if x2.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x2.shape[0] > 16:
            y = torch.nn.functional.linear(x2, qw.stored_dequantize().to(x2.dtype))
        else:
            if qw.perm is not None:
                x2 = x2.index_select(1, qw.perm)
            if x2.stride(-1) != 1:
                x2 = x2.contiguous()
            m = x2.shape[0]
            cfg = state["configs"].get(m)
            if cfg is None:
                cfg = state["configs"][m] = default_config(m, p.n, p.k, state["sms"])
            y = gemv(x2, p, cfg, interpreting=triton_interpreting())
        for t in reversed(qw.transforms):
            y = _transform(t, y, inverse=True)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*shape[:-1], qw.shape[0])


def _transform(t: qf.WeightTransform, x: torch.Tensor, *, inverse: bool) -> torch.Tensor:
    """``t.apply_input`` (``inverse``: ``t.apply_output``), by the Triton kernel where it takes
    the transform and the width."""
    if isinstance(t, qf.HadamardTransform) and x.shape[0] <= 16:
        from .rht import rht

        signs = t.signs("out" if inverse else "in")
        if signs is None:
            return x
        y = rht(x, signs, inverse=inverse, interpreting=triton_interpreting())
        if y is not None:
            return y
    return t.apply_output(x) if inverse else t.apply_input(x)
