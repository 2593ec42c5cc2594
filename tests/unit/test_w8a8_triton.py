"""The Triton ends of the ``torch-w8a8`` kernel (``quantfoundry.builtin.w8a8_triton``): the
input codes and per-token scales bit for bit those of :class:`~quantfoundry.ActQuant` (whose
numerics ``test_activations.py`` checks against vLLM's formulas in float64), and the rescale
``acc · s_x · s_w + b`` against float64. On CPU CI the kernels run in Triton's interpreter (a
subprocess with ``TRITON_INTERPRET=1``); with a CUDA device, compiled, in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, ClassVar

import pytest
import torch
from quantfoundry.testing.conformance import KernelConformance

CHECK = """
import torch
from quantfoundry import ActQuant
from quantfoundry.builtin import w8a8_triton as wt

dev = {device!r}
g = torch.Generator().manual_seed(0)
x = torch.randn(7, 300, generator=g) * torch.logspace(-4, 2, 300)  # fp8 subnormals to saturation
x[2] = 0                                               # a zero token: int8 codes 0, fp8 scale floor
x[3, :6] = torch.tensor([0.5, 1.5, 2.5, -2.5, -0.5, -1e-6])  # halves; a negative that rounds to -0
x[3, 6] = 600.0
x = x.to(dev)
for spec in ("int8", "int8-static", "fp8", "fp8-static"):
    act = ActQuant.from_spec(spec)
    scale = None if act.dynamic else act.scale_for(0.3 * x.abs().amax().reshape(1))  # some clip
    for dtype in (torch.float32, torch.bfloat16):
        xs = x.to(dtype)
        codes, sx = wt.quantize_rows(xs, act, scale, min_rows=17)
        assert codes.shape == (17, 300), codes.shape
        if act.dynamic:
            want, want_s = act.quantize_dynamic(xs)
            assert torch.equal(sx, want_s), (spec, dtype)
        else:
            want = act.quantize(xs, scale)
            assert sx.shape == (1, 1) and sx.item() == scale.item()
        got8, want8 = codes[:7].view(torch.int8), want.view(torch.int8)
        assert torch.equal(got8, want8), (spec, dtype, (got8 != want8).nonzero()[:5].tolist())
    # a strided input (a view of a wider tensor) quantizes as its copy
    wide = torch.cat([x, x], dim=1)[:, 300:]
    assert torch.equal(wt.quantize_rows(wide, act, scale)[0].view(torch.int8),
                       wt.quantize_rows(wide.contiguous(), act, scale)[0].view(torch.int8))

acc = torch.randint(-2**20, 2**20, (17, 50), dtype=torch.int32, generator=g).to(dev)
sw, b = torch.rand(1, 50, generator=g).to(dev), torch.randn(50, generator=g).to(dev)
for sx in (torch.rand(5, 1, generator=g).to(dev), torch.tensor([[0.37]], device=dev)):
    for bias in (None, b):
        for a in (acc, acc.float()):
            y = wt.rescale(a, 5, sx, sw, bias, torch.float32)
            ref = a[:5].double() * sx.double() * sw.double() + (0 if bias is None else bias.double())
            assert y.shape == (5, 50) and y.dtype == torch.float32
            torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6)
print("same")
"""


def test_triton_ends_match_actquant_interpreted() -> None:
    """The kernels as Triton's interpreter runs them on CPU tensors (CPU CI)."""
    import triton  # noqa: F401  (the core's [testing] extra installs it: the check must run on CPU CI)

    if torch.cuda.is_available():
        pytest.skip("a CUDA device runs the compiled kernels instead (test_triton_ends_match_actquant_on_cuda)")
    done = subprocess.run([sys.executable, "-c", CHECK.format(device="cpu")], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "same", done.stderr[-3000:]


def test_triton_ends_match_actquant_on_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the interpreted test checks the same kernels on CPU")
    exec(CHECK.format(device="cuda"), {})


class TestW8A8Fused(KernelConformance):
    """The kernel with its Triton ends (``fuse=true``) through the kit, on the GPU machine."""

    kernel = "torch-w8a8"
    options: ClassVar[dict[str, Any]] = {"fuse": "true"}
    devices = ("cuda",)
    specs = ("int8-sym", "fp8-e4m3")
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.bfloat16, torch.float16)
    act_specs = (("int8-sym", "int8"), ("int8-sym", "int8-static"), ("fp8-e4m3", "fp8"),
                 ("fp8-e4m3-tensor", "fp8-static"))
