"""QuIP#'s E8P12 codebook (``qf_quip.e8p``) and the format ``e8p``, against independent oracles:
the codebook rebuilt as QuIP#'s reference code builds it (its steps, literally), lattice
membership, and brute-force nearest search over all 65,536 points."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import quantfoundry as qf
import torch
from qf_quip import e8p


def reference_packed_abs_grid() -> list[int]:
    """QuIP#'s ``get_packed_abs_grid``: D8 + 1/2 vectors with an even sum and squared norm ≤ 10
    (enumerated from coordinates in ±{1/2, 3/2, 5/2}: a 7/2 alone has norm > 10 with the rest),
    their absolute values made unique (lexicographic), then the 29 of norm 12; columns in the
    order (0, 2, 1, 3, 4, 6, 5, 7), the last negated where the sum is odd, times 4 as int8 bytes."""
    vals = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])
    d8 = np.array(list(itertools.product(vals, repeat=8)))
    keep = (d8.sum(1) % 2 == 0) & ((d8 * d8).sum(1) <= 10)
    d8abs = np.unique(np.abs(d8[keep]), axis=0)
    cba = np.concatenate([d8abs, np.array(e8p.NORM12) / 2])[:, [0, 2, 1, 3, 4, 6, 5, 7]]
    cba[:, 7] *= 1 - 2 * (cba.sum(1) % 2)
    out = []
    for row in (cba * 4).astype(np.int64):
        acc = 0
        for i, v in enumerate(row):
            acc |= (int(v) & 0xFF) << (8 * i)
        out.append(acc)
    return out


def reference_point(code: int, packed: list[int]) -> list[float]:
    """QuIP#'s ``get_full_grid`` for one code, step by step."""
    shuffle = [0, 2, 1, 3, 4, 6, 5, 7]
    signs, idx = code & 255, code >> 8
    parity = 0
    for i in range(8):
        parity ^= (signs >> i) & 1
    signs ^= parity
    out = []
    for i in range(8):
        ii = shuffle[i]
        byte = (packed[idx] >> (8 * ii)) & 255
        v = (byte - 256 if byte >= 128 else byte) / 4  # the byte as an int8
        if (signs >> (7 - ii)) & 1:
            v = -v
        out.append(float(v) + (-0.25 if parity else 0.25))
    return out


def test_table_is_quip_sharps_codebook() -> None:
    packed = reference_packed_abs_grid()
    assert len(packed) == 256 and len(e8p.abs_patterns()) == 256
    table = e8p.table()
    g = torch.Generator().manual_seed(0)
    codes = torch.cat([torch.arange(512), torch.arange(65536 - 512, 65536),
                       torch.randint(0, 65536, (3000,), generator=g)]).tolist()
    ref = torch.tensor([reference_point(c, packed) for c in codes])
    assert torch.equal(table[codes], ref)


def test_codebook_is_a_subset_of_shifted_e8() -> None:
    t = e8p.table().double()
    assert torch.unique(t, dim=0).shape[0] == 65536
    v = t - 0.25
    integer = (v == v.round()).all(1)
    half = (v - 0.5 == (v - 0.5).round()).all(1)
    assert bool((integer | half).all()) and bool((v.sum(1).remainder(2) == 0).all())
    assert int(integer.sum()) == 32768  # the −1/4 half of the codes
    norms = ((t - 0.25 * torch.where(integer, -1.0, 1.0)[:, None]) ** 2).sum(1)
    assert norms.max() == 12 and norms.min() == 2


@pytest.mark.parametrize("scale", [0.3, 1.0, 1.5, 4.0])
def test_nearest_is_the_brute_force_nearest(scale: float) -> None:
    g = torch.Generator().manual_seed(int(scale * 10))
    x = torch.randn(1500, 8, generator=g) * scale
    x[:50] = e8p.table()[torch.randint(0, 65536, (50,), generator=g)]  # on the codebook itself
    x[50:60] = 0.0
    codes = e8p.nearest(x).long()
    d = torch.cdist(x.double(), e8p.table().double()) ** 2
    best = d.min(1).values
    assert torch.allclose(d.gather(1, codes[:, None]).squeeze(1), best, atol=1e-9, rtol=0)
    assert torch.equal(e8p.decode(codes[:50]), x[:50])  # a point rounds to itself


def test_format_roundtrip_and_storage() -> None:
    fmt = qf.resolve_format("e8p")
    row = qf.resolve_format("e8p-row")
    assert fmt.block_width == 8 and fmt.spec == "e8p" and row.spec == "e8p-row"
    assert fmt.bits_per_weight((512, 1024)) == pytest.approx(2 + 32 / (512 * 1024))
    assert row.bits_per_weight((512, 1024)) == pytest.approx(2 + 32 / 1024)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g) * 0.02
    for f in (fmt, row):
        qw = f.quantize(w)
        scale = (w.square().mean() if f is fmt else w.square().mean(1, keepdim=True)).sqrt() / e8p.OPT_SCALE
        expect = e8p.decode(e8p.nearest((w / scale).reshape(-1, 8))).reshape(96, 256) * scale
        assert torch.allclose(qw.dequantize(), expect, atol=1e-9, rtol=0)
        assert qw.codes().shape == (96, 32) and qw.nbytes() == f.nbytes((96, 256))
        # QuIP#'s E8P12 on Gaussian weights: relative squared error about 0.09
        assert 0.07 < float(((qw.dequantize() - w) ** 2).sum() / (w ** 2).sum()) < 0.11
    zero = fmt.quantize(torch.zeros(8, 64)).dequantize()
    assert torch.equal(zero, torch.zeros(8, 64))


