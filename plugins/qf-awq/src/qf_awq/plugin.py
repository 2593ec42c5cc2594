"""Entry point ``awq``: registers the quantizer and the exporter through the core's hooks."""

from __future__ import annotations

from quantfoundry import hookimpl

from .exporter import HFAWQExporter
from .quantizer import AWQQuantizer


@hookimpl
def qf_register_quantizers(register):
    register(AWQQuantizer)


@hookimpl
def qf_register_exporters(register):
    register(HFAWQExporter)
