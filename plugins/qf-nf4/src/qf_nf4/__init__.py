"""qf-nf4: bitsandbytes' 4-bit formats ``nf4`` and ``fp4`` (QLoRA's NormalFloat and bitsandbytes'
e2m1 float), bit-exact with ``bitsandbytes.functional.quantize_4bit``; any quantizer that drives
formats (RTN, GPTQ, AWQ) rounds onto them; the exporter ``bnb-4bit`` writes the checkpoint
transformers loads with bitsandbytes."""

from __future__ import annotations

from quantfoundry import hookimpl

from .exporter import BnB4BitExporter
from .formats import FP4Format, NF4Format, code_table

__all__ = ["BnB4BitExporter", "FP4Format", "NF4Format", "code_table"]


@hookimpl
def qf_register_formats(register):
    register(NF4Format)
    register(FP4Format)


@hookimpl
def qf_register_exporters(register):
    register(BnB4BitExporter)
