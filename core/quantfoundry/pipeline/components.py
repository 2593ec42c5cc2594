"""Turning names and option mappings into component instances, devices and dtypes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import UsageError
from ..options import parse_options
from ..plugins import get_plugin_manager

#: compute dtypes a run accepts by name
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make(role: str, name: str, options: Mapping[str, Any] | None = None) -> Any:
    """Instantiate the registered component ``name`` of ``role`` with parsed options."""
    cls = get_plugin_manager().registry(role).get(name)
    return cls(parse_options(cls.Options, options or {}, owner=f"{role} {cls.name!r}"))


def device_of(device: str | torch.device) -> torch.device:
    """``cpu``/``cuda``/``cuda:N`` as a device, refusing CUDA when torch sees none."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    return dev


def dtype_of(name: str) -> torch.dtype:
    """A compute dtype by name (float32, bfloat16, float16)."""
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]
