"""Replaying the outputs of finished linears across a block's true-sequential forwards.

True-sequential GPTQ runs a block once per input group (q/k/v → o → gate/up → down) and once
more for the next block's inputs. A linear whose weight is final (already quantized) and
whose input is final (every linear that ran before it in this batch's forward is final) gives
the same output in every later forward of the block, so it is computed once and replayed:
the later forwards skip those matmuls — q/k/v three times, o twice, gate/up once per block.
Whether a linear ran before another is the execution order of the forward, which follows the
data flow, so "everything before it is final" implies "everything it depends on is final".

The same holds one level up: a child module of the block (``self_attn``, ``mlp``) whose
planned linears are all final, reached with final inputs, gives the same output again, so the
attention — its rotary embedding and softmax included — runs once after o_proj is final
instead of in every later forward (``containers``).

Replayed values are copies of what the module computed (no numerical change; copies, so an
in-place operation downstream cannot alter the record). Memory is bounded by a byte budget;
a module whose outputs do not fit is computed as usual.
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
        patched: list[nn.Module] = []
        for name in self.block.formats:
            lin = self.block.linear(name)
            lin.forward = self._forward(name, lin, (name,), n_batches, record)  # instance attribute: hooks still run
            patched.append(lin)
        for name, members in self.containers().items():
            child = self.block.module.get_submodule(name)
            child.forward = self._forward(name, child, members, n_batches, record)
            patched.append(child)
        try:
            yield
        finally:
            for mod in patched:
                del mod.forward

    def containers(self) -> dict[str, tuple[str, ...]]:
        """The block's direct children holding planned linears → those linears."""
        out: dict[str, list[str]] = {}
        for name in self.block.formats:
            head, dot, _ = name.partition(".")
            if dot:
                out.setdefault(head, []).append(name)
        return {k: tuple(v) for k, v in out.items()}

    def _forward(self, name: str, mod: nn.Module, members: tuple[str, ...], n_batches: int, record: bool) -> Any:
        """``mod``'s forward, replaying its output once every linear of ``members`` (``mod``'s
        planned linears; for a linear, itself) is final and nothing unfinished ran before it."""
        original = type(mod).forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            final = all(m in self.final for m in members)
            if not final or self._unfinished_ran:
                if not final and members == (name,):  # an unfinished linear (a container: its linears say)
                    self._unfinished_ran = True
                return original(mod, *args, **kwargs)
            stored = self.outputs.get(name)
            if stored is not None and stored[self.batch] is not None:
                self.replayed += len(members)
                return _copy(stored[self.batch])
            y = original(mod, *args, **kwargs)
            if record and name not in self.refused:
                if not _replayable(y):  # an output type other than tensors in tuples: computed as usual
                    self.refused.add(name)
                    return y
                if stored is None:
                    need = _nbytes(y) * n_batches
                    if self.used + need > self.budget:
                        self.refused.add(name)
                        return y
                    self.used += need
                    stored = self.outputs[name] = [None] * n_batches
                stored[self.batch] = _copy(y)
            return y

        return forward


def _replayable(y: Any) -> bool:
    """A tensor, or a plain tuple of tensors and None (an attention module's output)."""
    if isinstance(y, torch.Tensor) or y is None:
        return True
    return type(y) is tuple and all(_replayable(v) for v in y)


def _copy(y: Any) -> Any:
    """``y`` (:func:`_replayable`) with its tensors cloned."""
    if isinstance(y, torch.Tensor):
        return y.clone()
    return tuple(_copy(v) for v in y) if isinstance(y, tuple) else None


def _nbytes(y: Any) -> int:
    if isinstance(y, torch.Tensor):
        return y.numel() * y.element_size()
    return sum(_nbytes(v) for v in y) if isinstance(y, tuple) else 0


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
