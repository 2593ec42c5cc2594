"""The GPTQ checkpoint layout (AutoGPTQ ``checkpoint_format: gptq``, a.k.a. v1), which
transformers (through GPTQModel/optimum), vLLM, TGI and ExLlama read.

For a linear ``W`` ``[out, in]`` with ``b``-bit codes ``q``, groups of ``g`` input columns:

* ``qweight`` int32 ``[in·b/32, out]``: for each output column, its ``in`` codes as one
  little-endian bitstream (code ``k`` at bits ``[k·b, (k+1)·b)``) cut into 32-bit words —
  AutoGPTQ's ``pack`` (8 codes per word at 4 bits; at 3 bits, 32 codes span 3 words);
* ``qzeros`` int32 ``[n_groups, out·b/32]``: per group, the zero points of all outputs minus
  one (``zero − 1``, the v1 convention loaders undo with ``+ 1``), packed the same way along
  the output dimension;
* ``scales`` float16 ``[n_groups, out]``;
* ``g_idx`` int32 ``[in]``: the group of every input column (``c // g``, or with act-order
  the group the column was quantized in);
* value: ``W[o, c] = scales[g_idx[c], o] · (q[o, c] − (qzeros[g_idx[c], o] + 1))``.

A symmetric grid stores every zero point as ``2^(b−1)`` (so ``qzeros`` holds ``2^(b−1) − 1``).
A zero point of 0 cannot be stored (``−1`` wraps to ``2^b − 1``, read back as ``2^b``): such a
weight is refused with the fix to use.

GPTQModel's ``checkpoint_format: gptq_v2`` is the same layout with ``qzeros`` holding the zero
points themselves (no ``− 1``), so every zero point is storable; GPTQModel loads asymmetric
v2 checkpoints from any writer, while it refuses asymmetric v1 ones not written by itself.
"""

from __future__ import annotations

import torch
from quantfoundry import QuantizedWeight
from quantfoundry.toolkit import pack_bits, unpack_bits

GPTQ_BITS = (2, 3, 4, 8)
#: ``checkpoint_format`` → what ``qzeros`` holds relative to the zero point
ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """``[n, k]`` codes → ``[n, k·bits/32]`` int32: each row one little-endian bitstream."""
    n, k = values.shape
    if (k * bits) % 32:
        raise ValueError(f"{k} values of {bits} bits do not fill whole 32-bit words")
    return pack_bits(values.to(torch.uint8), bits).view(torch.int32).view(n, k * bits // 32)


def _unpack_rows(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    n = words.shape[0]
    flat = words.contiguous().view(torch.uint8).reshape(-1)
    return unpack_bits(flat, bits, n * k).view(n, k)


def to_gptq(qw: QuantizedWeight, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales``, ``g_idx`` of an int-format weight (``gptq`` = v1, or
    ``gptq_v2``)."""
    offset = ZERO_OFFSET[checkpoint_format]
    o = qw.format.options
    out_f, in_f = qw.shape
    g = o.group_size or in_f
    codes = qw.codes().to(torch.int32)  # [out, in], stored order
    n_groups = in_f // g
    scale = qw.params["scale"].to(torch.float16)  # [out, n_groups]
    if o.sym:
        zero = torch.full((out_f, n_groups), 1 << (o.bits - 1), dtype=torch.int32, device=codes.device)
    else:
        zero = qw.params["zero"].to(torch.int32)
        if offset and bool((zero == 0).any()):
            raise ValueError("a group has zero point 0, which a GPTQ (v1) checkpoint cannot store; "
                             "use checkpoint_format=gptq_v2, a symmetric grid (-sym) or the qf exporter")
    g_idx = torch.arange(in_f, device=codes.device, dtype=torch.int32) // g
    if qw.perm is not None:  # stored column i is original column perm[i], quantized in group i // g
        original = torch.empty_like(codes)
        original[:, qw.perm] = codes
        codes = original
        g_idx = torch.empty_like(g_idx).index_put_((qw.perm,), torch.arange(in_f, device=codes.device,
                                                                            dtype=torch.int32) // g)
    return {
        "qweight": _pack_rows(codes, o.bits).T.contiguous(),
        "qzeros": _pack_rows((zero - offset).T.contiguous(), o.bits),
        "scales": scale.T.contiguous(),
        "g_idx": g_idx,
    }


def from_gptq(tensors: dict[str, torch.Tensor], fmt, shape: tuple[int, int], dtype: torch.dtype,
              checkpoint_format: str = "gptq") -> QuantizedWeight:
    """The :class:`QuantizedWeight` of a GPTQ linear (inverse of :func:`to_gptq`); a
    non-monotone ``g_idx`` becomes ``perm`` (codes regrouped into contiguous groups)."""
    o = fmt.options
    out_f, in_f = shape
    g = o.group_size or in_f
    codes = _unpack_rows(tensors["qweight"].T, o.bits, in_f)  # [out, in]
    zero = (_unpack_rows(tensors["qzeros"], o.bits, out_f).to(torch.int32)
            + ZERO_OFFSET[checkpoint_format]).T  # [out, n_groups]
    scale = tensors["scales"].T.contiguous().to(torch.float16)
    g_idx = tensors["g_idx"].to(torch.int64)
    perm = None
    if not torch.equal(g_idx, torch.arange(in_f, device=g_idx.device) // g):
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], torch.arange(in_f, device=g_idx.device) // g):
            raise ValueError(f"g_idx does not give every group exactly {g} columns")
        codes = codes[:, perm]
    params = {"scale": scale}
    if o.sym:
        if not bool((zero == (1 << (o.bits - 1))).all()):
            raise ValueError("a symmetric GPTQ checkpoint has zero points other than 2^(bits-1)")
    else:
        params["zero"] = zero.to(torch.uint8)
    return QuantizedWeight(fmt, shape, dtype, fmt.pack(codes), params, perm=perm)
