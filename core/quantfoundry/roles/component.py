"""What every registered component class shares: a name, a description, typed options."""

from __future__ import annotations

from typing import ClassVar

from ..options import Options


class Component:
    """Base of formats, quantizers, exporters, kernels, calibrators and evaluators.

    Subclasses set ``name`` (normalized to kebab-case at registration), a one-line
    ``description`` and, if they take options, a nested ``Options`` dataclass derived from
    :class:`~quantfoundry.Options`; the instance's parsed options are ``self.options``.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = Options

    def __init__(self, options: Options | None = None):
        self.options = options if options is not None else self.Options()
