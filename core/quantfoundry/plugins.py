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

import difflib
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
    ("fp8-format", "quantfoundry.builtin.fp8_format"),
    ("rtn", "quantfoundry.builtin.rtn"),
    ("torch-dequant", "quantfoundry.builtin.torch_dequant"),
    ("torch-w8a8", "quantfoundry.builtin.w8a8_kernel"),
    ("torch-int4", "quantfoundry.builtin.int4_kernel"),
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
        #: things loading skipped that the user should hear about (shadowed or duplicate entry
        #: points, blocked names that match no plugin); each is also a ``RuntimeWarning``
        self.notices: list[str] = []
        self._dists: dict[str, tuple[str | None, str | None]] = {}
        self._registries: dict[str, tuple[tuple[int, ...], Registry]] = {}
        self._loaded = False
        self._trace = False

    # -- loading -------------------------------------------------------------------------
    def load(self, blocked: list[str] | tuple[str, ...] = ()) -> QFPluginManager:
        """Block, then register built-ins and entry points. Idempotent."""
        if self._loaded:
            for name in blocked:
                self.block(name)
            return self
        self._loaded = True
        asked = [*_env_list("QF_DISABLED_PLUGINS"), *blocked]
        for name in asked:
            self.set_blocked(name)
        for name, module in DEFAULT_PLUGINS:
            if self.is_blocked(name):
                continue
            self.register(importlib.import_module(module), name=name)
        known = {name for name, _ in DEFAULT_PLUGINS}
        if os.environ.get("QF_DISABLE_PLUGIN_AUTOLOAD", "").strip() in ("", "0"):
            known |= self.load_entry_points()
        self._isolate_unknown_hooks()
        for name in dict.fromkeys(asked):
            if name not in known:
                self._notice(f"no plugin is named {name!r}, so blocking it does nothing; plugin and "
                             f"distribution names: {', '.join(sorted(known))}")
        self._trace = bool(os.environ.get("QF_TRACE_PLUGINS"))
        if self._trace:
            self.trace.root.setwriter(lambda msg: sys.stderr.write(msg))
            self.enable_tracing()
        return self

    def load_entry_points(self) -> set[str]:
        """Register the entry points of the group ``quantfoundry``; returns every plugin and
        distribution name seen (loaded or not), for the check of blocked names."""
        allow = set(_env_list("QF_LOAD_PLUGINS"))
        seen: dict[str, str | None] = {}
        known: set[str] = set()
        for dist in importlib.metadata.distributions():
            dist_name = dist.metadata["Name"] if dist.metadata else None
            for ep in dist.entry_points:
                if ep.group != ENTRY_POINT_GROUP:
                    continue
                known.update(n for n in (ep.name, dist_name) if n)
                if ep.name in seen:
                    if seen[ep.name] != dist_name:
                        self._notice(f"entry point {ep.name!r} of {dist_name} is not loaded: {seen[ep.name]} "
                                     "provides one of that name (uninstall one of them)")
                    continue
                seen[ep.name] = dist_name
                if (allow and ep.name not in allow) or self.is_blocked(ep.name) or \
                        (dist_name is not None and self.is_blocked(dist_name)):
                    continue
                if self.get_plugin(ep.name) is not None:
                    self._notice(f"entry point {ep.name!r} of {dist_name} is not loaded: a built-in plugin "
                                 "has that name (rename the entry point)")
                    continue
                try:
                    plugin = ep.load()
                except Exception as exc:
                    self._fail(ep.name, "import", exc, (dist_name, dist.version))
                    continue
                try:
                    self.register(plugin, name=ep.name)
                except Exception as exc:  # e.g. a hook implementation with wrong argument names
                    self._fail(ep.name, "register", exc, (dist_name, dist.version))
                    continue
                self._dists[ep.name] = (dist_name, dist.version)
        return known

    def _isolate_unknown_hooks(self) -> None:
        """pluggy's ``check_pending``, one plugin at a time: a plugin implementing a hook that
        has no spec (a misspelled ``qf_register_quantizer``) is unregistered and reported as a
        load error; the others keep working."""
        specs = [n for n in dir(hookspecs) if n.startswith("qf_")]
        bad: dict[str, list[str]] = {}
        for name in list(self.hook.__dict__):
            if name[0] == "_":
                continue
            caller = getattr(self.hook, name)
            if caller.has_spec():
                continue
            for impl in caller.get_hookimpls():
                if not impl.optionalhook:
                    bad.setdefault(impl.plugin_name, []).append(name)
        for plugin, hooks in bad.items():
            close = difflib.get_close_matches(hooks[0], specs, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            exc = pluggy.PluginValidationError(self.get_plugin(plugin), f"unknown hook {hooks[0]!r}{hint}")
            self.unregister(name=plugin)
            self._fail(plugin, "register", exc, self.distribution_of(plugin))
        self.check_pending()  # nothing left to find; kept as the contract's last word

    def block(self, name: str) -> None:
        """Block (and unregister if present) a plugin by name, like ``-p no:NAME``."""
        if self.get_plugin(name) is not None:
            self.unregister(name=name)
        for plugin, (dist, _version) in list(self._dists.items()):
            if dist == name and self.get_plugin(plugin) is not None:
                self.unregister(name=plugin)
        self.set_blocked(name)

    def _notice(self, message: str) -> None:
        if message not in self.notices:
            self.notices.append(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

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
        trace = (lambda line: sys.stderr.write(line + "\n")) if self._trace else None
        entries = collect(self, role, on_error=lambda plugin, exc: self._fail(
            plugin, "register", exc, self.distribution_of(plugin)), trace=trace)
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
