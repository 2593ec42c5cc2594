"""qf-quip: QuIP# (Tseng et al. 2024) for QuantFoundry — the E8P12 lattice codebook as the vector
format ``e8p`` (2 bits per weight), rounded exactly and driven by the core's LDLQ loop (BlockLDLQ)."""

from __future__ import annotations

from quantfoundry import hookimpl

from .formats import E8PFormat

__all__ = ["E8PFormat"]


@hookimpl
def qf_register_formats(register):
    register(E8PFormat)
