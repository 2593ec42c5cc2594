"""The toolkit's LDLQ column loop (GPTQ's) against float64 implementations of the papers
(GPTQ; QuIP#'s BlockLDLQ for vector grids), against round-to-nearest, and on awkward Hessians."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
import quantfoundry as qf
import torch
from ldlq_reference import block_ldlq_reference, fit_int, gptq_reference, quant_int
from quantfoundry.toolkit import Segment, lazy_block_size, ldlq_solve

CASES = [("int4-g32", 4, 32, False), ("int4-g64-sym", 4, 64, True), ("int3-g32", 3, 32, False),
         ("int2-g64", 2, 64, False), ("int4", 4, 256, False)]


def correlated(n: int, cols: int, seed: int) -> torch.Tensor:
    """Inputs with correlated channels and a few large outlier channels (as LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / cols ** 0.5)
    x += 0.3 * torch.randn(n, cols, generator=g)
    x[:, torch.randperm(cols, generator=g)[:4]] *= 8
    return x


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T.double() @ x.double() / x.shape[0]


def output_error(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> float:
    """‖W X − Ŵ X‖² over the calibration inputs, in float64."""
    return float(((x.double() @ (w.double() - wq.double()).T) ** 2).sum())


def solve(w: torch.Tensor, h: torch.Tensor, spec: str, **kw) -> tuple[qf.QuantizedWeight, torch.Tensor]:
    fmt = qf.resolve_format(spec)
    res = ldlq_solve(w, h.float(), [Segment(0, w.shape[0], fmt)], **kw)
    qw = qf.QuantizedWeight(fmt, tuple(w.shape), torch.float32, fmt.pack(res.codes[0]), res.params[0], perm=res.perm)
    return qw, res.values


@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("spec,bits,group,sym", CASES)
def test_matches_float64_paper_algorithm(spec, bits, group, sym, act_order, static):
    """Lazy batches, float32 and the Format interface give the plain float64 column loop's
    result: rare float ties may flip a code (and the codes after it react), so at least 99% of
    codes agree exactly and the output error is the same within 1%."""
    rows, cols = 32, 256
    for seed in range(2):
        x = correlated(1024, cols, seed)
        h = hessian(x)
        w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(100 + seed))
        ref_codes, ref_values = gptq_reference(w, h, bits=bits, group=group, sym=sym,
                                               act_order=act_order, static_groups=static)
        qw, values = solve(w, h, spec, desc_act=act_order, static_groups=static)
        codes = qw.codes().to(torch.float64)
        if qw.perm is not None:
            codes = codes[:, torch.argsort(qw.perm)]
        assert (codes == ref_codes).double().mean() >= 0.99
        ours, ref = output_error(w, qw.dequantize(), x), output_error(w, ref_values, x)
        assert abs(ours - ref) <= 0.01 * ref
        # what the loop fed back is what the stored weight decodes to
        torch.testing.assert_close(values, qw.dequantize(), rtol=0, atol=0)


def test_lazy_batches_equal_the_unbatched_loop():
    x = correlated(1024, 256, 0)
    w = torch.randn(40, 256)
    a, _ = solve(w, hessian(x), "int4-g32", block_size=1)
    for bs in (32, 128, 256):
        b, _ = solve(w, hessian(x), "int4-g32", block_size=bs)
        assert (a.codes() == b.codes()).double().mean() >= 0.999
        torch.testing.assert_close(a.dequantize(), b.dequantize(), atol=1e-2, rtol=0)


@pytest.mark.parametrize("spec", ["int4-g128", "int4-g128-sym", "int3-g128", "int3-g128-sym", "int8", "int2-g64"])
def test_gptq_beats_rtn_on_the_output_error(spec):
    """‖WX − ŴX‖² is below round-to-nearest's on the same grid (every config, several seeds)."""
    for seed in range(2):
        x = correlated(1024, 256, seed)
        w = torch.randn(64, 256, generator=torch.Generator().manual_seed(7 + seed)) * 0.02
        fmt = qf.resolve_format(spec)
        rtn = output_error(w, fmt.quantize(w).dequantize(), x)
        for act_order in (False, True):
            qw, _ = solve(w, hessian(x), spec, desc_act=act_order, static_groups=act_order)
            assert output_error(w, qw.dequantize(), x) < 0.9 * rtn


