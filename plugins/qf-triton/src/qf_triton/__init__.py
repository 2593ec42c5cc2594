"""Triton kernels for QuantFoundry: ``triton-w4a16``."""

__version__ = "0.1.0"
