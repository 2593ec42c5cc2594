"""qf-hqq: Half-Quadratic Quantization (calibration-free zero-point optimisation) onto any affine
grid; ``int<b>-g<group>-zf16`` keeps its fractional zero points."""

from __future__ import annotations

from quantfoundry import hookimpl

from .quantizer import HQQQuantizer, optimize_zero, shrink

__all__ = ["HQQQuantizer", "optimize_zero", "shrink"]


@hookimpl
def qf_register_quantizers(register):
    register(HQQQuantizer)
