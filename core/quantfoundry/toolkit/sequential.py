"""A block's linears in the order error-feedback quantizers (GPTQ, QuIP#) round them."""

from __future__ import annotations

import fnmatch
import re

from ..roles.block import Block

_EXPERT = re.compile(r"^(.*\.experts\.\d+)\.")


def input_stages(block: Block, true_sequential: bool = True, stats_budget: int | None = None) -> list[list[str]]:
    """The block's planned linears cut into stages by the architecture's input groups, in
    order (q/k/v → o → gate/up → down), so that each stage can be calibrated on the outputs of
    the ones before it already quantized; linears of no group come last. Without
    ``true_sequential``: one stage of all.

    :param stats_budget: bytes for one stage's float64 Gram matrices: a true-sequential stage of
        a mixture of experts whose experts' Grams exceed it is cut into stages of fewer experts
        each (the other linears with the first). The statistics are the same: an expert's input
        depends on no other expert of its stage. (Without ``true_sequential`` nothing is cut: a
        later cut would see the earlier ones' quantized attention.)"""
    planned = list(block.formats)
    if not true_sequential:
        return [planned]
    stages, done = [], set()
    for patterns in block.architecture.order:
        names = [n for n in planned if n not in done and any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        done.update(names)
        if names:
            stages.append(names)
    rest = [n for n in planned if n not in done]
    return [part for stage in stages + ([rest] if rest else []) for part in _by_budget(block, stage, stats_budget)]


def _by_budget(block: Block, names: list[str], budget: int | None) -> list[list[str]]:
    experts: dict[str, list[str]] = {}
    others = []
    for n in names:
        m = _EXPERT.match(n)
        (experts.setdefault(m.group(1), []) if m else others).append(n)
    if budget is None or not experts:
        return [names]

    def gram_bytes(group: list[str]) -> int:  # one input per expert and projection width (gate/up share)
        return sum(8 * w * w for w in {block.linear(n).in_features for n in group})

    out: list[list[str]] = [list(others)]
    used = sum(8 * block.linear(n).in_features ** 2 for n in others)
    for group in experts.values():
        size = gram_bytes(group)
        if used + size > budget and out[-1]:
            out.append([])
            used = 0
        out[-1] += group
        used += size
    return [stage for stage in out if stage]