def test_act_order_permutation_round_trips():
    """Codes are stored in act-order (columns by decreasing H diagonal), groups contiguous in
    that order; ``perm`` undoes it, and a per-column g_idx recovers every column's grid."""
    x = correlated(1024, 256, 3)
    h = hessian(x)
    w = torch.randn(32, 256)
    qw, values = solve(w, h, "int4-g32", desc_act=True)
    expected = torch.argsort(torch.diagonal(h).float(), descending=True, stable=True)
    assert torch.equal(qw.perm, expected)
    torch.testing.assert_close(qw.dequantize(), values, rtol=0, atol=0)
    # g_idx: original column c is in group position(c) // 32 of the stored order
    g_idx = torch.empty(256, dtype=torch.long)
    g_idx[qw.perm] = torch.arange(256) // 32
    codes = torch.empty_like(qw.codes())
    codes[:, qw.perm] = qw.codes()
    scale, zero = qw.params["scale"].float(), qw.params["zero"].float()
    manual = (codes.float() - zero[:, g_idx]) * scale[:, g_idx]
    torch.testing.assert_close(manual, values, rtol=0, atol=0)
    # static groups: same processing order, codes back in the original order, no permutation
    qs, vs = solve(w, h, "int4-g32", desc_act=True, static_groups=True)
    assert qs.perm is None
    torch.testing.assert_close(qs.dequantize(), vs, rtol=0, atol=0)


def test_singular_hessian_gives_finite_weights_and_rounds_dead_channels_to_nearest():
    """Dead input channels (never active) and fewer tokens than columns: no NaN; a dead
    channel neither takes nor gives error, so it is exactly its round-to-nearest value."""
    x = correlated(64, 256, 4)  # rank <= 64 < 256
    dead = torch.tensor([0, 17, 100, 255])
    x[:, dead] = 0
    w = torch.randn(32, 256)
    fmt = qf.resolve_format("int4-g32")
    for act_order in (False, True):
        qw, values = solve(w, hessian(x), "int4-g32", desc_act=act_order, static_groups=act_order)
        assert torch.isfinite(values).all()
        assert output_error(w, values, x) < output_error(w, fmt.quantize(w).dequantize(), x)
    # all-zero Hessian (no token at all): every channel dead → round to nearest everywhere
    qw, values = solve(w, torch.zeros(256, 256), "int4-g32")
    torch.testing.assert_close(values, fmt.quantize(w).dequantize(), rtol=0, atol=0)


def test_singular_hessian_retries_with_more_damping():
    """A Hessian with a negative direction (from float noise in real runs) fails at the
    requested damping; the solver doubles it until the factorisation works and says so."""
    x = correlated(512, 64, 5)
    h = hessian(x).float()
    h -= 0.05 * torch.diagonal(h).mean() * torch.eye(64)
    fmt = qf.resolve_format("int4-g32")
    res = ldlq_solve(torch.randn(8, 64), h, [Segment(0, 8, fmt)], damp_percent=0.01)
    assert res.damp_tries > 1 and res.damp >= 0.02
    assert torch.linalg.eigvalsh(h.double() + 0.01 * torch.diagonal(h).mean() * torch.eye(64)).min() < 0
    assert torch.isfinite(res.values).all()


def test_segments_round_rows_onto_their_own_formats():
    """Stacked linears sharing a Hessian with different formats (a GGUF mix's Q6_K attn_v next
    to Q4_K q/k; int fallbacks) equal separate solves: rows never interact."""
    x = correlated(1024, 256, 6)
    h = hessian(x).float()
    w = torch.randn(48, 256)
    f1, f2 = qf.resolve_format("int4-g64"), qf.resolve_format("int3-g128-sym")
    both = ldlq_solve(w, h, [Segment(0, 32, f1), Segment(32, 48, f2)])
    a = ldlq_solve(w[:32], h, [Segment(0, 32, f1)])
    b = ldlq_solve(w[32:], h, [Segment(0, 16, f2)])
    assert torch.equal(both.codes[0], a.codes[0]) and torch.equal(both.codes[1], b.codes[0])
    torch.testing.assert_close(both.values, torch.cat([a.values, b.values]), rtol=0, atol=0)


