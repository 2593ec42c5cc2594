"""Entry point ``smoothquant``: registers the transform through the core's hooks."""

from __future__ import annotations

from quantfoundry import hookimpl

from .transform import SmoothQuant


@hookimpl
def qf_register_quantizers(register):
    register(SmoothQuant)
