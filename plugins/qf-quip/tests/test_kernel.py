"""``triton-e8p``: the kernel kit (every e8p format, float32/bf16/fp16 inputs, 1–33 rows, float64
error bound, NaN-poisoned memory) and the Hadamard-transformed weights QuIP# makes — on CPU CI
through Triton's interpreter (``interpreted_kit.py`` in a subprocess with ``TRITON_INTERPRET=1``),
compiled on a CUDA device; the codes' split into stages against the format's decode; dispatch."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import quantfoundry as qf
import torch
from quantfoundry.pipeline.components import make
from quantfoundry.testing import assert_passes_in_triton_interpreter
from quantfoundry.testing.conformance import KernelConformance

HERE = Path(__file__).resolve().parent


def test_the_kit_passes_in_tritons_interpreter() -> None:
    assert_passes_in_triton_interpreter(HERE / "interpreted_kit.py")


class TestTritonE8P(KernelConformance):
    """The same kit, compiled, on the GPU machine."""

    kernel = "triton-e8p"
    devices = ("cuda",)
    specs = ("e8p", "e8p-row", "e8p-rvq3", "e8p-rvq4")
    shapes: ClassVar[tuple[tuple[int, int], ...]] = ((96, 256), (40, 264), (1024, 4096))
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("spec", ["e8p", "e8p-rvq3", "e8p-rvq4"])
def test_prepared_stages_decode_to_the_formats_weight(spec: str) -> None:
    """The repacked stages looked up in the tables (plain torch indexing) give the format's own
    decode: the split of the codes, the int16 wrap of 16-bit codes and the float16 tables."""
    fmt = qf.resolve_format(spec)
    qw = fmt.quantize(torch.randn(16, 128, generator=torch.Generator().manual_seed(0)))
    from qf_quip.gemv import tables

    p = make("kernel", "triton-e8p", {}).prepare(qw)["packed"]
    books = tables("cpu", torch.float16)
    first = p.first.to(torch.int64) & 0xFFFF
    w = books["e8p"].float()[first]
    if p.second is not None:
        w = w + books[p.second_book].float()[p.second.to(torch.int64) & 0xFFFF] * p.resid
    got = w.reshape(16, 128) * p.scale[:, None]
    assert torch.allclose(got, qw.stored_dequantize(), rtol=1e-6, atol=1e-7)


def test_serves_e8p_formats_on_cuda_up_to_max_tokens() -> None:
    kernel = make("kernel", "triton-e8p", {"max_tokens": "8"})
    cuda = torch.device("cuda")
    fmt = qf.resolve_format("e8p")
    assert kernel.serves(qf.resolve_format("int4-g128"), cuda) is not None
    assert "CUDA" in kernel.serves(fmt, torch.device("cpu"))
    assert kernel.serves(fmt, cuda, tokens=8) is None
    assert "above 8 tokens" in kernel.serves(fmt, cuda, tokens=9)
    with pytest.raises(qf.QFError, match="max_tokens must be 1-16"):
        make("kernel", "triton-e8p", {"max_tokens": "32"})
