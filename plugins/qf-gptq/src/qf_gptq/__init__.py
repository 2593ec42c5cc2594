"""GPTQ for QuantFoundry: the ``gptq`` quantizer and the ``hf-gptq`` checkpoint exporter."""

__version__ = "0.1.0"
