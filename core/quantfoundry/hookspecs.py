"""Every QuantFoundry hook, in one place.

The pluggy project name is ``quantfoundry``; plugins are found through the entry-point group
``quantfoundry`` and implement hooks marked with :data:`hookimpl`. The eight hooks are all
*registration* hooks: they collect components, they never run the pipeline. Each receives a
``register`` callable (a :class:`~quantfoundry.registry.Registrar`) and returns nothing.

Every ``qf_register_*`` hook is 1:N (not firstresult, not historic) and is called lazily: the
first time a component of that role is looked up after the set of registered plugins
changed (``qf run``, ``qf plugins``, ``quantfoundry.get_component``). A component name must
be unique within its role across all plugins; a clash is a
:class:`~quantfoundry.errors.DuplicateComponentError` naming both plugins. A hook that raises
is reported as a load error of its plugin (``qf plugins`` lists it, and a warning is issued);
the components of every other plugin stay usable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # pragma: no cover - type-only imports keep this module light
    from .registry import Registrar

PROJECT = "quantfoundry"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# --------------------------------------------------------------------------------------------
# Component registration hooks (1:N, called lazily at lookup time)
# --------------------------------------------------------------------------------------------


@hookspec
def qf_register_formats(register: Registrar) -> None:
    """Register numeric weight formats (grids): subclasses of :class:`quantfoundry.Format`.

    Called when a format is first looked up (``--format``, ``qf formats``, reloading a ``qf``
    artifact, which names the format of each tensor), after every plugin is loaded. Call
    ``register(FormatClass)`` once per class; ``FormatClass.name`` (normalized to lowercase
    kebab-case) must be unique among formats. A format may also claim short specs such as
    ``int4-g128`` through its ``from_spec`` classmethod.

    :param register: the registrar; ``register(cls, aliases=())``.
    :returns: nothing; return values are ignored. Not firstresult.

    .. versionadded:: 0.1
    """


@hookspec
def qf_register_quantizers(register: Registrar) -> None:
    """Register the stages of a recipe: quantization algorithms (subclasses of
    :class:`quantfoundry.Quantizer`) and transforms (subclasses of :class:`quantfoundry.Transform`).

    Called when a stage is first looked up (``qf run --quantizer NAME``, ``qf plugins``), after
    every plugin is loaded. Call ``register(Class)`` once per class; ``Class.name`` must be
    unique among stages or loading fails, naming both plugins. A quantizer states its ``scope``
    (tensor, block or model) and whether it needs calibration, and is a recipe's last, rounding
    stage; a transform changes float weights without rounding and runs before it. A quantizer
    whose method starts with a transform offers it through ``as_transform()`` (``awq`` before
    ``gptq`` runs AWQ's scale search only); the pipeline does the rest.

    :param register: the registrar; ``register(cls, aliases=())``.
    :returns: nothing; return values are ignored. Not firstresult.

    .. versionadded:: 0.1
    """


@hookspec
def qf_register_exporters(register: Registrar) -> None:
    """Register artifact writers: subclasses of :class:`quantfoundry.Exporter`.

    Called when an exporter is first looked up (``qf run --exporter NAME``, ``qf plugins``,
    ``qf load``/``qf eval`` of an artifact whose manifest names its exporter). Call
    ``register(ExporterClass)`` once per class. The exporter declares which formats it can
    store and chooses a format for each tensor (``plan``) before any quantization; once every
    block is quantized it gets ``begin``, one ``write`` per tensor and ``finish``, then
    ``verify`` of the temporary folder before it is renamed into place. It reads its artifacts
    back with ``load`` (``can_load = True``) or serves them with an ``engine``.

    :param register: the registrar; ``register(cls, aliases=())``.
    :returns: nothing; return values are ignored. Not firstresult.

    .. versionadded:: 0.1
    """


@hookspec
def qf_register_kernels(register: Registrar) -> None:
    """Register executors of quantized linears: subclasses of :class:`quantfoundry.Kernel`.

    Called when the pipeline builds :class:`quantfoundry.QuantLinear` modules (in-memory
    evaluation, ``qf load``) or when ``qf plugins`` lists components. Call
    ``register(KernelClass)`` once per class. A kernel says which formats and devices it
    serves and a ``priority``; the highest-priority kernel that serves a tensor is chosen
    unless the user names one with ``--kernel``.

    :param register: the registrar; ``register(cls, aliases=())``.
    :returns: nothing; return values are ignored. Not firstresult.

    .. versionadded:: 0.1
    """


@hookspec
def qf_register_calibrators(register: Registrar) -> None:
    """Register sources of calibration token batches: subclasses of :class:`quantfoundry.Calibrator`.

    Called when a calibrator is first looked up (``qf run --calibrator NAME``, or the default
    one when the quantizer needs calibration data), after every plugin is loaded. Call
    ``register(CalibratorClass)`` once per class.

    :param register: the registrar; ``register(cls, aliases=())``.
    :returns: nothing; return values are ignored. Not firstresult.

    .. versionadded:: 0.1
    """


@hookspec
def qf_register_evaluators(register: Registrar) -> None:
    """Register metrics: subclasses of :class:`quantfoundry.Evaluator`.

    Called when an evaluator is first looked up (``qf run --evaluator NAME``, ``qf eval``,
    ``qf plugins``). Call ``register(EvaluatorClass)`` once per class. An evaluator returns
    named metrics for one model (the original, the in-memory quantized model or the written
    artifact), or, with ``compares = True``, for the quantized model against the original.

    :param register: the registrar; ``register(cls, aliases=())``.
    :returns: nothing; return values are ignored. Not firstresult.

    .. versionadded:: 0.1
    """


@hookspec
def qf_register_architectures(register: Registrar) -> None:
    """Register maps of model families: :class:`quantfoundry.Architecture` *instances*.

    Called when a model is loaded and its ``config.json`` ``architectures[0]`` must be mapped
    to decoder blocks and linears, and by ``qf plugins``. Call ``register(Architecture(...))``
    once per family; each instance lists the Hugging Face class names it covers (e.g.
    ``LlamaForCausalLM``), which linears share an input, which norm or linear precedes them,
    and their order inside a block. A class name claimed by two architectures is an error.

    :param register: the registrar; ``register(instance, aliases=())``.
    :returns: nothing; return values are ignored. Not firstresult.

    .. versionadded:: 0.1
    """


@hookspec
def qf_register_planners(register: Registrar) -> None:
    """Register mixed-precision planners: subclasses of :class:`quantfoundry.Planner`.

    Called when a planner is first looked up (``qf run --planner NAME --target-bpw X``,
    ``qf plugins``). Call ``register(PlannerClass)`` once per class. After the exporter's plan,
    the pipeline asks the exporter which formats each tensor may take
    (:meth:`~quantfoundry.Exporter.mix_candidates`; an exporter that stores one format refuses
    before any work), hands the planner a :class:`~quantfoundry.PlanRequest` (the source, the
    exporter's plan and candidates, the byte budget, the calibration tokens) and uses the
    :class:`~quantfoundry.QuantPlan` it returns for the rest of the run.

    :param register: the registrar; ``register(cls, aliases=())``.
    :returns: nothing; return values are ignored. Not firstresult.

    .. versionadded:: 0.2
    """
