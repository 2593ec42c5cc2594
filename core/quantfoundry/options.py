"""Typed ``Options`` dataclasses and their parsing from ``key=value`` strings and TOML tables.

Every component declares a nested ``Options`` class derived from :class:`Options`::

    @dataclass(frozen=True, kw_only=True)
    class Options(quantfoundry.Options):
        group_size: int = field(default=128, metadata={"help": "columns per scale"})

``parse_options(Options, {"group_size": "64"})`` converts the strings to the field types;
an unknown or ill-typed key raises :class:`~quantfoundry.errors.OptionsError` in one line
that lists every valid key with its type and default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

from .errors import OptionsError

__all__ = ["Options", "check_input_files", "describe_options", "input_files", "options_to_dict", "parse_key_values",
           "parse_options"]


@dataclass(frozen=True, kw_only=True)
class Options:
    """Base of every component's options. Subclasses add typed, defaulted fields.

    Validation belongs in ``__post_init__`` and raises ``ValueError``; the parser turns that
    into an :class:`OptionsError` naming the component.
    """


OptionsT = TypeVar("OptionsT", bound=Options)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (tuple, list):
        args = get_args(tp)
        return f"{origin.__name__}[{_type_name(args[0]) if args else 'Any'}]"
    return str(tp).replace("typing.", "")


def describe_options(cls: type[Options]) -> str:
    """``key: type = default`` for every field, comma separated (for error messages)."""
    hints = typing.get_type_hints(cls)
    parts = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required"
        )
        parts.append(f"{f.name}: {_type_name(hints[f.name])} = {default!r}")
    return ", ".join(parts) if parts else "(none)"


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (a string from the CLI, or a TOML value) to the annotated type."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in {"none", "null", ""}):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError(f"expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        choices = get_args(tp)
        for c in choices:
            if value == c or (isinstance(value, str) and str(c) == value):
                return c
        raise ValueError(f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
    if origin in (tuple, list):
        (inner, *_rest) = get_args(tp) or (str,)
        items = value.split(",") if isinstance(value, str) else list(value)
        items = [i.strip() if isinstance(i, str) else i for i in items if not (isinstance(i, str) and not i.strip())]
        out = [_convert(i, inner, key) for i in items]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"expected bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"expected int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""), 0)
            except ValueError:
                pass
        raise ValueError(f"expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"expected str, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value).expanduser()
        raise ValueError(f"expected a path, got {value!r}")
    if tp is typing.Any:
        return value
    raise TypeError(f"option {key!r} has an unsupported annotation {tp!r}")


def parse_options(cls: type[OptionsT], values: Mapping[str, Any] | None = None, *, owner: str = "") -> OptionsT:
    """Build ``cls`` from a mapping of strings (CLI) or TOML values, converting and checking types.

    :param owner: what the options belong to, e.g. ``"quantizer 'rtn'"``, used in messages.
    """
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    where = f" for {owner}" if owner else ""
    valid = describe_options(cls)
    kwargs: dict[str, Any] = {}
    for raw_key, raw_value in values.items():
        key = raw_key.replace("-", "_")
        if key not in fields:
            raise OptionsError(f"unknown option {raw_key!r}{where}; valid options: {valid}")
        try:
            kwargs[key] = _convert(raw_value, hints[key], key)
        except ValueError as e:
            raise OptionsError(f"option {raw_key!r}{where}: {e}; valid options: {valid}") from None
    try:
        options = cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise OptionsError(f"bad options{where}: {e}; valid options: {valid}") from None
    check_input_files(options, owner=owner)
    return options


def _is_path_type(tp: Any) -> bool:
    if tp is Path:
        return True
    return get_origin(tp) in (typing.Union, types.UnionType, tuple, list) and any(_is_path_type(a) for a in get_args(tp))


def input_files(options: Options) -> dict[str, list[Path]]:
    """The files an options object names: every ``Path``-typed field that is set (``Path``,
    ``Path | None``, ``tuple[Path, ...]``), unless its field metadata says ``{"output": True}``."""
    hints = typing.get_type_hints(type(options))
    out: dict[str, list[Path]] = {}
    for f in dataclasses.fields(options):
        if f.metadata.get("output") or not _is_path_type(hints[f.name]):
            continue
        value = getattr(options, f.name)
        paths = [v for v in (value if isinstance(value, (tuple, list)) else [value]) if isinstance(v, Path)]
        if paths:
            out[f.name] = paths
    return out


def check_input_files(options: Options, *, owner: str = "") -> None:
    """Refuse, in one line, an option naming a file that does not exist — called when options
    are parsed, so a run stops on a mistyped path before it loads the model (also when the
    component would not have used the file)."""
    where = f" for {owner}" if owner else ""
    for key, paths in input_files(options).items():
        for path in paths:
            if not path.exists():
                raise OptionsError(f"option {key!r}{where}: {path} does not exist (relative to {Path.cwd()}); "
                                   "pass the path of an existing file")


def parse_key_values(pairs: Iterable[str], *, flag: str = "--opt") -> dict[str, str]:
    """``["a=1", "b=x"]`` → ``{"a": "1", "b": "x"}``; a pair without ``=`` is a one-line error."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise OptionsError(f"{flag} expects key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def options_to_dict(options: Options) -> dict[str, Any]:
    """A JSON-friendly dict of the options (paths become strings, tuples lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(options):
        v = getattr(options, f.name)
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out
