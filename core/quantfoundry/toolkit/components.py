"""Building registered components by name, for plugins that compose others (a mixture of
calibrators, a recipe of stages): the same option parsing and checks as ``qf run``'s."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..options import parse_options
from ..plugins import get_component


def make_component(role: str, name: str, options: Mapping[str, Any] | None = None, *, owner: str = "") -> Any:
    """An instance of the registered ``role`` component ``name`` with ``options`` (strings or
    TOML values) parsed and checked — files named by its options must exist — so a bad value is
    one :class:`~quantfoundry.errors.OptionsError` naming ``owner`` (default: the component)."""
    cls = get_component(role, name)
    return cls(parse_options(cls.Options, options or {}, owner=owner or f"{role} {cls.name!r}"))
