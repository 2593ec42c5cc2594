"""Turning names and option mappings into component instances, devices and dtypes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import UnknownComponentError, UsageError
from ..formats import resolve_format
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


def exporter_and_format(exporter: str | None, exporter_options: Mapping[str, Any] | None, format: str | None,
                        format_options: Mapping[str, Any] | None) -> tuple[str, dict[str, Any], str | None, str | None]:
    """The exporter and format a request means, as ``(exporter, exporter options, format, note)``.

    A ``format`` that is no format but an exporter's preset (``--format Q4_K_M``, a llama.cpp
    file type) selects that preset of that exporter — of the exporter asked for, or, when none
    was, of the one exporter offering it (``note`` says so). ``exporter`` None means ``qf``.
    """
    options = dict(exporter_options or {})
    if format is None:
        return exporter or "qf", options, None, None
    try:
        resolve_format(format, format_options)
        return exporter or "qf", options, format, None
    except UnknownComponentError as unknown:
        owners = {name: preset for name, entry in get_plugin_manager().registry("exporter").entries.items()
                  if (preset := entry.component.preset_options(format)) is not None}
        if not owners:
            raise unknown from None
    choices = " or ".join(f"--exporter {n} " + " ".join(f"--exporter-opt {k}={v}" for k, v in o.items())
                          for n, o in owners.items())
    chosen = exporter if exporter in owners else (next(iter(owners)) if exporter is None and len(owners) == 1 else None)
    if chosen is None:
        what = f"exporter {exporter!r} has no preset {format!r}" if exporter else f"{format!r} is a preset of several exporters"
        raise UsageError(f"{format!r} is no format: {what}; type {choices}")
    preset = owners[chosen]
    for key, value in preset.items():
        if key in options and str(options[key]).lower() != str(value).lower():
            raise UsageError(f"--format {format} selects {key}={value} of exporter {chosen!r}, but "
                             f"--exporter-opt {key}={options[key]} was given too; keep one of them")
    note = None if exporter else (f"--format {format} is a preset of exporter {chosen!r}: writing it as "
                                  f"{choices}")
    return chosen, {**options, **preset}, None, note