@pytest.mark.parametrize("size,groups,width", [(128, [32, 128], 1), (128, [256], 1), (128, [96], 1),
                                               (128, [96, 64], 1), (100, [64, 256], 1), (100, [24], 8),
                                               (128, [96], 8), (7, [16, 32], 2)])
def test_lazy_block_size_keeps_groups_and_vectors_whole(size, groups, width):
    """Every group either fits inside batches or starts one, and a batch holds whole vectors."""
    b = lazy_block_size(size, groups, width)
    assert b % width == 0
    assert all(b % g == 0 or g % b == 0 for g in groups), (b, groups)


def test_lazy_block_size_keeps_the_asked_size_when_it_fits():
    assert lazy_block_size(128, [32, 128]) == 128
    assert lazy_block_size(128, [256]) == 128          # a K-quant super-block starts a batch


def test_reference_grid_is_the_int_format():
    """The reference's grid is an independent spelling of the built-in int format."""
    w = torch.randn(16, 64)
    for spec, bits, sym in [("int4-g64", 4, False), ("int3-g64-sym", 3, True)]:
        scale, zero = fit_int(w.double(), bits, sym)
        _, v = quant_int(w.double(), scale[:, None], zero[:, None], bits)
        torch.testing.assert_close(qf.resolve_format(spec).quantize(w).dequantize().double(), v,
                                   rtol=0, atol=1e-6)


# -- vector grids (block_width > 1): BlockLDLQ ------------------------------------------------------

#: a 2-D codebook: the integer points of [-2, 2]² and the half-integer points inside (D2*-like)
CODEBOOK = torch.tensor([*itertools.product(range(-2, 3), repeat=2),
                         *[(a + 0.5, b + 0.5) for a, b in itertools.product(range(-2, 2), repeat=2)]],
                        dtype=torch.float64)


@dataclass(frozen=True, kw_only=True)
class PairOptions(qf.Options):
    group_size: int = field(default=16)


