"""Kernel ``torch-int4`` (``aten._weight_int4pack_mm``, tinygemm): which grids it serves
exactly, the ``approximate`` mapping of other grids checked against tinygemm's own decoding
``(q − 8)·s + z`` in float64 with ``s`` and ``z`` rounded to bfloat16, and the calls it hands
on (a CPU, more than ``max_tokens`` rows)."""

from __future__ import annotations

import quantfoundry as qf
import torch
from quantfoundry.pipeline.components import make
from quantfoundry.roles.kernel import QuantLinear

CPU = torch.device("cpu")


def test_serves_exact_grids_and_approximate_ones_on_request() -> None:
    exact, approx = make("kernel", "torch-int4", {}), make("kernel", "torch-int4", {"approximate": "true"})
    assert exact.serves(qf.resolve_format("int4-g128-sym-sbf16"), CPU) is None
    for spec in ("int4-g128", "int4-g128-sym", "int4-g64-sbf16"):
        assert "approximate=true" in exact.serves(qf.resolve_format(spec), CPU)
        assert approx.serves(qf.resolve_format(spec), CPU) is None
    for spec in ("int8", "int4-g16-sym-sbf16", "int3-g128"):
        assert exact.serves(qf.resolve_format(spec), CPU) is not None
    # dispatch: a CPU call, and a CUDA-sized call over max_tokens, go to the next kernel
    fmt = qf.resolve_format("int4-g128-sym-sbf16")
    assert "CPU" in exact.serves(fmt, CPU, tokens=1)


def test_approximate_grids_decode_as_tinygemm() -> None:
    kernel = make("kernel", "torch-int4", {"approximate": "true"})
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 256, generator=g) * 0.05
    qw = qf.resolve_format("int4-g64").quantize(w)  # float16 scales, integer zero points
    x = torch.randn(6, 256, generator=g).bfloat16()
    y = QuantLinear(qw, None, kernel)(x)
    assert kernel.prepare(qw)["w"] is not None  # tinygemm ran, not the dequantized fallback
    q = qw.codes().double()
    s = qw.params["scale"].float().bfloat16().double().repeat_interleave(64, 1)
    zp = qw.params["zero"].double()
    z = ((8 - zp) * qw.params["scale"].double()).bfloat16().double().repeat_interleave(64, 1)
    w_tiny = (q - 8) * s + z
    exact = x.double() @ w_tiny.T
    mag = x.double().abs() @ w_tiny.abs().T
    assert bool(((y.double() - exact).abs() <= 2.0 ** -8 * mag + 1e-6).all())
    # and it is not our grid's weight: the bfloat16 rounding of s and z shows
    assert not torch.equal(w_tiny, qw.dequantize(torch.float64))


def test_act_order_weights_gather_the_input() -> None:
    kernel = make("kernel", "torch-int4", {})
    fmt = qf.resolve_format("int4-g128-sym-sbf16")
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(4))
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(5))
    stored = fmt.quantize(w[:, perm])
    qw = qf.QuantizedWeight(stored.format, stored.shape, stored.dtype, stored.packed, stored.params, perm)
    x = torch.randn(3, 256).bfloat16()
    y = QuantLinear(qw, None, kernel)(x)
    exact = x.double() @ qw.dequantize(torch.float64).T
    mag = x.double().abs() @ qw.dequantize(torch.float64).abs().T
    assert bool(((y.double() - exact).abs() <= 2.0 ** -7 * mag).all())
