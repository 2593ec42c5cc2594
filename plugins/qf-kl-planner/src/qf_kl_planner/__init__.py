"""qf-kl-planner: mixed precision at a size budget — every tensor's format chosen among the
exporter's by the output KL it adds alone, measured on calibration text."""

from __future__ import annotations

from quantfoundry import hookimpl

from .planner import KLPlanner

__all__ = ["KLPlanner"]


@hookimpl
def qf_register_planners(register):
    register(KLPlanner)
