"""The kernel kit for ``triton-e8p`` on CPU tensors, run by ``test_kernel.py`` in a subprocess with
``TRITON_INTERPRET=1`` (Triton's interpreter). Not collected on its own (no ``test_``)."""

from __future__ import annotations

from typing import ClassVar

import torch
from quantfoundry.testing.conformance import KernelConformance


class TestTritonE8PInterpreted(KernelConformance):
    kernel = "triton-e8p"
    devices = ("cpu",)
    specs = ("e8p", "e8p-row", "e8p-rvq3", "e8p-rvq4")
    # 264 columns: not a multiple of the 256-column step (masked)
    shapes: ClassVar[tuple[tuple[int, int], ...]] = ((96, 256), (40, 264))
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.bfloat16, torch.float16)


def test_transformed_weights_and_splits_against_float64() -> None:
    """Weights with their randomized Hadamard transforms (QuantLinear runs them around the
    kernel), 1, 3 and 5 tokens, splits of the input dimension 1-4, the points built from the 256
    patterns and signs, looked up in the full table, and (one token of ``e8p``) from the signed
    bytes on 2-D tiles, few tokens on CUDA cores and on tensor cores, against the float64 product of
    the original weight's approximation."""
    import quantfoundry as qf
    from qf_quip.gemv import E8PConfig, gemv
    from quantfoundry import HadamardTransform, QuantizedWeight, QuantLinear
    from quantfoundry.pipeline.components import make
    from quantfoundry.testing.conformance import KERNEL_TOLERANCE

    g = torch.Generator().manual_seed(3)
    kernel = make("kernel", "triton-e8p", {})
    for spec in ("e8p", "e8p-rvq3", "e8p-rvq4"):
        fmt = qf.resolve_format(spec)
        shape = (48, 512)
        t = HadamardTransform.random(shape, seed=7)
        w = torch.randn(shape, generator=g)
        base = fmt.quantize(t.from_dense(w))
        qw = QuantizedWeight(base.format, base.shape, base.dtype, base.packed, base.params,
                             tensor_params=base.tensor_params, transforms=(t,))
        w64 = qw.dequantize(torch.float64)
        assert (w64 - w.double()).abs().mean() < 0.5 * w.abs().mean()  # near the original weight
        lin = QuantLinear(qw, None, kernel)
        state = kernel.prepare(qw)
        for m in (1, 3, 5):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                x = torch.randn(m, shape[1], generator=g).to(dtype)
                exact = x.double() @ w64.T
                mag = x.double().abs() @ w64.abs().T
                ys = {"QuantLinear": lin(x)}
                xs = t.apply_input(x)  # the stored weight's GEMV alone, split 1-4
                stored = qw.stored_dequantize().double()
                for split, full, fma, by in ((1, False, True, False), (2, True, True, False), (4, False, False, False),
                                             (2, False, True, True)):
                    cfg = E8PConfig(32, 128, split, full=full, fma=fma, bytes=by)
                    ys[f"split {split}, full {full}, fma {fma}, bytes {by}"] = t.apply_output(gemv(xs, state["packed"], cfg, interpreting=True))
                for name, y in ys.items():
                    assert y.dtype == dtype and y.shape == (m, shape[0])
                    err = (y.double() - exact).abs()
                    # the transforms' float32 rounding on top of the kernel's own
                    bound = 2 * KERNEL_TOLERANCE[dtype] * (mag + x.double().abs() @ stored.abs().T) + 1e-5
                    assert bool((err <= bound).all()), (spec, m, dtype, name, float((err / bound).max()))


def test_hadamard_kernel_against_float64() -> None:
    """The Triton transform on both sides, at widths with and without a Paley factor (28 · 512 =
    Llama-3's 14336 and 4096) and one it does not take (48: ``None``), against ``x Qᵀ`` / ``x Q``
    with the float64 matrix ``Q``; within two roundings of the inputs' type (TF32 intermediate)."""
    from qf_quip.rht import rht
    from quantfoundry import HadamardTransform
    from quantfoundry.toolkit.hadamard import RandomHadamard

    g = torch.Generator().manual_seed(4)
    eps = {torch.float32: 1e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}
    for n in (4096, 28 * 512):
        t = HadamardTransform.random((n, n), seed=n)
        for side, inverse in (("in", False), ("out", True)):
            q = RandomHadamard(t.signs(side)).matrix()
            for dtype in eps:
                x = torch.randn(3, n, generator=g).to(dtype)
                want = x.double() @ (q if inverse else q.T)
                got = rht(x, t.signs(side), inverse=inverse, interpreting=True)
                assert got.dtype == dtype and got.shape == x.shape
                err = (got.double() - want).abs().max() / want.abs().max()
                assert err <= 2 * eps[dtype], (n, side, dtype, float(err))
    assert rht(torch.randn(2, 48), torch.ones(48), inverse=False, interpreting=True) is None
