"""A block's linears in the order error-feedback quantizers (GPTQ, QuIP#) round them."""

from __future__ import annotations

import fnmatch

from ..roles.block import Block


def input_stages(block: Block, true_sequential: bool = True) -> list[list[str]]:
    """The block's planned linears cut into stages by the architecture's input groups, in
    order (q/k/v → o → gate/up → down), so that each stage can be calibrated on the outputs of
    the ones before it already quantized; linears of no group come last. Without
    ``true_sequential``: one stage of all."""
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
    return stages + ([rest] if rest else [])
