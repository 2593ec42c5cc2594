"""Registers qf-triton's kernel through the same hook as every other kernel."""

from __future__ import annotations

from quantfoundry import hookimpl

from .kernel import TritonWA16


@hookimpl
def qf_register_kernels(register):
    register(TritonWA16)
