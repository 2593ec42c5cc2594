"""Planning for checkpoint layouts that hold one ``int`` grid with one group size for every
quantized linear (GPTQ's and AWQ's ``quantization_config`` have a single ``group_size``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..roles.plan import QuantPlan, TensorPlan
from .int_format import MIN_FALLBACK_GROUP, IntFormat


def one_group_plan(source: Any, requested: IntFormat, unfit: Callable[[tuple[int, int]], str | None]
                   ) -> tuple[QuantPlan, IntFormat]:
    """The plan and the one format used: decoder-block linears that the layout can pack
    (``unfit(shape)`` is ``None``) get ``requested`` with the largest group, halving down to
    32, that divides every one of them (else per-channel), with the reason when it changed;
    other linears stay in float with theirs."""
    linears = {n: s for n, s in source.linear_shapes().items() if source.is_block_linear(n)}
    packable = {n: s for n, s in linears.items() if unfit(s) is None}
    g = requested.options.group_size
    while g and any(s[1] % g for s in packable.values()):
        g = g // 2 if g // 2 >= MIN_FALLBACK_GROUP else 0
    fmt = IntFormat(replace(requested.options, group_size=g))
    plan = QuantPlan()
    for name, shape in source.linear_shapes().items():
        if name not in linears:
            plan.add(TensorPlan(name, shape, None, reason="outside the decoder blocks (kept in float)"))
        elif name not in packable:
            plan.add(TensorPlan(name, shape, None, reason=f"{unfit(shape)} (kept in float)"))
        elif fmt != requested:
            plan.add(TensorPlan(name, shape, fmt, requested=requested,
                                reason=f"one group size for every linear of the checkpoint: fallback {fmt.spec}"))
        else:
            plan.add(TensorPlan(name, shape, fmt))
    return plan, fmt
