"""``quantfoundry.toolkit.fakequant``: fake quantization through a format, its straight-through
gradients and its conversion, checked against the format's own rounding and a float64 autograd
reference of LSQ+."""

from __future__ import annotations

import pytest
import quantfoundry as qf
import torch
from quantfoundry.toolkit import FakeQuant

SPECS = ("int4-g128", "int3-g64-sym", "int8", "int2-g64", "fp8-e4m3")


def _weight(rows: int = 24, cols: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.02


@pytest.mark.parametrize("spec", SPECS)
def test_forward_is_the_formats_rounding_and_conversion_is_exact(spec: str) -> None:
    fmt = qf.resolve_format(spec)
    w = _weight()
    fq = FakeQuant(fmt, w)
    qw = fmt.quantize(w)
    v = fq(w)
    assert torch.equal(v, fmt.quantize_dequantize(w, qw.full_params()))
    assert torch.equal(v, qw.dequantize())  # round-to-nearest fit: the same grid as Format.quantize
    # a moved weight on the same grid: the forward is that weight rounded, the conversion its codes
    w2 = w + 0.003 * _weight(seed=1)
    out = fq.quantized(w2)
    assert torch.equal(out.dequantize(), fq(w2)) and out.format == fmt and out.shape == tuple(w.shape)
    assert torch.equal(out.codes(), fmt.round(w2, qw.full_params()))
    started = FakeQuant(fmt, start=qw)
    assert torch.equal(started(w), qw.dequantize())


@pytest.mark.parametrize("spec", ("int4-g128", "int3-g64-sym", "int8"))
def test_gradient_passes_inside_the_grid_and_stops_where_it_clips(spec: str) -> None:
    """The grid fitted to half the weight clips the other half's large values: the gradient is
    the incoming one where ``(w − b)/a`` is within half a step of the code range, zero beyond
    (computed here in float64 from the stored scale and zero point)."""
    fmt = qf.resolve_format(spec)
    w = _weight()
    fq = FakeQuant(fmt, w * 0.5)
    wl = w.clone().requires_grad_(True)
    g_in = torch.randn_like(w)
    fq(wl).backward(g_in)
    params = fq.full_params()
    s = params["scale"].double().repeat_interleave(w.shape[1] // params["scale"].shape[1], dim=1)
    top = (1 << fmt.options.bits) - 1
    z = (params["zero"].double() if "zero" in params else torch.full_like(params["scale"], (top + 1) / 2,
                                                                          dtype=torch.float64))
    z = z.repeat_interleave(w.shape[1] // z.shape[1], dim=1)
    x = w.double() / s + z
    inside = (x >= -0.5) & (x <= top + 0.5)
    assert 0 < int((~inside).sum()) < inside.numel()  # both cases are exercised
    assert torch.equal(wl.grad, torch.where(inside, g_in, torch.zeros_like(g_in)))


def test_a_format_that_does_not_say_where_it_clips_passes_the_gradient() -> None:
    fmt = qf.resolve_format("fp8-e4m3")
    w = _weight()
    fq = FakeQuant(fmt, w)
    wl = w.clone().requires_grad_(True)
    g_in = torch.randn_like(w)
    fq(wl).backward(g_in)
    assert torch.equal(wl.grad, g_in)


@pytest.mark.parametrize("spec", ("int4-g128", "int3-g64-sym", "int2-g64"))
def test_learned_grid_gradients_are_lsq_plus(spec: str) -> None:
    """With ``learn=True`` the step and offset of each group get LSQ+'s gradients — here against
    float64 autograd through ``a · clamp(round_ste((w − b)/a), cmin, cmax) + b`` at the stored
    ``a``, ``b`` — and the forward is the stored grid's value."""
    fmt = qf.resolve_format(spec)
    w = _weight()
    fq = FakeQuant(fmt, w * 0.7, learn=True)
    with torch.no_grad():  # move the grid off its stored values: the forward must use the stored ones
        fq.a.mul_(1.0 + 1e-4)
    wl = w.clone().requires_grad_(True)
    g_in = torch.randn_like(w)
    v = fq(wl)
    v.backward(g_in)
    a, b, cmin, cmax = fmt.affine(fq.full_params(), 0, w.shape[1])
    assert torch.equal(v, fmt.quantize_dequantize(w, fq.full_params()))
    group = w.shape[1] // fq.a.shape[1]
    A = a[:, ::group].double().requires_grad_(True)
    B = b[:, ::group].double().requires_grad_(True)
    W = w.double().requires_grad_(True)
    x = (W - B.repeat_interleave(group, 1)) / A.repeat_interleave(group, 1)
    c = torch.clamp(x + (torch.round(x) - x).detach(), cmin, cmax)
    ref = A.repeat_interleave(group, 1) * c + B.repeat_interleave(group, 1)
    ref.backward(g_in.double())
    assert torch.allclose(v.double(), ref, rtol=0, atol=1e-9)
    assert torch.allclose(wl.grad.double(), W.grad, rtol=0, atol=1e-12)
    # float32 sums of a group's terms against float64 ones
    assert torch.allclose(fq.a.grad.double(), A.grad, rtol=0, atol=1e-6 * float(A.grad.abs().max()))
    assert torch.allclose(fq.b.grad.double(), B.grad, rtol=0, atol=1e-6 * float(B.grad.abs().max()))
    assert float(fq.b.grad.abs().sum()) > 0 and float(fq.a.grad.abs().sum()) > 0
    # conversion: the stored grid and the same codes
    assert torch.equal(fq.quantized(w).dequantize(), v.detach())


def test_bad_starts_are_one_line_errors() -> None:
    fmt = qf.resolve_format("int4-g128")
    w = _weight()
    with pytest.raises(ValueError, match="fit or a quantized weight"):
        FakeQuant(fmt)
    with pytest.raises(ValueError, match="cannot start from"):
        FakeQuant(fmt, start=qf.resolve_format("int8").quantize(w))
    with pytest.raises(ValueError, match="no affine grid to learn"):
        FakeQuant(qf.resolve_format("fp8-e4m3"), w, learn=True)
    with pytest.raises(ValueError, match="cannot store"):
        FakeQuant(fmt, _weight(cols=100))


@pytest.mark.parametrize("spec", ["int8", "fp8", "int8-static", "fp8-static"])
def test_a_linear_input_is_rounded_as_the_engine_rounds_it_with_a_straight_through_gradient(spec: str) -> None:
    from quantfoundry.toolkit import fake_quant_input

    act = qf.ActQuant.from_spec(spec)
    x = (torch.randn(6, 64, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_()
    scale = None if act.dynamic else torch.tensor([4.0 / act.qmax])  # static: |x| beyond 4 clips
    y = fake_quant_input(act, x, scale)
    assert torch.equal(y, act.fake_quant(x.detach(), scale))
    upstream = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    y.backward(upstream)
    inside = torch.ones_like(x, dtype=torch.bool) if act.dynamic else x.detach().abs() <= 4.0
    assert not act.dynamic and not inside.all() or act.dynamic
    assert torch.equal(x.grad, upstream * inside)
