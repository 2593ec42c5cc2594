"""Replaying the outputs of finished linears across a block's true-sequential forwards.

True-sequential GPTQ runs a block once per input group (q/k/v → o → gate/up → down) and once
more for the next block's inputs. A linear whose weight is final (already quantized) and
whose input is final (every linear that ran before it in this batch's forward is final) gives
the same output in every later forward of the block, so it is computed once and replayed:
the later forwards skip those matmuls — q/k/v three times, o twice, gate/up once per block.
Whether a linear ran before another is the execution order of the forward, which follows the
data flow, so "everything before it is final" implies "everything it depends on is final".

Replayed values are copies of what the linear computed (no numerical change; copies, so an
in-place operation downstream cannot alter the record). Memory is bounded by a byte budget;
a linear whose outputs do not fit is computed as usual.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from quantfoundry import Block
from torch import nn


class OutputReplay:
    """Per-batch outputs of final linears of one block, within ``budget`` bytes."""

    def __init__(self, block: Block, budget: int) -> None:
        self.block = block
        self.budget = budget
        self.used = 0
        self.final: set[str] = set()
        self.outputs: dict[str, list[torch.Tensor | None]] = {}
        self.refused: set[str] = set()
        self.batch = 0
        self.replayed = 0  # linear calls skipped (for tests and notes)
        self._unfinished_ran = False

    def finalize(self, names: list[str]) -> None:
        """These linears' weights will not change again."""
        self.final.update(names)

    def start_batch(self, index: int) -> None:
        self.batch = index
        self._unfinished_ran = False

    @contextmanager
    def active(self, record: bool = True) -> Iterator[None]:
        """Within the ``with``, planned linears replay their outputs (and record new ones)."""
        if self.budget <= 0:
            yield
            return
        n_batches = len(self.block.inputs.hidden) if self.block.inputs is not None else 0
        patched: list[nn.Linear] = []
        for name in self.block.formats:
            lin = self.block.linear(name)
            lin.forward = self._forward(name, lin, n_batches, record)  # instance attribute: hooks still run
            patched.append(lin)
        try:
            yield
        finally:
            for lin in patched:
                del lin.forward

    def _forward(self, name: str, lin: nn.Linear, n_batches: int, record: bool) -> Any:
        original = type(lin).forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            reusable = name in self.final and not self._unfinished_ran
            if not reusable:
                if name not in self.final:
                    self._unfinished_ran = True
                return original(lin, x)
            stored = self.outputs.get(name)
            if stored is not None and stored[self.batch] is not None:
                self.replayed += 1
                return stored[self.batch].clone()
            y = original(lin, x)
            if record and name not in self.refused:
                if stored is None:
                    need = y.numel() * y.element_size() * n_batches
                    if self.used + need > self.budget:
                        self.refused.add(name)
                        return y
                    self.used += need
                    stored = self.outputs[name] = [None] * n_batches
                stored[self.batch] = y.clone()
            return y

        return forward


def default_budget(device: torch.device) -> int:
    """A quarter of the memory free on ``device`` now (CUDA: the allocator's view; CPU: the
    system's available memory), so replay never crowds out the block and its inputs."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free // 4
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    return 0
