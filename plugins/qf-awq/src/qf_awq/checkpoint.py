"""The AutoAWQ GEMM checkpoint layout (``quantization_config``: ``quant_method: awq``,
``version: gemm``), which transformers, vLLM and TGI read.

For a linear ``W`` ``[out, in]`` with 4-bit codes ``q``, zero points ``z`` and scales ``s``
per group of ``g`` input columns:

* ``qweight`` int32 ``[in, out/8]``: word ``j`` of input row ``i`` holds the codes of outputs
  ``8j … 8j+7`` in AWQ's interleaved order — nibble ``k`` (bits ``4k … 4k+3``) is output
  ``8j + (0, 2, 4, 6, 1, 3, 5, 7)[k]``;
* ``qzeros`` int32 ``[in/g, out/8]``: the zero points, packed the same way (stored as they are);
* ``scales`` float16 ``[in/g, out]``;
* value: ``W[o, i] = scales[i // g, o] · (q[i, o] − z[i // g, o])``.

A symmetric grid is stored with every zero point at 8 (``zero_point: true``), which every AWQ
kernel reads and which decodes to the same values.
"""

from __future__ import annotations

import torch
from quantfoundry import QuantizedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _pack(values: torch.Tensor) -> torch.Tensor:
    """``[n, m]`` 4-bit values → ``[n, m/8]`` int32 in AWQ's interleaved nibble order."""
    n, m = values.shape
    v = values.to(torch.int64).view(n, m // 8, 8)[:, :, list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, 4, device=values.device, dtype=torch.int64)
    words = (v << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack(words: torch.Tensor) -> torch.Tensor:
    n, w = words.shape
    shifts = torch.arange(0, 32, 4, device=words.device, dtype=torch.int64)
    nibbles = (words.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF  # [n, w, 8] in storage order
    out = torch.empty_like(nibbles)
    out[:, :, list(AWQ_ORDER)] = nibbles
    return out.view(n, w * 8)


def to_awq(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales`` of a 4-bit int-format weight (no permutation)."""
    o = qw.format.options
    out_f, in_f = qw.shape
    g = o.group_size or in_f
    codes = qw.codes().to(torch.int32)  # [out, in]
    scale = qw.params["scale"].to(torch.float16)  # [out, groups]
    zero = qw.params["zero"].to(torch.int32) if "zero" in qw.params else \
        torch.full((out_f, in_f // g), 8, dtype=torch.int32, device=codes.device)
    return {"qweight": _pack(codes.T.contiguous()), "qzeros": _pack(zero.T.contiguous()),
            "scales": scale.T.contiguous()}


def from_awq(tensors: dict[str, torch.Tensor], fmt, shape: tuple[int, int], dtype: torch.dtype) -> QuantizedWeight:
    """The :class:`QuantizedWeight` of an AWQ GEMM linear (``fmt``: the asymmetric int4 grid)."""
    codes = _unpack(tensors["qweight"]).T.contiguous()  # [out, in]
    zero = _unpack(tensors["qzeros"]).T.contiguous()    # [out, groups]
    scale = tensors["scales"].T.contiguous().to(torch.float16)
    return QuantizedWeight(fmt, shape, dtype, fmt.pack(codes.to(torch.uint8)),
                           {"scale": scale, "zero": zero.to(torch.uint8)})
