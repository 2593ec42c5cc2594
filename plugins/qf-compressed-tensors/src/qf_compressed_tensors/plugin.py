"""Entry point ``compressed-tensors``: registers the exporter through the core's hooks."""

from __future__ import annotations

from quantfoundry import hookimpl

from .exporter import CompressedTensorsExporter


@hookimpl
def qf_register_exporters(register):
    register(CompressedTensorsExporter)
