"""Streamed statistics of the inputs of a block's linears, collected by forward pre-hooks.

The block runs on its calibration batches; a pre-hook on each wanted linear adds what the
caller asks for of that batch's input ``X`` ``[tokens, in]`` to running sums, so activations are
never stored:

================  ==========================================  ====================================
statistic         sum kept                                    used for
================  ==========================================  ====================================
``"gram"``        ``XᵀX`` ``[in, in]`` (float32 per batch,    GPTQ's Hessian ``2XᵀX/n``, AWQ's
                  summed in float64; float32 at the end)      output error ``tr(E H Eᵀ)/n``
``"abs_sum"``     ``Σ|x|`` per channel (float64)              AWQ's mean ``|x|``
``"sq_sum"``      ``Σx²`` per channel (float64)               llama.cpp's imatrix (mean ``x²``)
``"absmax"``      ``max|x|`` per channel (float32)            SmoothQuant's activation range
================  ==========================================  ====================================

With ``share=True``, linears of one architecture input group that are called with the *same*
tensor (q/k/v, gate/up: the same memory seen through the same view) share one entry and one
sum; MoE experts, which see different tokens, keep their own. Once every wanted linear has run
in a batch, the rest of the block is skipped. A wanted linear that never runs (an expert no
token was routed to) gets zero sums and ``count = 0``.

In a run across processes (:mod:`quantfoundry.distributed`) each rank runs its share of the
batches and the sums are then reduced over ranks, so every rank holds the statistics of the
whole calibration set. Each batch's Gram matrix is one float32 GEMM whatever the sharding, and
the batches are summed in float64: the float32 result a one-device run and a sharded run hand
the quantizer differ only where a float64 sum lies within ~1e-16 of a float32 rounding boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from ..distributed import all_reduce_, all_reduce_count, merge_dicts
from ..roles.block import Block

STATISTICS = ("gram", "abs_sum", "sq_sum", "absmax")


@dataclass
class InputStats:
    """Running statistics of one input tensor stream (``count`` tokens so far)."""

    count: int = 0
    gram: torch.Tensor | None = None  # float32, once finished; float64 while summing
    abs_sum: torch.Tensor | None = None
    sq_sum: torch.Tensor | None = None
    absmax: torch.Tensor | None = None

    @property
    def abs_mean(self) -> torch.Tensor:
        """Mean ``|x|`` per input channel (float32)."""
        return (self._need("abs_sum") / max(self.count, 1)).float()

    @property
    def sq_mean(self) -> torch.Tensor:
        """Mean ``x²`` per input channel (float32): llama.cpp's imatrix entry."""
        return (self._need("sq_sum") / self.count).float() if self.count else \
            torch.zeros_like(self._need("sq_sum"), dtype=torch.float32)

    def hessian(self) -> torch.Tensor:
        """``2 XᵀX / n`` (zeros when no token was seen)."""
        gram = self._need("gram")
        return gram * (2.0 / self.count) if self.count else torch.zeros_like(gram)

    def add(self, x: torch.Tensor, want: Iterable[str]) -> None:
        """Add the rows of ``x`` ``[tokens, in]`` (float32) to the sums in ``want``."""
        for stat in want:
            if stat == "gram":
                g = (x.T @ x).double()
                self.gram = g if self.gram is None else self.gram.add_(g)
            elif stat == "abs_sum":
                s = x.abs().sum(0, dtype=torch.float64)
                self.abs_sum = s if self.abs_sum is None else self.abs_sum.add_(s)
            elif stat == "sq_sum":
                s = x.double().square().sum(0)
                self.sq_sum = s if self.sq_sum is None else self.sq_sum.add_(s)
            elif stat == "absmax":
                m = x.abs().amax(0)
                self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        self.count += x.shape[0]

    def reduce(self) -> InputStats:
        """Sum (``absmax``: maximum) every statistic over the ranks of a multi-process run;
        then the Gram matrix in float32. Every rank calls it, in the same order."""
        self.count = all_reduce_count(self.count)
        for stat in ("gram", "abs_sum", "sq_sum"):
            value = getattr(self, stat)
            if value is not None:
                all_reduce_(value, "sum")
        if self.absmax is not None:
            all_reduce_(self.absmax, "max")
        if self.gram is not None:
            self.gram = self.gram.float()
        return self

    def zeros(self, n_in: int, want: Iterable[str], device: torch.device) -> InputStats:
        """Fill every wanted statistic that was never seen with zeros."""
        shapes = {"gram": ((n_in, n_in), torch.float64), "abs_sum": ((n_in,), torch.float64),
                  "sq_sum": ((n_in,), torch.float64), "absmax": ((n_in,), torch.float32)}
        for stat in want:
            if getattr(self, stat) is None:
                shape, dtype = shapes[stat]
                setattr(self, stat, torch.zeros(shape, dtype=dtype, device=device))
        return self

    def _need(self, stat: str) -> torch.Tensor:
        value = getattr(self, stat)
        if value is None:
            raise ValueError(f"the statistic {stat!r} was not collected; pass it in want=")
        return value