class PairLattice(qf.Format):
    """A test vector format: two columns rounded jointly to the nearest of 41 codebook points
    scaled by a per-group scale (``max |w| / 2``)."""

    name = "test-pair-lattice"
    Options = PairOptions
    block_width = 2

    def group_size(self, in_features: int) -> int:
        return self.options.group_size

    def code_bits(self) -> int:
        return 6

    def fit(self, w, importance=None):
        rows, cols = w.shape
        g = self.options.group_size
        scale = w.abs().view(rows, cols // g, g).amax(-1).clamp(min=1e-8) / 2
        return {"scale": scale.float()}

    def _scale(self, params, col0, ncols):
        idx = torch.arange(col0, col0 + ncols, 2) // self.options.group_size
        return params["scale"][:, idx].double()  # [rows, ncols / 2]

    def round(self, w, params, col0=0):
        rows, ncols = w.shape
        pairs = w.double().view(rows, ncols // 2, 2) / self._scale(params, col0, ncols)[..., None]
        return torch.cdist(pairs.reshape(-1, 2), CODEBOOK).argmin(-1).view(rows, ncols // 2).to(torch.uint8)

    def decode(self, codes, params, col0=0):
        rows, n = codes.shape
        return (CODEBOOK[codes.long()] * self._scale(params, col0, 2 * n)[..., None]).view(rows, 2 * n).float()


def pair_round(scales: torch.Tensor, group: int):
    """BlockLDLQ's ``Q`` for the pair codebook, written here without the format: the nearest
    codebook point of the target pair, times the group's fixed scale (float64)."""
    def round_block(target: torch.Tensor, k: int) -> torch.Tensor:
        s = scales[:, k // group].double()[:, None]
        point = CODEBOOK[torch.cdist(target / s, CODEBOOK).argmin(-1)]
        return point * s
    return round_block


def proxy_loss(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    e = (w.double() - wq.double())
    return float(torch.trace(e @ h.double() @ e.T))


@pytest.mark.parametrize("block_size", [2, 16, 128])
def test_vector_grid_matches_block_ldlq(block_size):
    """Two columns rounded jointly with grids fitted before the loop: the lazy float32 loop gives
    QuIP#'s BlockLDLQ (float64, from the block LDL decomposition of H) — at least 99% of codes
    equal, the proxy loss within 1% — and beats rounding each pair to nearest."""
    fmt = PairLattice(PairOptions(group_size=16))
    for seed in range(2):
        x = correlated(1024, 64, seed)
        h = hessian(x)
        w = torch.randn(24, 64, generator=torch.Generator().manual_seed(50 + seed))
        res = ldlq_solve(w, h.float(), [Segment(0, 24, fmt)], static_groups=True, block_size=block_size)
        assert res.codes[0].shape == (24, 32)
        scales = res.params[0]["scale"]
        torch.testing.assert_close(scales, fmt.fit(w)["scale"])  # fitted on the original weights
        ref = block_ldlq_reference(w, h, 2, pair_round(scales, 16))
        ref_codes = torch.cdist((ref.view(24, 32, 2) / scales.double().repeat_interleave(8, 1)[..., None])
                                .reshape(-1, 2), CODEBOOK).argmin(-1).view(24, 32)
        assert (res.codes[0].long() == ref_codes).double().mean() >= 0.99
        ours, theirs = proxy_loss(w, res.values, h), proxy_loss(w, ref, h)
        assert abs(ours - theirs) <= 0.01 * theirs
        qw = qf.QuantizedWeight(fmt, (24, 64), torch.float32, fmt.pack(res.codes[0]), res.params[0])
        torch.testing.assert_close(qw.dequantize(), res.values, rtol=0, atol=0)  # stored = fed back
        nearest = fmt.quantize_dequantize(w, fmt.fit(w))
        assert ours < 0.9 * proxy_loss(w, nearest, h)


def test_scalar_block_ldlq_reference_is_gptq_with_fixed_grids():
    """The BlockLDLQ reference with b = 1 is QuIP's LDLQ; with grids fixed beforehand it equals
    the float64 GPTQ reference exactly (the two references check each other)."""
    x = correlated(512, 64, 9)
    h = hessian(x)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(9)).double()
    static = [fit_int(w[:, j:j + 16], 4, False) for j in range(0, 64, 16)]

    def round_scalar(target, k):
        scale, zero = static[k // 16]
        return quant_int(target[:, 0], scale, zero, 4)[1][:, None]

    ldlq = block_ldlq_reference(w, h, 1, round_scalar)
    _, gptq = gptq_reference(w.float(), h, bits=4, group=16, sym=False, static_groups=True)
    torch.testing.assert_close(ldlq, gptq, rtol=0, atol=1e-12)


def test_vector_grid_fitted_in_the_loop_beats_nearest_and_ignores_batch_size():
    """Grids fitted when the loop reaches each group (GPTQ's default) on a vector format: the
    lazy batch size changes nothing (groups never straddle a batch) and the proxy loss is below
    rounding each pair to nearest."""
    fmt = PairLattice(PairOptions(group_size=16))
    x = correlated(1024, 64, 3)
    h = hessian(x)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    a = ldlq_solve(w, h.float(), [Segment(0, 16, fmt)], block_size=2)
    b = ldlq_solve(w, h.float(), [Segment(0, 16, fmt)], block_size=64)
    assert (a.codes[0] == b.codes[0]).double().mean() >= 0.99
    assert proxy_loss(w, a.values, h) < 0.9 * proxy_loss(w, fmt.quantize_dequantize(w, fmt.fit(w)), h)


def test_vector_grids_refuse_act_order_and_mixed_widths():
    fmt = PairLattice(PairOptions(group_size=16))
    w, h = torch.randn(4, 32), torch.eye(32)
    with pytest.raises(ValueError, match="act-order permutes single columns"):
        ldlq_solve(w, h, [Segment(0, 4, fmt)], desc_act=True)
    with pytest.raises(ValueError, match="mix block widths"):
        ldlq_solve(w, h, [Segment(0, 2, fmt), Segment(2, 4, qf.resolve_format("int4-g16"))])
