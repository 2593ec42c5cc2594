"""The kernel kit for ``triton-w4a16`` on CPU tensors, run by ``test_wa16.py`` in a subprocess
with ``TRITON_INTERPRET=1`` (Triton's interpreter). Not collected on its own (no ``test_``)."""

from __future__ import annotations

from typing import ClassVar

import torch
from quantfoundry.testing.conformance import KernelConformance


class TestTritonWA16Interpreted(KernelConformance):
    kernel = "triton-w4a16"
    devices = ("cpu",)
    # sym/asym, groups 32-128, per channel, float16 zero points, 8 bits; the last shape is not a
    # multiple of 16 columns (dequantized instead)
    specs = ("int4-g128", "int4-g32-sym", "int4", "int4-g64-zf16", "int8-g64", "int8")
    shapes: ClassVar[tuple[tuple[int, int], ...]] = ((96, 256), (40, 512), (24, 200))
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.bfloat16, torch.float16)
