"""Entry point ``awq``: registers the quantizer, its transform and the exporter through the core's hooks."""

from __future__ import annotations

from quantfoundry import hookimpl

from .exporter import HFAWQExporter
from .quantizer import AWQQuantizer, AWQScale


@hookimpl
def qf_register_quantizers(register):
    register(AWQQuantizer)
    register(AWQScale)


@hookimpl
def qf_register_exporters(register):
    register(HFAWQExporter)
