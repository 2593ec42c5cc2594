"""The compressed-tensors layout of one linear (compressed-tensors 0.19, as llm-compressor
0.14 writes it and vLLM reads it) and its ``QuantizationArgs``.

* ``int-quantized`` (int weights, int8 inputs): ``weight`` int8 signed codes ``[out, in]``,
  ``weight_scale`` ``[out, n_groups]`` (``[out, 1]`` per channel);
* ``float-quantized`` (fp8 weights and inputs) and ``naive-quantized`` (fp8 weights alone):
  ``weight`` float8_e4m3fn ``[out, in]``, ``weight_scale`` ``[out, 1]`` or ``[1]`` per tensor;
* ``pack-quantized`` (int weights, float inputs): ``weight_packed`` int32
  ``[out, ⌈in·bits/32⌉]`` — the unsigned codes (signed + ``2^(bits−1)``) packed LSB first along
  the input dim —, ``weight_scale``, ``weight_shape`` int64 ``[out, in]`` and, asymmetric,
  ``weight_zero_point`` int32 ``[⌈out·bits/32⌉, n_groups]`` (the unsigned zero points packed
  along the *output* dim);
* ``input_scale`` ``[1]`` when the input has a static scale (float32 here: the value qf
  calibrated and simulated; vLLM reads it as float32 — llm-compressor writes the model dtype).

qf's ``int`` grid stores unsigned codes ``q`` and zero points ``z`` in ``[0, 2^b)`` with
``value = (q − z) · scale``, which is compressed-tensors' ``(q_s − z_s) · scale`` with
``q_s = q − 2^(b−1)``: the packed words hold qf's codes as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from quantfoundry import ActQuant, Format, QuantizedWeight
from quantfoundry.toolkit import IntFormat


def weight_kind(fmt: Format) -> str | None:
    """``int`` (an integer grid with integer zero points), ``fp8``, or None (not storable)."""
    if isinstance(fmt, IntFormat) and fmt.options.zero_dtype == "uint8":
        return "int"
    if fmt.name == "fp8-e4m3":
        return "fp8"
    return None


def compressor(fmt: Format, act: ActQuant | None) -> str:
    """The compressor ``format`` of a linear (compressed-tensors' own inference rules)."""
    if weight_kind(fmt) == "int":
        return "int-quantized" if act is not None else "pack-quantized"
    return "float-quantized" if act is not None else "naive-quantized"


def _args(**kw: Any) -> dict[str, Any]:
    base = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": None, "num_bits": 8,
            "observer": None, "observer_kwargs": {}, "scale_dtype": None, "strategy": "tensor",
            "symmetric": True, "type": "int", "zp_dtype": None}
    base.update(kw)
    return base


def weight_args(fmt: Format) -> dict[str, Any]:
    """The weights' ``QuantizationArgs`` (as llm-compressor writes them)."""
    if weight_kind(fmt) == "fp8":
        return _args(type="float", strategy="tensor" if fmt.options.per_tensor else "channel",
                     observer="memoryless_minmax")
    o = fmt.options
    return _args(num_bits=o.bits, symmetric=o.sym, strategy="group" if o.group_size else "channel",
                 group_size=o.group_size or None, observer="memoryless_minmax",
                 zp_dtype=None if o.sym else "torch.int8")


def input_args(act: ActQuant) -> dict[str, Any]:
    """The inputs' ``QuantizationArgs``: per token and dynamic, or per tensor and static."""
    observer = None if act.dynamic else ("mse" if act.observer == "mse" else "minmax")
    return _args(type="float" if act.dtype == "fp8" else "int", strategy=act.granularity, dynamic=act.dynamic,
                 observer=observer)


def kv_args() -> dict[str, Any]:
    """The KV cache's ``QuantizationArgs``: fp8, one static scale per tensor (``k_scale``/``v_scale``)."""
    return _args(type="float")


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[rows, n]`` (< 2^bits) → int32 ``[rows, ⌈n·bits/32⌉]``, element ``i`` of a
    row at bits ``[i·bits, (i+1)·bits)`` of the row's stream, least significant first."""
    rows, n = codes.shape
    if 32 % bits:
        raise ValueError(f"compressed-tensors packs widths dividing 32 here (4 or 8 bits), got {bits}")
    per = 32 // bits
    pad = (-n) % per
    c = codes.to(torch.int64)
    if pad:
        c = torch.cat([c, c.new_zeros(rows, pad)], dim=1)
    c = c.view(rows, -1, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
    words = (c << shifts).sum(-1)  # disjoint bits: sum == or
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`_pack`: the first ``n`` unsigned codes of every row, uint8."""
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, device=words.device, dtype=torch.int64) * bits
    codes = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(words.shape[0], -1)[:, :n].to(torch.uint8)


def to_ct(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The tensors (by parameter suffix) that store ``qw`` in its compressor's layout."""
    fmt, (rows, cols) = qw.format, qw.shape
    out: dict[str, torch.Tensor] = {}
    codes = qw.codes()
    if weight_kind(fmt) == "fp8":
        out["weight"] = codes.view(torch.float8_e4m3fn)
        out["weight_scale"] = (qw.tensor_params["scale"].reshape(1) if fmt.options.per_tensor
                               else qw.params["scale"].reshape(rows, 1))
    else:
        o = fmt.options
        scale = qw.params["scale"].reshape(rows, -1)
        if qw.input_quant is not None:  # int-quantized: signed int8 codes
            out["weight"] = (codes.to(torch.int16) - (1 << (o.bits - 1))).to(torch.int8)
        else:
            out["weight_packed"] = _pack(codes, o.bits)
            out["weight_shape"] = torch.tensor([rows, cols], dtype=torch.int64)
            if not o.sym:
                out["weight_zero_point"] = _pack(qw.params["zero"].reshape(rows, -1).T.contiguous(), o.bits).T \
                    .contiguous()
        out["weight_scale"] = scale
    if qw.input_scale is not None:
        out["input_scale"] = qw.input_scale.reshape(1).to(torch.float32)
    return out


def from_ct(parts: dict[str, torch.Tensor], fmt: Format, shape: tuple[int, int], dtype: torch.dtype,
            act: ActQuant | None) -> QuantizedWeight:
    """The :class:`QuantizedWeight` of a linear stored by :func:`to_ct` (any writer's, same layout)."""
    rows, cols = shape
    if weight_kind(fmt) == "fp8":
        codes = parts["weight"].view(torch.uint8)
        scale = parts["weight_scale"]
        params = {} if fmt.options.per_tensor else {"scale": scale.reshape(rows, 1)}
        tensor = {"scale": scale.reshape(1)} if fmt.options.per_tensor else {}
    else:
        o = fmt.options
        if "weight_packed" in parts:
            codes = _unpack(parts["weight_packed"], o.bits, cols)
        else:
            codes = (parts["weight"].to(torch.int16) + (1 << (o.bits - 1))).to(torch.uint8)
        params = {"scale": parts["weight_scale"].reshape(rows, -1)}
        if not o.sym:
            n_groups = params["scale"].shape[1]
            params["zero"] = _unpack(parts["weight_zero_point"].T.contiguous(), o.bits, rows).T.contiguous() \
                .reshape(rows, n_groups)
        tensor = {}
    scale_in = parts.get("input_scale")
    return QuantizedWeight(fmt, shape, dtype, fmt.pack(codes), params, tensor_params=tensor, input_quant=act,
                           input_scale=None if scale_in is None else scale_in.reshape(1).to(torch.float32))
