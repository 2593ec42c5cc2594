"""SmoothQuant for QuantFoundry: the ``smoothquant`` transform."""

__version__ = "0.1.0"
