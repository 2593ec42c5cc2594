"""Built-in kernel ``torch-w8a8``: W8A8 linears through PyTorch's own low-precision GEMMs —
``torch._int_mm`` (int8 × int8 → int32) for ``int8-sym`` per-channel weights with int8 inputs,
``torch._scaled_mm`` (float8 e4m3 × e4m3) for ``fp8-e4m3`` weights with fp8 inputs.

The input is quantized as its scheme says (:class:`~quantfoundry.ActQuant`: per-token scales
computed as vLLM computes them, or the static ``input_scale``), multiplied in the low
precision, and the product scaled back: ``y = (q_x · q_wᵀ) · s_x · s_w`` (+ bias), in the
input's dtype. A weight without an input scheme (weight-only), or whose scheme does not match
its grid (fp8 inputs on int8 weights), runs as the reference kernel does: dequantize, fake-quant
the input, ``F.linear``.

By default (``fuse=true``), on CUDA the input's quantization is one Triton kernel and the
rescale of an int32/float32 product another (:mod:`quantfoundry.builtin.w8a8_triton`, the codes
of :class:`ActQuant` bit for bit); fp8 in bfloat16 passes its per-token and per-channel scales
to ``torch._scaled_mm`` itself (row-wise scaling), which writes ``y`` directly. On the H100 that
beat the torch-ops path (``fuse=false``) in 43 of 48 shape × batch × scheme cases
(``docs/benchmarks.md``).

Opt in with ``--kernel torch-w8a8`` (priority below the reference): on a CPU the float GEMM is
usually faster; on an H100 ``docs/benchmarks.md`` measures it against cuBLAS fp16. On CUDA,
``torch._int_mm`` needs more than 16 rows: fewer are padded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..hookspecs import hookimpl
from ..options import Options
from ..roles.format import Format, QuantizedWeight
from ..roles.kernel import Kernel

MIN_INT_MM_ROWS = 17  # torch._int_mm on CUDA wants more than 16 rows


@dataclass(frozen=True, kw_only=True)
class W8A8Options(Options):
    fuse: bool = field(default=True, metadata={"help": "on CUDA: quantize inputs and rescale products in Triton "
                                                       "kernels (false: torch ops)"})


def _kind(fmt: Format) -> str | None:
    """``int8`` (a symmetric per-channel int8 grid), ``fp8`` (fp8-e4m3) or None."""
    o = fmt.options
    if fmt.name == "int" and getattr(o, "bits", 0) == 8 and getattr(o, "sym", False) and \
            getattr(o, "group_size", -1) == 0:
        return "int8"
    if fmt.name == "fp8-e4m3":
        return "fp8"
    return None


class W8A8Kernel(Kernel):
    name = "torch-w8a8"
    description = ("W8A8 through torch._int_mm (int8-sym per-channel weights, int8 inputs) and torch._scaled_mm "
                   "(fp8-e4m3 weights, fp8 inputs)")
    Options = W8A8Options
    priority = -1
    examples = ("int8-sym", "fp8-e4m3", "fp8-e4m3-tensor")
    quantizes_inputs = True

    def serves(self, fmt: Format, device: torch.device, tokens: int | None = None) -> str | None:
        kind = _kind(fmt)
        if kind is None:
            return "it runs int8-sym per-channel (int8) and fp8-e4m3 weights"
        if kind == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            return "torch._scaled_mm needs float8 tensor cores (compute capability 8.9 or newer)"
        return None

    def prepare(self, qw: QuantizedWeight) -> dict[str, Any]:
        kind = _kind(qw.format)
        codes = qw.codes()
        if kind == "int8":  # stored with the zero point 128: signed codes are code - 128
            w = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
            scale = qw.params["scale"].to(torch.float32).reshape(1, -1)
        else:
            w = codes.view(torch.float8_e4m3fn).contiguous()
            s = qw.tensor_params["scale"] if qw.tensor_params else qw.params["scale"]
            scale = s.to(torch.float32).reshape(1, -1).expand(1, qw.shape[0]).contiguous()
        return {"kind": kind, "w": w, "scale": scale, "dense": None}

    def forward(self, x: torch.Tensor, qw: QuantizedWeight, state: Any, bias: torch.Tensor | None) -> torch.Tensor:
        act = qw.input_quant
        if act is None or act.dtype != state["kind"]:
            if state["dense"] is None:
                state["dense"] = qw.dequantize(torch.float32)
            if act is not None:
                x = act.fake_quant(x, qw.input_scale)
            w = state["dense"].to(x.dtype)
            return F.linear(x, w, None if bias is None else bias.to(x.dtype))
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.is_cuda and self.options.fuse and _triton():
            y = self._fused(x2, qw, state, bias)
        else:
            y = self._torch_ops(x2, qw, state, bias)
        return y.reshape(*shape[:-1], qw.shape[0])

    @staticmethod
    def _torch_ops(x2: torch.Tensor, qw: QuantizedWeight, state: Any, bias: torch.Tensor | None) -> torch.Tensor:
        act = qw.input_quant
        if act.dynamic:
            codes, sx = act.quantize_dynamic(x2)
        else:
            sx = qw.input_scale.to(torch.float32).reshape(1, 1).to(x2.device)
            codes = act.quantize(x2, sx)
        w = state["w"]
        if state["kind"] == "int8":
            rows = codes.shape[0]
            if codes.is_cuda and rows < MIN_INT_MM_ROWS:
                codes = torch.cat([codes, codes.new_zeros(MIN_INT_MM_ROWS - rows, codes.shape[1])])
            acc = torch._int_mm(codes, w.t())[:rows].to(torch.float32)
        else:
            one = torch.ones((), dtype=torch.float32, device=x2.device)
            acc = torch._scaled_mm(codes, w.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        y = acc * sx * state["scale"]
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y.to(x2.dtype)

    @staticmethod
    def _fused(x2: torch.Tensor, qw: QuantizedWeight, state: Any, bias: torch.Tensor | None) -> torch.Tensor:
        act, rows = qw.input_quant, x2.shape[0]
        int8 = state["kind"] == "int8"
        from . import w8a8_triton

        codes, sx = w8a8_triton.quantize_rows(x2, act, qw.input_scale, MIN_INT_MM_ROWS if int8 else 0)
        if int8:
            acc = torch._int_mm(codes, state["w"].t())
        elif x2.dtype == torch.bfloat16:  # row-wise scales in the GEMM's epilogue: y in one kernel
            sa = sx if act.dynamic else sx.expand(rows, 1).contiguous()
            return torch._scaled_mm(codes, state["w"].t(), scale_a=sa, scale_b=state["scale"],
                                    bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16)
        else:
            one = torch.ones((), dtype=torch.float32, device=x2.device)
            acc = torch._scaled_mm(codes, state["w"].t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        return w8a8_triton.rescale(acc, rows, sx, state["scale"], bias, x2.dtype)


def _triton() -> bool:
    from . import w8a8_triton  # imports triton: only once a CUDA input comes

    return w8a8_triton.available()


@hookimpl
def qf_register_kernels(register):
    register(W8A8Kernel)
