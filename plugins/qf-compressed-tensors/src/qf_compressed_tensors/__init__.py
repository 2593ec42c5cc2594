"""compressed-tensors for QuantFoundry: the ``compressed-tensors`` exporter (vLLM's native format)."""

__version__ = "0.1.0"
