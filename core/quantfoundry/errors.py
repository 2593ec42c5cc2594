"""The errors QuantFoundry raises on purpose.

Every message is one line that says what is wrong and how to fix it. The CLI prints
``QFError`` messages without a traceback; anything else escaping is a bug.
"""

from __future__ import annotations


class QFError(Exception):
    """Base class: a user-facing, one-line error that names the fix."""


class UsageError(QFError):
    """Bad options, bad recipe, unknown component name."""


class OptionsError(UsageError):
    """An option key is unknown, ill-typed or out of range."""


class PluginLoadError(QFError):
    """A plugin failed to import or to register its components."""


class DuplicateComponentError(QFError):
    """Two plugins registered a component of the same role under the same name."""


class UnknownComponentError(UsageError):
    """No installed plugin registers a component of that name."""


class IncompatiblePlanError(UsageError):
    """The quantizer, format, exporter and kernel chosen cannot work together."""


class UnsupportedArchitectureError(QFError):
    """The model's architecture has no registered architecture map."""


class ModelLoadError(QFError):
    """The model folder or hub id cannot be loaded as asked (missing files, pickles, ...)."""


class AlreadyQuantizedError(ModelLoadError):
    """The checkpoint already carries a ``quantization_config``."""


class NonFiniteWeightsError(ModelLoadError):
    """A weight of the checkpoint holds NaN or Inf."""


class ArtifactError(QFError):
    """A written artifact is missing, truncated or inconsistent with its manifest."""


class EngineUnavailable(QFError):
    """The engine that serves an artifact is not installed or cannot start (its message says how
    to install it); ``qf run`` notes it and skips the artifact check, ``qf eval`` stops."""
