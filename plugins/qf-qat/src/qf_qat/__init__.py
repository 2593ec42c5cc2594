"""qf-qat: quantization-aware training onto any registered format (int, NF4, GGUF K-quants, …),
handed to any exporter."""

from __future__ import annotations

from quantfoundry import hookimpl

from .quantizer import QATQuantizer

__all__ = ["QATQuantizer"]


@hookimpl
def qf_register_quantizers(register):
    register(QATQuantizer)
