"""The conformance kit fails components that break a contract (run in a child pytest)."""

from __future__ import annotations

pytest_plugins = ["pytester"]

BROKEN = '''
import torch
import quantfoundry as qf
from quantfoundry import hookimpl
from quantfoundry.testing.conformance import FormatConformance, KernelConformance
from quantfoundry.toolkit import IntFormat, pack_bits
import torch.nn.functional as F


class BadPacking(IntFormat):
    """int4 whose packer drops the top bit of every code."""
    name = "bad-packing"

    @property
    def spec(self):
        return "bad-packing"

    @classmethod
    def from_spec(cls, spec):
        return cls.Options() if spec == "bad-packing" else None

    def pack(self, codes):
        return pack_bits(codes & 7, self.code_bits())


class WrongBytes(IntFormat):
    """int4 that under-counts its parameter bytes."""
    name = "wrong-bytes"

    @property
    def spec(self):
        return "wrong-bytes"

    @classmethod
    def from_spec(cls, spec):
        return cls.Options() if spec == "wrong-bytes" else None

    def param_nbytes(self, shape):
        return 0


class OffKernel(qf.Kernel):
    name = "off-kernel"

    def forward(self, x, qw, state, bias):
        return F.linear(x, qw.dequantize(x.dtype) * 1.01, bias)


class P:
    @hookimpl
    def qf_register_formats(self, register):
        register(BadPacking)
        register(WrongBytes)

    @hookimpl
    def qf_register_kernels(self, register):
        register(OffKernel)


import pytest

@pytest.fixture(autouse=True)
def plugin(register_plugin):
    register_plugin(P(), "broken-components")


class TestBadPacking(FormatConformance):
    spec = "bad-packing"


class TestWrongBytes(FormatConformance):
    spec = "wrong-bytes"


class TestInt4(FormatConformance):
    spec = "int4-g128"


class TestOffKernel(KernelConformance):
    kernel = "off-kernel"
    devices = ("cpu",)
'''


def test_the_kit_fails_broken_components_and_passes_good_ones(pytester) -> None:
    pytester.makeconftest('pytest_plugins = ["quantfoundry.testing"]')
    pytester.makepyfile(test_broken=BROKEN)
    result = pytester.runpytest("-q", "-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    failed = {line.split("::")[1] + "::" + line.split("::")[2].split(" ")[0]
              for line in result.outlines if line.startswith("FAILED")}
    assert "TestBadPacking::test_codes_survive_packing_and_decode_to_the_dequantized_weight" in failed
    assert "TestWrongBytes::test_nbytes_counts_the_stored_bytes" in failed
    assert "TestOffKernel::test_outputs_equal_the_reference_kernel[cpu]" in failed
    assert not any(f.startswith("TestInt4::") for f in failed)
    assert outcomes["failed"] == 3, result.outlines
