"""AWQ for QuantFoundry: the ``awq`` quantizer and the ``hf-awq`` checkpoint exporter."""

__version__ = "0.1.0"
