"""Entry point ``gptq``: registers the quantizer and the exporter through the core's hooks."""

from __future__ import annotations

from quantfoundry import hookimpl

from .exporter import HFGPTQExporter
from .quantizer import GPTQQuantizer


@hookimpl
def qf_register_quantizers(register):
    register(GPTQQuantizer)


@hookimpl
def qf_register_exporters(register):
    register(HFGPTQExporter)
