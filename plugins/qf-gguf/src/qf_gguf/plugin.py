"""Entry point ``gguf``: registers the GGML formats through the core's hooks."""

from __future__ import annotations

from quantfoundry import hookimpl

from .exporter import GGUFExporter
from .kquants import KQUANT_FORMATS
from .legacy import LEGACY_FORMATS


@hookimpl
def qf_register_formats(register):
    for cls in (*LEGACY_FORMATS, *KQUANT_FORMATS):
        register(cls)


@hookimpl
def qf_register_exporters(register):
    register(GGUFExporter)
