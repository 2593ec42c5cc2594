"""The plugin manager: built-ins, entry points, blocking, load errors.

Load order (documented in ``docs/plugin-hooks.md``):

1. names blocked with ``QF_DISABLED_PLUGINS=a,b`` or ``qf -p no:NAME`` are never loaded;
2. built-in plugins (:data:`DEFAULT_PLUGINS`), registered exactly like outside ones;
3. entry points of the group ``quantfoundry``, unless ``QF_DISABLE_PLUGIN_AUTOLOAD=1``;
   ``QF_LOAD_PLUGINS=a,b`` loads only those entry points.

A plugin that raises on import, or while registering, is recorded in :attr:`load_errors`,
reported by ``qf plugins`` and as a warning, and the rest keep working.
``QF_TRACE_PLUGINS=1`` prints every hook call.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
import traceback
import warnings
from dataclasses import dataclass
from typing import Any

import pluggy

from . import hookspecs
from .hookspecs import PROJECT
from .registry import ROLES, Entry, Registry, collect

ENTRY_POINT_GROUP = "quantfoundry"

#: Built-in plugins: modules implementing the same hooks as outside plugins.
DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = (
    ("architectures", "quantfoundry.builtin.architectures"),
    ("int-format", "quantfoundry.builtin.int_format"),
    ("rtn", "quantfoundry.builtin.rtn"),
    ("torch-dequant", "quantfoundry.builtin.torch_dequant"),
    ("text-calibrator", "quantfoundry.builtin.text_calibrator"),
    ("perplexity", "quantfoundry.builtin.perplexity"),
    ("size", "quantfoundry.builtin.size"),
    ("kl", "quantfoundry.builtin.kl"),
    ("speed", "quantfoundry.builtin.speed"),
    ("calibration-mismatch", "quantfoundry.builtin.calibration_mismatch"),
    ("qf-exporter", "quantfoundry.builtin.qf_exporter"),
)


@dataclass(frozen=True)
class PluginLoadFailure:
    """A plugin that could not be imported or could not register its components."""

    name: str
    distribution: str | None
    version: str | None
    stage: str  # "import" or "register"
    error: str
    traceback: str

    def message(self) -> str:
        origin = f" ({self.distribution} {self.version})" if self.distribution else ""
        return (
            f"plugin {self.name!r}{origin} failed to {self.stage}: {self.error}; its components are "
            f"unavailable (QF_DISABLED_PLUGINS={self.name} hides this warning)"
        )


def _env_list(var: str) -> list[str]:
    return [s.strip() for s in os.environ.get(var, "").split(",") if s.strip()]


class QFPluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers where each plugin came from and what failed."""

    def __init__(self) -> None:
        super().__init__(PROJECT)
        self.add_hookspecs(hookspecs)
        self.load_errors: list[PluginLoadFailure] = []
        self._dists: dict[str, tuple[str | None, str | None]] = {}
        self._registries: dict[str, tuple[tuple[int, ...], Registry]] = {}
        self._loaded = False

    # -- loading -------------------------------------------------------------------------
    def load(self, blocked: list[str] | tuple[str, ...] = ()) -> QFPluginManager:
        """Block, then register built-ins and entry points. Idempotent."""
        if self._loaded:
            for name in blocked:
                self.block(name)
            return self
        self._loaded = True
        for name in [*_env_list("QF_DISABLED_PLUGINS"), *blocked]:
            self.set_blocked(name)
        for name, module in DEFAULT_PLUGINS:
            if self.is_blocked(name):
                continue
            self.register(importlib.import_module(module), name=name)
        if os.environ.get("QF_DISABLE_PLUGIN_AUTOLOAD", "").strip() not in ("", "0"):
            pass
        else:
            self.load_entry_points()
        self.check_pending()
        if os.environ.get("QF_TRACE_PLUGINS"):
            self.trace.root.setwriter(lambda msg: sys.stderr.write(msg))
            self.enable_tracing()
        return self

    def load_entry_points(self) -> None:
        allow = set(_env_list("QF_LOAD_PLUGINS"))
        seen: set[str] = set()
        for dist in importlib.metadata.distributions():
            for ep in dist.entry_points:
                if ep.group != ENTRY_POINT_GROUP or ep.name in seen:
                    continue
                seen.add(ep.name)
                if (allow and ep.name not in allow) or self.is_blocked(ep.name):
                    continue
                if self.get_plugin(ep.name) is not None:
                    continue
                dist_name = dist.metadata["Name"] if dist.metadata else None
                try:
                    plugin = ep.load()
                    self.register(plugin, name=ep.name)
                except Exception as exc:
                    self._fail(ep.name, "import", exc, (dist_name, dist.version))
                    continue
                self._dists[ep.name] = (dist_name, dist.version)

    def block(self, name: str) -> None:
        """Block (and unregister if present) a plugin by name, like ``-p no:NAME``."""
        if self.get_plugin(name) is not None:
            self.unregister(name=name)
        self.set_blocked(name)

    def _fail(self, name: str, stage: str, exc: BaseException, dist: tuple[str | None, str | None]) -> None:
        failure = PluginLoadFailure(
            name=name,
            distribution=dist[0],
            version=dist[1],
            stage=stage,
            error=f"{type(exc).__name__}: {exc}".strip().splitlines()[0],
            traceback="".join(traceback.format_exception(exc)),
        )
        if failure not in self.load_errors:
            self.load_errors.append(failure)
            warnings.warn(failure.message(), RuntimeWarning, stacklevel=3)

    def distribution_of(self, plugin_name: str) -> tuple[str | None, str | None]:
        return self._dists.get(plugin_name, (None, None))

    # -- registries ----------------------------------------------------------------------
    def registry(self, role: str) -> Registry:
        """The registry of ``role``, rebuilt whenever the registered plugins changed."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        key = tuple(id(p) for p in self.get_plugins())
        cached = self._registries.get(role)
        if cached is not None and cached[0] == key:
            return cached[1]
        entries = collect(self, role, on_error=lambda plugin, exc: self._fail(
            plugin, "register", exc, self.distribution_of(plugin)))
        registry = Registry(role, entries)
        self._registries[role] = (key, registry)
        return registry

    def entries(self) -> list[Entry]:
        return [e for role in ROLES for e in self.registry(role).entries.values()]

    def plugin_names(self) -> list[str]:
        return [name for name, _ in self.list_name_plugin()]


_manager: QFPluginManager | None = None


def get_plugin_manager(blocked: list[str] | tuple[str, ...] = ()) -> QFPluginManager:
    """The process-wide plugin manager, loaded on first use."""
    global _manager
    if _manager is None:
        _manager = QFPluginManager()
    return _manager.load(blocked)


def reset_plugin_manager() -> None:
    """Forget the process-wide manager (tests; ``qf -p no:NAME`` before first use)."""
    global _manager
    _manager = None


def get_component(role: str, name: str) -> Any:
    """Look up a registered component (class, or architecture instance) by role and name."""
    return get_plugin_manager().registry(role).get(name)