@dataclass
class BlockStats:
    """Statistics per *owner* (the first linear that read a shared input) and, for every
    wanted linear, its owner."""

    stats: dict[str, InputStats] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, linear: str) -> InputStats:
        """The statistics of ``linear``'s input (its owner's)."""
        return self.stats[self.owner[linear]]

    def sharing(self) -> dict[str, list[str]]:
        """Owner → the linears reading its input (owner first), in the order of the names asked."""
        out: dict[str, list[str]] = {}
        for name, own in self.owner.items():
            members = out.setdefault(own, [own])
            if name != own:
                members.append(name)
        return out


class _Done(Exception):
    """Raised inside the block's forward once every wanted input was seen in a batch."""


@torch.no_grad()
def collect_input_stats(block: Block, names: list[str], *, want: Iterable[str] = ("gram",),
                        device: torch.device | None = None, share: bool = True,
                        on_batch: Callable[[int], None] | None = None) -> BlockStats:
    """Run ``block`` (with its current weights) on its calibration inputs and accumulate the
    statistics ``want`` of the input of every linear in ``names`` (block-relative).

    :param device: where the sums live (default: where the inputs are); inputs are converted
        to float32 there.
    :param share: linears of one input group called with the same tensor share one entry.
    :param on_batch: called with the batch index before each batch runs.
    """
    if block.inputs is None:
        raise ValueError(f"{block.prefix} has no calibration inputs: the run calibrates only when a stage "
                         "sets needs_calibration = True")
    want = tuple(want)
    unknown = sorted(set(want) - set(STATISTICS))
    if unknown:
        raise ValueError(f"unknown statistic {unknown[0]!r}; choose from {', '.join(STATISTICS)}")
    group_of = {n: block.architecture.group_of(n).linears for n in names} if share else {n: (n,) for n in names}
    out = BlockStats()
    seen: dict[tuple[str, ...], list[tuple[torch.Tensor, str]]] = {}  # per input group, this batch's inputs
    pending: set[str] = set()

    def add(name: str, x: torch.Tensor) -> None:
        key = group_of[name]
        owner = next((own for t, own in seen.get(key, []) if _same(t, x)), None)
        if owner is None:
            owner = name
            seen.setdefault(key, []).append((x, name))  # the reference keeps its memory alive
            x2 = x.reshape(-1, x.shape[-1]).to(device=device or x.device, dtype=torch.float32)
            out.stats.setdefault(name, InputStats()).add(x2, want)
        prev = out.owner.setdefault(name, owner)
        if prev != owner:
            raise RuntimeError(f"{block.full_name(name)} shared its input with {prev} in one batch and with "
                               f"{owner} in another; report this architecture")
        pending.discard(name)
        if not pending:
            raise _Done

    with block.capture_inputs(names, add):
        for i, (hidden, kwargs) in enumerate(zip(block.inputs.hidden, block.inputs.kwargs, strict=True)):
            if on_batch is not None:
                on_batch(i)
            seen.clear()
            pending.clear()
            pending.update(names)
            try:
                block.module(hidden, **kwargs)
            except _Done:
                pass
    # across processes, a linear one rank never called (an expert no token of its batches was
    # routed to) takes the owner the ranks that called it saw; keyed in the order of ``names``
    # (not of first calls), every rank reduces the same entries in the same order. A linear
    # never called on any rank (an MoE expert no token was routed to) owns its own zero entry.
    seen = merge_dicts(dict(out.owner))
    out.owner = {name: seen.get(name, name) for name in names}
    for owner in set(out.owner.values()) - set(out.stats):
        w = block.linear(owner).weight
        out.stats[owner] = InputStats().zeros(w.shape[1], want, device or w.device)
    for name in sorted(out.stats):  # the same order on every rank
        out.stats[name].reduce()
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Views of the same memory with the same geometry (the hook sees fresh ``detach()`` views;
    the stored reference keeps the memory alive, so an equal address cannot be a reused one)."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)
