"""qf-quip: QuIP# (Tseng et al. 2024) for QuantFoundry — the quantizer ``quip`` (randomized Hadamard
incoherence processing + BlockLDLQ) and the E8P12 lattice codebook as the vector format ``e8p``
(2 bits per weight), rounded exactly — and the kernel ``triton-e8p`` that decodes it inside a
Triton GEMV."""

from __future__ import annotations

from quantfoundry import hookimpl

from .formats import E8PFormat
from .kernel import TritonE8P
from .quantizer import QuipQuantizer

__all__ = ["E8PFormat", "QuipQuantizer", "TritonE8P"]


@hookimpl
def qf_register_formats(register):
    register(E8PFormat)


@hookimpl
def qf_register_quantizers(register):
    register(QuipQuantizer, aliases=("quip-sharp",))


@hookimpl
def qf_register_kernels(register):
    register(TritonE8P)
