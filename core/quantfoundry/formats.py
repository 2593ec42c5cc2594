"""Resolving ``--format`` specs (``int4-g128``, ``q4_k``) to Format instances."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .errors import OptionsError, UnknownComponentError
from .options import Options, parse_options
from .plugins import get_plugin_manager
from .registry import normalize_name
from .roles.format import Format


def resolve_format(spec: str, options: Mapping[str, Any] | None = None) -> Format:
    """A format from a registered name (plus options) or a short spec claimed by a format.

    ``resolve_format("int", {"bits": "3"})`` and ``resolve_format("int3-g128")`` both work;
    options given alongside a short spec override what the spec says.
    """
    registry = get_plugin_manager().registry("format")
    options = dict(options or {})
    if spec in registry:
        entry = registry.entry(spec)
        cls: type[Format] = entry.component
        return cls(parse_options(cls.Options, options, owner=f"format {cls.name!r}"))
    for entry in registry.entries.values():
        cls = entry.component
        try:
            parsed: Options | None = cls.from_spec(spec)
        except ValueError as exc:
            raise OptionsError(f"format {spec!r}: {exc}; syntax: {cls.spec_help()}") from None
        if parsed is None:
            continue
        if options:
            merged = {**_as_strings(parsed), **options}
            parsed = parse_options(cls.Options, merged, owner=f"format {spec!r}")
        return cls(parsed)
    hints = "; ".join(e.component.spec_help() for e in registry.entries.values())
    raise UnknownComponentError(f"unknown format {spec!r}; formats: {hints} (`qf formats` lists them)")


def format_from_json(data: Mapping[str, Any]) -> Format:
    """Rebuild a format from :meth:`Format.to_json` output (manifests, artifacts)."""
    registry = get_plugin_manager().registry("format")
    cls: type[Format] = registry.get(normalize_name(str(data["name"])))
    return cls(parse_options(cls.Options, data.get("options", {}), owner=f"format {cls.name!r}"))


def _as_strings(options: Options) -> dict[str, Any]:
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
