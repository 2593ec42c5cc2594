"""Streaming Hessians ``H = 2 X Xᵀ / n`` of a block's linears, one per distinct input.

The block runs batch by batch on its calibration inputs; a forward pre-hook on each wanted
linear adds ``xᵀx`` (float32) of that batch's inputs to a running sum, so activations are
never stored. Linears of one architecture input group that are called with the *same* input
tensor (q/k/v, gate/up) share one sum; MoE experts, which see different tokens, get their own.
Once every wanted linear has run in a batch, the rest of the block is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from quantfoundry import Block


class _Done(Exception):
    """Raised inside the block's forward once every wanted input was seen."""


@dataclass
class Hessians:
    """Sums of ``xᵀx`` per owner linear, token counts, and which linear reads which owner's input."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)

    def hessian(self, owner: str) -> torch.Tensor:
        """``2 Σ xxᵀ / n`` for the input of ``owner`` (zeros if it never ran)."""
        n = self.counts.get(owner, 0)
        return self.sums[owner] * (2.0 / n) if n else torch.zeros_like(self.sums[owner])

    def sharing(self) -> dict[str, list[str]]:
        """Owner → the linears reading its input (owner first), in first-call order."""
        out: dict[str, list[str]] = {}
        for name, own in self.owner.items():
            out.setdefault(own, []).append(name)
        return out


@torch.no_grad()
def collect_hessians(block: Block, names: list[str], device: torch.device,
                     on_batch: Callable[[int], None] | None = None) -> Hessians:
    """Run ``block`` on its calibration inputs and accumulate the Hessian of every linear in
    ``names`` (block-relative), sharing one among linears that read the same tensor
    (``on_batch(i)`` is called before batch ``i``)."""
    assert block.inputs is not None
    group_of = {n: block.architecture.group_of(n) for n in names}
    hs = Hessians()
    seen: dict[str, list[tuple[torch.Tensor, str]]] = {}  # per input group, this batch's inputs
    pending: set[str] = set()

    def add(name: str, x: torch.Tensor) -> None:
        key = group_of[name].linears
        owner = None
        for t, own in seen.get(key, []):
            if _same(t, x):
                owner = own
                break
        if owner is None:
            owner = name
            seen.setdefault(key, []).append((x, name))  # the reference keeps its memory alive
            x2 = x.reshape(-1, x.shape[-1]).to(device=device, dtype=torch.float32)
            if name not in hs.sums:
                hs.sums[name] = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float32, device=device)
            hs.sums[name].addmm_(x2.T, x2)
            hs.counts[name] = hs.counts.get(name, 0) + x2.shape[0]
        prev = hs.owner.setdefault(name, owner)
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
    for name in names:
        if name not in hs.owner:  # never called (an MoE expert no token was routed to)
            hs.owner[name] = name
            w = block.linear(name).weight
            hs.sums[name] = torch.zeros(w.shape[1], w.shape[1], dtype=torch.float32, device=device)
            hs.counts[name] = 0
    return hs


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Views of the same memory with the same geometry (the hook sees fresh ``detach()`` views;
    the stored reference keeps the memory alive, so an equal address cannot be a reused one)."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)
