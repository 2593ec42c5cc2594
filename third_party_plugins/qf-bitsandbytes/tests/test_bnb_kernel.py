"""The ``bnb-4bit`` kernel: bitsandbytes' matmul on our nf4/fp4 weights equals the reference
kernel (the kit's check) and a float64 product with the dequantized weight; a whole model
evaluates the same through it; without bitsandbytes it says how to get it."""

from __future__ import annotations

import bitsandbytes  # noqa: F401  a dependency of the adapter: missing, the tests fail, never skip
import quantfoundry as qf
import torch
from quantfoundry.testing.conformance import KernelConformance


class TestBnB4BitKernelConformance(KernelConformance):
    kernel = "bnb-4bit"
    specs = ("nf4", "fp4", "nf4-b128", "nf4-dq", "int4-g128")  # int4 is not served: the kit skips it


def test_float64_reference() -> None:
    from qf_bitsandbytes import BnB4BitKernel

    fmt = qf.resolve_format("nf4")
    qw = fmt.quantize(torch.randn(48, 256, generator=torch.Generator().manual_seed(0)) * 0.05)
    x = torch.randn(5, 256)
    kernel = BnB4BitKernel()
    out = kernel.forward(x, qw, kernel.prepare(qw), None)
    ref = (x.double() @ qw.dequantize(torch.float64).T).float()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_a_model_evaluates_the_same_through_it(tiny_model) -> None:
    folder = tiny_model("llama", hidden_size=256, intermediate_size=512, head_dim=64)
    runs = [qf.run(str(folder), format="nf4", out=None, progress=False, kernel=k,
                   evaluators=[("kl", {"max_tokens": "1024"})]) for k in ("torch-dequant", "bnb-4bit")]
    a, b = (r.metrics["kl"]["kl_mean"]["quantized"] for r in runs)
    assert abs(a - b) <= 1e-4 * max(a, 1e-6) + 1e-7


def test_missing_bitsandbytes_names_the_pip_command(monkeypatch) -> None:
    import qf_bitsandbytes

    monkeypatch.setattr(qf_bitsandbytes, "_bnb", lambda: None)
    reason = qf_bitsandbytes.BnB4BitKernel().serves(qf.resolve_format("nf4"), torch.device("cpu"))
    assert reason == "it needs bitsandbytes: pip install bitsandbytes"
    assert qf_bitsandbytes.BnB4BitKernel().serves(qf.resolve_format("int4-g128"), torch.device("cpu"))
