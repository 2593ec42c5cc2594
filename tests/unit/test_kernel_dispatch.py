"""QuantLinear's choice of kernel per call (``Kernel.serves(fmt, device, tokens)``): the first
kernel, best first, that accepts the call's token count runs it; the last takes any call; a
forced kernel runs every call. The weight view and each kernel's state are built once and
rebuilt after ``.to()``."""

from __future__ import annotations

from typing import Any

import pytest
import quantfoundry as qf
import torch
import torch.nn.functional as F
from quantfoundry.errors import IncompatiblePlanError
from quantfoundry.roles.kernel import Kernel, QuantLinear
from quantfoundry.toolkit import select_kernels


class Small(Kernel):
    """Serves calls of at most 4 tokens; counts its prepares and calls."""

    name = "small-test"
    priority = 5

    def __init__(self) -> None:
        self.prepared = 0
        self.calls: list[int] = []

    def serves(self, fmt: qf.Format, device: torch.device, tokens: int | None = None) -> str | None:
        return None if tokens is None or tokens <= 4 else "slower than a dense GEMM above 4 tokens"

    def prepare(self, qw: qf.QuantizedWeight) -> Any:
        self.prepared += 1
        return qw.dequantize(torch.float64)

    def forward(self, x: torch.Tensor, qw: qf.QuantizedWeight, state: Any, bias: torch.Tensor | None) -> torch.Tensor:
        self.calls.append(x.numel() // x.shape[-1])
        return F.linear(x.double(), state, None if bias is None else bias.double()).to(x.dtype)


def _linear(kernels: Any) -> QuantLinear:
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    return QuantLinear(qf.resolve_format("int4-g32").quantize(w), torch.randn(24), kernels)


def test_each_call_runs_on_the_first_kernel_that_accepts_its_tokens() -> None:
    small, ref = Small(), qf.get_component("kernel", "torch-dequant")()
    lin = _linear([small, ref])
    expect = F.linear(torch.ones(1, 64, dtype=torch.float64), lin.qweight.dequantize(torch.float64),
                      lin.bias.double())
    for shape, who in (((1, 64), small), ((2, 2, 64), small), ((3, 2, 64), ref), ((1, 64), small), ((5, 64), ref)):
        y = lin(torch.ones(shape))
        assert lin.kernel is who, shape
        assert y.shape == (*shape[:-1], 24)
        torch.testing.assert_close(y.reshape(-1, 24)[0].double(), expect[0], rtol=1e-5, atol=1e-5)
    assert small.calls == [1, 4, 1] and small.prepared == 1
    assert lin.qweight is lin.qweight  # one view, kept between calls
    assert "small-test|torch-dequant" in repr(lin)


def test_a_single_kernel_runs_every_call() -> None:
    small = Small()
    lin = _linear(small)  # forced (--kernel): its serves(tokens) is not asked
    lin(torch.ones(9, 64))
    assert small.calls == [9]


def test_to_rebuilds_the_view_and_states() -> None:
    small = Small()
    lin = _linear([small, qf.get_component("kernel", "torch-dequant")()])
    lin(torch.ones(1, 64))
    view = lin.qweight
    lin.to(torch.float64)  # the float buffers are new tensors
    assert lin.qweight is not view and lin.qweight.params["scale"].dtype == torch.float64
    lin(torch.ones(1, 64, dtype=torch.float64))
    assert small.prepared == 2
    lin.input_scale = None  # replacing a buffer forgets the view too
    assert lin.qweight is not view


def test_select_kernels_lists_the_serving_kernels_best_first() -> None:
    fmt = qf.resolve_format("int8-sym")
    names = [k.name for k in select_kernels(fmt, torch.device("cpu"))]
    assert names[0] == "torch-dequant" and "torch-w8a8" in names  # the W8A8 kernel is opt-in (priority -1)
    assert [k.name for k in select_kernels(fmt, torch.device("cpu"), "torch-w8a8")] == ["torch-w8a8"]
    with pytest.raises(IncompatiblePlanError, match="cannot run int4"):
        select_kernels(qf.resolve_format("int4-g32"), torch.device("cpu"), "torch-w8a8")


def test_qf_kernels_lists_formats_and_token_ranges() -> None:
    from click.testing import CliRunner
    from quantfoundry.cli import cli

    r = CliRunner().invoke(cli, ["kernels", "--device", "cpu"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rows: list[list[str]] = []  # the table's rows, each cell's wrapped lines joined
    for line in r.output.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if not cells:
            continue
        if cells[0]:
            rows.append(cells)
        else:
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells)]
    lines = {row[0]: " | ".join(row) for row in rows}
    assert "any" in lines["torch-dequant"] and "Q4_K" in lines["torch-dequant"]
    # tinygemm runs its grids on a CPU only when forced: the dequantized GEMM is the faster path there
    assert "int4-g128-sym-sbf16" in lines["torch-int4"] and "none unless forced" in lines["torch-int4"]
    assert "int8-sym" in lines["torch-w8a8"]


def test_swap_in_keeps_the_bias_of_a_linear_and_of_a_quantized_linear_it_replaces() -> None:
    """A refined weight (``Quantizer.refine_model``) replaces a ``QuantLinear``: its bias stays."""
    from quantfoundry.toolkit import select_kernel, swap_in

    root = torch.nn.Sequential(torch.nn.Linear(128, 8, bias=True))
    bias = root[0].bias.detach().clone()
    fmt = qf.resolve_format("int4-g64")
    kernel = select_kernel(fmt, torch.device("cpu"))
    first = swap_in(root, "0", fmt.quantize(root[0].weight.detach()), kernel)
    assert torch.equal(first.bias, bias)
    second = swap_in(root, "0", fmt.quantize(torch.randn(8, 128)), kernel)
    assert second is root[0] and torch.equal(second.bias, bias)
