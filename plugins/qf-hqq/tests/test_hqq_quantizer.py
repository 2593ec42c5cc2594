"""``hqq`` against the paper's equations written out in float64 (numpy, group by group), its
gain over round-to-nearest on float and integer zero points, the grid with float16 zero
points, and whole runs through the conformance kit."""

from __future__ import annotations

import numpy as np
import pytest
import quantfoundry as qf
import torch
from qf_hqq import HQQQuantizer
from quantfoundry.testing.conformance import QuantizerConformance


def trained_like(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w.view(-1)[torch.randint(0, w.numel(), (max(1, w.numel() // 100),), generator=g)] *= 15
    return w


def hqq_reference(w: np.ndarray, group: int, bits: int, p=0.7, beta=10.0, kappa=1.01, iters=20):
    """Badri & Shaji's half-quadratic zero-point solver in float64, one group at a time, from the
    grid the ``int`` format starts from (scale = (max(w,0) − min(w,0)) / (2^b − 1), zero = −min/scale)."""
    qmax = 2 ** bits - 1
    rows, cols = w.shape
    groups = [(r, c) for r in range(rows) for c in range(0, cols, group)]
    blocks = [w[r, c:c + group] for r, c in groups]
    scales, zeros = [], []
    for x in blocks:
        lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
        s = np.float64(np.float16((hi - lo) / qmax))  # stored as float16, as the format does
        scales.append(s)
        zeros.append(min(max(-lo / s, 0), qmax))
    best, b = np.inf, beta
    zeros = np.array(zeros)
    for _ in range(iters):
        err_sum, new = 0.0, []
        for x, s, z in zip(blocks, scales, zeros, strict=True):
            q = np.clip(np.round(x / s + z), 0, qmax)
            r = (q - z) * s
            e = x - r
            shrunk = np.sign(e) * np.maximum(np.abs(e) - (1 / b) * np.power(np.abs(e) + 1e-8, p - 1), 0)
            new.append(np.mean(q - (x - shrunk) / s))
            err_sum += np.abs(e).sum()
        zeros = np.array(new)
        b *= kappa
        error = err_sum / w.size
        if error < best:
            best = error
        else:
            break
    return np.array(scales).reshape(rows, -1), zeros.reshape(rows, -1)


def quantize(spec: str, w: torch.Tensor, **options) -> qf.QuantizedWeight:
    q = HQQQuantizer(HQQQuantizer.Options(**options))
    return q.quantize_tensor("w", w, qf.resolve_format(spec), qf.QuantContext(device=torch.device("cpu")))


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_zero_points_follow_the_float64_equations(bits: int) -> None:
    w = trained_like(16, 256, seed=bits)
    qw = quantize(f"int{bits}-g64-zf16", w)
    scale, zero = hqq_reference(w.double().numpy(), 64, bits)
    assert torch.equal(qw.params["scale"].double(), torch.from_numpy(scale))
    want = torch.from_numpy(np.clip(zero, 0, 2 ** bits - 1)).to(torch.float16).double()
    got = qw.params["zero"].double()
    # float32 against float64 sums: the same zero points to float16 precision nearly everywhere (a
    # code on a rounding tie may flip in one group and move its later zero points), and an error
    # as small as the reference's
    assert (got - want).abs().le(2e-3 * want.abs().clamp(min=1)).float().mean() >= 0.95
    s64 = torch.from_numpy(scale).repeat_interleave(64, dim=1)
    z64 = want.repeat_interleave(64, dim=1)
    ref = (torch.clamp(torch.round(w.double() / s64 + z64), 0, 2 ** bits - 1) - z64) * s64
    assert (qw.dequantize(torch.float64) - w.double()).abs().mean() <= (ref - w.double()).abs().mean() * 1.002


@pytest.mark.parametrize("spec", ["int4-g64-zf16", "int3-g64-zf16", "int2-g64-zf16", "int4-g128-zf16"])
def test_hqq_beats_round_to_nearest_on_the_lp_error(spec: str) -> None:
    w = trained_like(64, 512, seed=7)
    rtn = qf.resolve_format(spec).quantize(w)
    hqq = quantize(spec, w)
    err = {k: (v.dequantize() - w).abs() for k, v in (("rtn", rtn), ("hqq", hqq))}
    assert err["hqq"].mean() < err["rtn"].mean()
    assert err["hqq"].pow(0.7).mean() < err["rtn"].pow(0.7).mean()


def test_integer_zero_points_are_rounded_and_stored_as_such() -> None:
    w = trained_like(8, 256, seed=1)
    qw = quantize("int4-g64", w)
    assert qw.params["zero"].dtype == torch.uint8
    assert (qw.dequantize() - w).abs().mean() <= (qf.resolve_format("int4-g64").quantize(w).dequantize() - w).abs().mean() * 1.05


def test_cuda_gives_the_cpu_result() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: checked on the GPU machine")
    w = trained_like(32, 256, seed=2)
    q = HQQQuantizer()
    fmt = qf.resolve_format("int4-g64-zf16")
    a = q.quantize_tensor("w", w, fmt, qf.QuantContext(device=torch.device("cpu")))
    b = q.quantize_tensor("w", w, fmt, qf.QuantContext(device=torch.device("cuda")))
    torch.testing.assert_close(a.dequantize(), b.dequantize().cpu(), rtol=0, atol=1e-3)


def test_lookup_grids_are_refused_before_any_work(tiny_model) -> None:
    nf4 = qf.resolve_format("nf4")  # qf-nf4's lookup grid (a testing dependency)
    assert "not an affine grid" in (HQQQuantizer().check_format(nf4) or "")
    with pytest.raises(qf.QFError, match="not an affine grid"):
        qf.run(str(tiny_model("llama")), quantizer="hqq", format="nf4", out=None, progress=False)
    assert HQQQuantizer().check_format(qf.resolve_format("int4-g64")) is None


class TestHQQConformance(QuantizerConformance):
    quantizer = "hqq"
    format = "int4-g32-zf16"
