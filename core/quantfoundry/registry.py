"""Component registries: the ``register`` callable handed to hooks, name normalization,
duplicate and unknown-name errors.

Registries are built lazily from the plugin manager each time the set of registered plugins
changes, so a plugin registered in a test fixture is seen at once.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import DuplicateComponentError, UnknownComponentError


class PluginHooks(Protocol):
    """What :func:`collect` needs of the plugin manager (:class:`quantfoundry.plugins.QFPluginManager`)."""

    hook: Any

    def distribution_of(self, plugin_name: str) -> tuple[str | None, str | None]: ...

ROLES: dict[str, str] = {
    "format": "qf_register_formats",
    "quantizer": "qf_register_quantizers",
    "exporter": "qf_register_exporters",
    "kernel": "qf_register_kernels",
    "calibrator": "qf_register_calibrators",
    "evaluator": "qf_register_evaluators",
    "architecture": "qf_register_architectures",
    "planner": "qf_register_planners",
}


def normalize_name(name: str) -> str:
    """``QuIP_Sharp`` / ``quip sharp`` / ``quip-sharp`` → ``quip-sharp``."""
    return re.sub(r"[\s_]+", "-", name.strip()).lower()


@dataclass(frozen=True)
class Entry:
    """One registered component and where it came from."""

    role: str
    name: str
    component: Any
    plugin: str
    distribution: str | None = None
    version: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def origin(self) -> str:
        if self.distribution:
            return f"{self.plugin} ({self.distribution} {self.version or '?'})"
        return self.plugin

    @property
    def description(self) -> str:
        return str(getattr(self.component, "description", "") or "").strip()


@dataclass
class Registrar:
    """The ``register`` argument of every ``qf_register_*`` hook.

    ``register(component, aliases=())`` records a component (a class, or an instance for
    architectures) under ``component.name``; aliases are extra names that resolve to it.
    """

    role: str
    plugin: str
    distribution: str | None = None
    version: str | None = None
    entries: list[Entry] = field(default_factory=list)

    def __call__(self, component: Any, *, aliases: tuple[str, ...] | list[str] = ()) -> Any:
        name = getattr(component, "name", None)
        if not isinstance(name, str) or not name.strip():
            raise TypeError(
                f"{self.role} {component!r} registered by plugin {self.plugin!r} has no 'name' string attribute"
            )
        self.entries.append(
            Entry(
                role=self.role,
                name=normalize_name(name),
                component=component,
                plugin=self.plugin,
                distribution=self.distribution,
                version=self.version,
                aliases=tuple(normalize_name(a) for a in aliases),
            )
        )
        return component


class Registry:
    """All components of one role, keyed by normalized name (aliases included)."""

    def __init__(self, role: str, entries: list[Entry]):
        self.role = role
        self.entries: dict[str, Entry] = {}
        self._lookup: dict[str, Entry] = {}
        for entry in entries:
            for key in (entry.name, *entry.aliases):
                other = self._lookup.get(key)
                if other is not None and other is not entry:
                    raise DuplicateComponentError(
                        f"{self.role} {key!r} is registered by both {other.origin} and {entry.origin}; "
                        f"uninstall one or block it with QF_DISABLED_PLUGINS={entry.plugin}"
                    )
                self._lookup[key] = entry
            self.entries[entry.name] = entry

    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: str) -> bool:
        return normalize_name(name) in self._lookup

    def entry(self, name: str) -> Entry:
        key = normalize_name(name)
        if key in self._lookup:
            return self._lookup[key]
        installed = ", ".join(self.names()) or "(none)"
        close = difflib.get_close_matches(key, list(self._lookup), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UnknownComponentError(
            f"unknown {self.role} {name!r}; {hint}installed: {installed} (`qf plugins` lists them)"
        )

    def get(self, name: str) -> Any:
        return self.entry(name).component


def collect(pm: PluginHooks, role: str, on_error: Callable[[str, BaseException], None],
            trace: Callable[[str], None] | None = None) -> list[Entry]:
    """Call one registration hook on every plugin, one plugin at a time, so that each entry is
    attributed to its plugin and a plugin that raises is reported without stopping the rest.
    ``trace`` (``QF_TRACE_PLUGINS=1``) gets one line per call: hook, plugin, what it registered."""
    hook = getattr(pm.hook, ROLES[role])
    entries: list[Entry] = []
    for impl in hook.get_hookimpls():  # registration order: built-ins first
        dist, version = pm.distribution_of(impl.plugin_name)
        registrar = Registrar(role=role, plugin=impl.plugin_name, distribution=dist, version=version)
        try:
            impl.function(register=registrar)
        except Exception as exc:  # a plugin's bug must not take the others down
            if trace is not None:
                trace(f"qf trace: {ROLES[role]}(register) [plugin {impl.plugin_name}] raised {type(exc).__name__}")
            on_error(impl.plugin_name, exc)
            continue
        if trace is not None:
            names = ", ".join(e.name for e in registrar.entries) or "nothing"
            trace(f"qf trace: {ROLES[role]}(register) [plugin {impl.plugin_name}] -> {role} {names}")
        entries.extend(registrar.entries)
    return entries