def test_blockldlq_through_the_core_loop() -> None:
    """The core's LDLQ loop with ``e8p`` (8 columns rounded jointly) lowers the proxy loss
    ``tr(E H Eᵀ)`` below rounding each vector to nearest, for inputs with correlated columns."""
    from quantfoundry.toolkit.ldlq import Segment, ldlq_solve

    g = torch.Generator().manual_seed(1)
    n, rows = 128, 64
    mix = torch.randn(n, n, generator=g) / math.sqrt(n) + torch.eye(n)
    x = torch.randn(2048, n, generator=g) @ mix
    h = (x.T @ x / x.shape[0]).double()
    w = torch.randn(rows, n, generator=g)
    fmt = qf.resolve_format("e8p")
    res = ldlq_solve(w, h.float(), [Segment(0, rows, fmt)], damp_percent=0.01)
    rtn = fmt.quantize(w).dequantize().double()
    ldl = res.values.double()

    def proxy(v: torch.Tensor) -> float:
        e = v - w.double()
        return float(torch.trace(e @ h @ e.T))

    assert proxy(ldl) < 0.8 * proxy(rtn)


def test_rvq4_is_two_greedy_e8p_stages() -> None:
    """``e8p-rvq4`` (QuIP#'s E8P12RVQ4B): the first code is the point nearest the scaled weights,
    the second the point nearest the remainder times 3.45 (both checked by brute force), and a
    code decodes to ``E8P[c1] + E8P[c2] / 3.45`` times the scale; 32-bit codes pack and unpack."""
    fmt = qf.resolve_format("e8p-rvq4")
    assert fmt.code_bits() == 32 and fmt.bits_per_weight((64, 256)) == pytest.approx(4 + 32 / (64 * 256))
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 256, generator=g)
    qw = fmt.quantize(w)
    codes = qw.codes().to(torch.int64)
    assert int(codes.max()) >= 2**31  # the high word's top bit set somewhere: the unsigned path is used
    scale = w.square().mean().sqrt() / e8p.OPT_SCALE
    x = (w / scale).reshape(-1, 8).double()
    table = e8p.table().double()
    c1, c2 = (codes >> 16).reshape(-1)[:400], (codes & 0xFFFF).reshape(-1)[:400]
    d1 = torch.cdist(x[:400], table) ** 2
    assert torch.allclose(d1.gather(1, c1[:, None]).squeeze(1), d1.min(1).values, atol=1e-9, rtol=0)
    r = (x[:400] - table[c1]) * 3.45
    d2 = torch.cdist(r, table) ** 2
    assert torch.allclose(d2.gather(1, c2[:, None]).squeeze(1), d2.min(1).values, atol=1e-6, rtol=0)
    expect = (table[codes >> 16] + table[codes & 0xFFFF] / 3.45).reshape(64, 256) * scale.double()
    assert torch.allclose(qw.dequantize(torch.float64), expect, atol=1e-6, rtol=0)
    # QuIP#'s 4-bit codebook on Gaussian weights: relative squared error about 0.0093
    err = float(((qw.dequantize() - w) ** 2).sum() / (w ** 2).sum())
    assert 0.007 < err < 0.012


def test_rvq3_second_stage_is_quip_sharps_one_bit_e8() -> None:
    """``e8p-rvq3`` (QuIP#'s E8P12RVQ3B): the second codebook is QuIP#'s 1-bit E8 grid in its
    order (rebuilt by the reference steps: E8 points of squared norm ≤ 2 from the integer then
    the half-integer grid, then ±2·e_i without −2·e_7), the second code is the brute-force
    nearest of that grid to the remainder times 2.04, the scale is rms / 0.98, and 24-bit codes
    pack into three bytes and back."""
    intr = torch.arange(-2, 2).float()
    grid = torch.cat([torch.cartesian_prod(*[intr] * 8), torch.cartesian_prod(*[intr + 0.5] * 8)])
    keep = (grid.sum(-1) % 2 == 0) & ((grid * grid).sum(-1) <= 2)
    ref = torch.cat([grid[keep], 2 * torch.eye(8), -2 * torch.eye(8)[:7]])
    assert torch.equal(e8p.e81b_table(), ref) and ref.shape == (256, 8)
    fmt = qf.resolve_format("e8p-rvq3")
    assert fmt.code_bits() == 24 and fmt.bits_per_weight((32, 128)) == pytest.approx(3 + 32 / (32 * 128))
    g = torch.Generator().manual_seed(4)
    w = torch.randn(32, 128, generator=g)
    qw = fmt.quantize(w)
    assert qw.packed.numel() == 32 * 16 * 3
    codes = qw.codes().to(torch.int64)
    scale = w.square().mean().sqrt() / 0.98
    x = (w / scale).reshape(-1, 8).double()
    c1, c2 = (codes >> 8).reshape(-1), (codes & 0xFF).reshape(-1)
    table = e8p.table().double()
    r = (x - table[c1]) * 2.04
    d2 = torch.cdist(r, ref.double()) ** 2
    assert torch.allclose(d2.gather(1, c2[:, None]).squeeze(1), d2.min(1).values, atol=1e-5, rtol=0)
    expect = (table[c1] + ref.double()[c2] / 2.04).reshape(32, 128) * scale.double()
    assert torch.allclose(qw.dequantize(torch.float64), expect, atol=1e-6, rtol=0)
    err = float(((qw.dequantize() - w) ** 2).sum() / (w ** 2).sum())
    assert 0.02 < err < 0.04
