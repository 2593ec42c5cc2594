"""QuantFoundry: a plugin-based framework for quantizing large language models.

A minimal plugin — a quantizer that rounds half of the way to RTN, say — is one module::

    # qf_halfway/__init__.py
    import quantfoundry
    from quantfoundry import hookimpl

    class Halfway(quantfoundry.Quantizer):
        name = "halfway"
        description = "RTN, for the tutorial"
        scope = "tensor"

        def quantize_tensor(self, name, weight, fmt, ctx):
            return fmt.quantize(weight.float())

    @hookimpl
    def qf_register_quantizers(register):
        register(Halfway)

and one entry point in its ``pyproject.toml``::

    [project.entry-points.quantfoundry]
    halfway = "qf_halfway"

After ``pip install -e .``, ``qf plugins`` lists it and ``qf run --quantizer halfway`` uses it.
See docs/writing-a-plugin.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import QFError
from .hookspecs import hookimpl, hookspec

if TYPE_CHECKING:  # pragma: no cover
    from .model.source import ModelSource, resolve_model
    from .options import Options
    from .pipeline.result import RunResult
    from .plugins import get_component, get_plugin_manager
    from .roles.activation import ActQuant
    from .roles.architecture import Architecture, InputGroup
    from .roles.block import Block, BlockInputs, QuantContext
    from .roles.calibrator import CalibrationSet, Calibrator
    from .roles.evaluator import Engine, EvalTarget, Evaluator, ReferenceModel
    from .roles.exporter import Exporter
    from .roles.format import Format, Params, QuantizedWeight
    from .roles.kernel import Kernel, QuantLinear
    from .roles.plan import QuantPlan, TensorPlan
    from .roles.planner import Budget, Planner, PlanRequest
    from .roles.quantizer import Quantizer, Transform
    from .roles.weight_transform import HadamardTransform, WeightTransform

__version__ = "0.1.0"

__all__ = [
    "ActQuant", "Architecture", "Block", "Budget", "BlockInputs", "CalibrationSet", "Calibrator", "Engine", "EvalTarget", "Evaluator",
    "Exporter", "Format", "HadamardTransform", "InputGroup", "Kernel", "ModelSource", "Options", "Params", "PlanRequest", "Planner", "QFError", "QuantContext",
    "QuantLinear", "QuantPlan", "QuantizedWeight", "Quantizer", "ReferenceModel", "TensorPlan", "Transform",
    "WeightTransform", "get_component", "get_plugin_manager", "hookimpl", "hookspec", "load", "resolve_format", "resolve_model", "run",
]

# imported on first use (PEP 562), so ``qf --help`` and a Ctrl-C during start-up do not wait for torch
_LAZY = {
    "ModelSource": "model.source", "resolve_model": "model.source", "Options": "options",
    "get_component": "plugins", "get_plugin_manager": "plugins", "ActQuant": "roles.activation",
    "Architecture": "roles.architecture",
    "InputGroup": "roles.architecture", "Block": "roles.block", "BlockInputs": "roles.block",
    "QuantContext": "roles.block", "CalibrationSet": "roles.calibrator", "Calibrator": "roles.calibrator",
    "Engine": "roles.evaluator", "EvalTarget": "roles.evaluator", "Evaluator": "roles.evaluator",
    "ReferenceModel": "roles.evaluator", "Exporter": "roles.exporter", "Format": "roles.format",
    "Params": "roles.format", "QuantizedWeight": "roles.format", "Kernel": "roles.kernel",
    "QuantLinear": "roles.kernel", "QuantPlan": "roles.plan", "TensorPlan": "roles.plan",
    "Budget": "roles.planner", "Planner": "roles.planner", "PlanRequest": "roles.planner",
    "Quantizer": "roles.quantizer", "Transform": "roles.quantizer",
    "HadamardTransform": "roles.weight_transform", "WeightTransform": "roles.weight_transform",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'quantfoundry' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def run(*args: Any, **kwargs: Any) -> RunResult:
    """Quantize and export a model; see :func:`quantfoundry.pipeline.run.run`."""
    from .pipeline.run import run as _run

    return _run(*args, **kwargs)


def load(*args: Any, **kwargs: Any) -> Any:
    """Reload a ``qf run`` artifact as a model; see :func:`quantfoundry.pipeline.run.load`."""
    from .pipeline.run import load as _load

    return _load(*args, **kwargs)


def resolve_format(spec: str, options: dict[str, Any] | None = None) -> Format:
    """A format from its name or short spec (``int4-g128``)."""
    from .formats import resolve_format as _resolve

    return _resolve(spec, options)
