"""Dense little-endian bitstreams of small integer codes (formats' packing, transforms' sign bits)."""

from __future__ import annotations

import math

import torch

_CHUNK = 1 << 20  # values per chunk of the general bit packer (bounds its int64 temporaries)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer codes (< 2**bits) into a little-endian bitstream of bytes.

    Value ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of the stream; byte ``j`` holds stream
    bits ``[8j, 8j+8)`` (least significant first). Vectorized; widths that divide 8 are packed
    in uint8 arithmetic, others 8 codes (= ``bits`` bytes) at a time in bounded chunks.
    """
    if not (1 <= bits <= 8 or bits == 16):
        raise ValueError(f"bits must be in 1..8 or 16, got {bits}")
    flat = codes.reshape(-1)
    n = flat.numel()
    if bits == 8:
        return flat.to(torch.uint8)
    if bits == 16:
        return flat.to(torch.int32).to(torch.int16).view(torch.uint8)
    if 8 % bits == 0:
        per = 8 // bits
        pad = (-n) % per
        c = flat.to(torch.uint8)
        if pad:
            c = torch.cat([c, c.new_zeros(pad)])
        c = c.view(-1, per)
        out = c[:, 0].clone()
        for i in range(1, per):
            out |= c[:, i] << (i * bits)
        return out
    pad = (-n) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, 8)
    shifts = torch.arange(8, device=flat.device, dtype=torch.int64) * bits
    byte_shifts = torch.arange(bits, device=flat.device, dtype=torch.int64) * 8
    out = torch.empty(groups.shape[0], bits, dtype=torch.uint8, device=flat.device)
    step = _CHUNK // 8
    for a in range(0, groups.shape[0], step):
        word = (groups[a:a + step].to(torch.int64) << shifts).sum(dim=1)  # disjoint bits: sum == or
        out[a:a + step] = ((word.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8)
    return out.reshape(-1)[: math.ceil(n * bits / 8)]


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes, as ``uint8`` (``int32`` for 16 bits)."""
    if bits == 8:
        return packed[:n].clone()
    if bits == 16:
        return packed[: 2 * n].view(torch.int16).to(torch.int32) & 0xFFFF
    if 8 % bits == 0:
        per = 8 // bits
        mask = (1 << bits) - 1
        b = packed[: math.ceil(n / per)]
        out = torch.stack([(b >> (i * bits)) & mask for i in range(per)], dim=1)
        return out.reshape(-1)[:n]
    n_groups = math.ceil(n / 8)
    need = n_groups * bits
    data = packed[:need]
    if data.numel() < need:
        data = torch.cat([data, data.new_zeros(need - data.numel())])
    data = data.view(n_groups, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    out = torch.empty(n_groups, 8, dtype=torch.uint8, device=packed.device)
    step = _CHUNK // 8
    for a in range(0, n_groups, step):
        word = (data[a:a + step].to(torch.int64) << byte_shifts).sum(dim=1)
        out[a:a + step] = ((word.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).to(torch.uint8)
    return out.reshape(-1)[:n]
