"""Built-in kernel ``torch-int4``: 4-bit group-wise weights through PyTorch's own int4 GEMM,
``aten._weight_int4pack_mm`` (torchao's "tinygemm"; ``_weight_int4pack_mm_for_cpu`` on a CPU).

tinygemm decodes ``w = (q − 8) · s + z`` per group of 32, 64, 128 or 256 input columns, with
``s`` and the *float* offset ``z`` in bfloat16, and multiplies bfloat16 inputs. Our grid is
``w = (q − zero) · scale``, so ``z = (8 − zero) · scale``:

* a symmetric grid (``zero = 8``) with bfloat16 scales (``int4-g128-sym-sbf16``) maps exactly
  (``z = 0``): served by default;
* float16/float32 scales or asymmetric grids need ``s`` and ``z`` rounded to bfloat16 — a
  different weight (relative error up to 2^-9 per group); served only with
  ``approximate=true``.

Opt-in (``--kernel torch-int4``) until its CUDA run is recorded (tested on CPU, where torch
has the same kernel). Calls in bfloat16 run tinygemm; other input dtypes, and weights of shapes tinygemm does not
take (``out % 8``, on a CPU ``out % 16``; ``in % (16 · inner_k_tiles)``), are dequantized and multiplied as the reference
kernel does. Act-order weights gather the input's columns first. Above ``max_tokens`` rows per
call the next kernel (dequantize + cuBLAS) takes over (:meth:`Kernel.serves` with ``tokens``).
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

GROUPS = (32, 64, 128, 256)


@dataclass(frozen=True, kw_only=True)
class Int4Options(Options):
    approximate: bool = field(default=False, metadata={
        "help": "also run float16/float32 scales and asymmetric grids, rounded to tinygemm's bfloat16 (a different weight)"})
    max_tokens: int = field(default=4, metadata={
        "help": "calls with more rows (batch x sequence) go to the next kernel (dequantize + GEMM)"})
    inner_k_tiles: int = field(default=8, metadata={"help": "tinygemm's packing: 2, 4 or 8"})

    def __post_init__(self) -> None:
        if self.inner_k_tiles not in (2, 4, 8):
            raise ValueError(f"inner_k_tiles must be 2, 4 or 8, got {self.inner_k_tiles}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")


class Int4Kernel(Kernel):
    name = "torch-int4"
    description = "int4 group-wise weights through aten._weight_int4pack_mm (tinygemm), bfloat16 inputs"
    Options = Int4Options
    #: ahead of the reference for the grids it serves, up to ``max_tokens`` (4) rows per call: on the
    #: H100, 1.0-2.7x cuBLAS at 1-4 tokens on Llama-3-8B/70B shapes, 0.5-0.7x at 16
    #: (docs/benchmarks.md, "Kernels")
    priority = 10
    examples = ("int4-g128-sym-sbf16", "int4-g32-sym-sbf16")

    options: Int4Options

    def serves(self, fmt: Format, device: torch.device, tokens: int | None = None) -> str | None:
        o = fmt.options
        if fmt.name != "int" or getattr(o, "bits", 0) != 4:
            return "it runs 4-bit integer grids"
        if o.group_size not in GROUPS:
            return f"tinygemm takes groups of {', '.join(map(str, GROUPS))} input columns"
        exact = o.sym and o.scale_dtype == "bfloat16"
        if not exact and not self.options.approximate:
            return ("tinygemm decodes (q - 8) * s + z in bfloat16: exact for symmetric grids with bfloat16 scales "
                    "(int4-g128-sym-sbf16); kernel option approximate=true rounds other grids to it")
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
            return "tinygemm needs compute capability 8.0 or newer"
        if device.type not in ("cuda", "cpu"):
            return f"no int4 GEMM on {device.type}"
        if tokens is not None:
            if device.type == "cpu":
                return "on a CPU the dequantized float GEMM is the faster path"
            if tokens > self.options.max_tokens:
                return f"above {self.options.max_tokens} tokens a dequantized cuBLAS GEMM is faster"
        return None

    def prepare(self, qw: QuantizedWeight) -> dict[str, Any]:
        n, k = qw.shape
        g = qw.format.options.group_size
        codes = qw.codes()
        if n % (8 if codes.is_cuda else 16) or k % (16 * self.options.inner_k_tiles) or k % g:
            return {"w": None}
        if codes.is_cuda:
            w = torch.ops.aten._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).contiguous(),
                                                           self.options.inner_k_tiles)
        else:
            w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), self.options.inner_k_tiles)
        scale = qw.params["scale"].to(torch.float32)
        zero = qw.params["zero"].to(torch.float32) if "zero" in qw.params else torch.full_like(scale, 8.0)
        offset = (8.0 - zero) * scale
        sz = torch.stack([scale.t(), offset.t()], dim=-1).to(torch.bfloat16).contiguous()
        return {"w": w, "sz": sz, "g": g}

    def forward(self, x: torch.Tensor, qw: QuantizedWeight, state: Any, bias: torch.Tensor | None) -> torch.Tensor:
        if state["w"] is None or x.dtype != torch.bfloat16:
            return F.linear(x, qw.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if qw.perm is not None:  # stored column i is input column perm[i]
            x2 = x2.index_select(1, qw.perm)
        x2 = x2.contiguous()
        if x2.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(x2, state["w"], state["g"], state["sz"])
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, state["w"], state["g"], state["sz"])
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*shape[:-1], qw.shape[0])


@hookimpl
def qf_register_kernels(register):
    register(Int4Kernel)
