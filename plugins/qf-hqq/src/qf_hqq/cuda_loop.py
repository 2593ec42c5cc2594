"""HQQ's zero-point rounds on CUDA: all rounds on the device with no host sync, captured once
per weight shape in a CUDA graph and replayed for every weight of that shape.

Two bodies, chosen by the option ``cuda_loop``:

- ``triton`` (default): each round is one fused Triton kernel over all groups plus one that
  sums its error (:mod:`qf_hqq.triton_loop`) — 2 kernels a round;
- ``graph``: the rounds of :func:`qf_hqq.quantizer.optimize_zero` as torch operations
  (:func:`rounds`), a dozen kernels a round — also the path when ``triton`` cannot be imported
  or ``iters`` exceeds :data:`qf_hqq.triton_loop.MAX_ITERS`.

Both keep the early stop on the device: a round's error is compared with the best so far as a
tensor, and after the first round that does not improve the zero points stop moving (that
round's update is kept, as the CPU loop and the hqq library keep it); all ``iters`` rounds
run, the frozen ones doing nothing. The shrink is one dense pass (the pow is cheap on a GPU;
gathering the groups it acts on would need a sync).

On a GPU the loop is launch-bound, so one replay replaces hundreds of launches and ``iters``
syncs. Graphs are cached per (shape, device, grid, options), at most :data:`MAX_GRAPHS`
weights' worth (least recently used dropped); weights larger than :data:`MAX_ELEMENTS` run the
same body uncaptured.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Protocol

import torch

from . import triton_loop

MAX_GRAPHS = 8
MAX_ELEMENTS = 1 << 26  # 64M values: the graph's buffers stay a few hundred MB


class _Body(Protocol):
    def load(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None: ...
    def run(self, qmin: int, qmax: int, o: Any) -> None: ...
    def zero(self, shape: torch.Size) -> torch.Tensor: ...


class _TorchRounds:
    """The rounds as torch operations, on tensors read and written in place."""

    def __init__(self, w: torch.Tensor, scale: torch.Tensor, o: Any):
        self.w, self.scale, self.z = torch.empty_like(w), torch.empty_like(scale), torch.empty_like(scale)
        self.inv = torch.empty_like(scale)
        self.v, self.u, self.a = torch.empty_like(w), torch.empty_like(w), torch.empty_like(w)
        self.ib = torch.empty_like(scale)
        self.best = torch.empty((), device=w.device)
        self.stopped = torch.empty((), dtype=torch.bool, device=w.device)
        self.beta = torch.empty((), device=w.device)
        self.beta0 = o.beta

    def load(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        self.w.copy_(w)
        self.scale.copy_(scale)
        self.z.copy_(zero)
        torch.reciprocal(self.scale, out=self.inv)
        torch.mul(self.w, self.inv, out=self.v)  # W / s: constant over the rounds
        self.best.fill_(float("inf"))
        self.stopped.fill_(False)
        self.beta.fill_(self.beta0)

    def run(self, qmin: int, qmax: int, o: Any) -> None:
        for _ in range(o.iters):
            torch.add(self.v, self.z, out=self.u)
            torch.sub(self.u, torch.round(self.u, out=self.a).clamp_(qmin, qmax), out=self.u)  # d
            torch.abs(self.u, out=self.a)
            error = (self.a.mean(-1, keepdim=True) * self.scale).mean()
            torch.div(self.inv, self.beta, out=self.ib)
            self.a.mul_(self.scale).add_(1e-8).pow_(o.lp_norm - 1).mul_(self.ib)  # t
            step = torch.minimum(self.u.abs(), self.a, out=self.a).copysign_(self.u).mean(-1, keepdim=True)
            self.z.copy_(torch.where(self.stopped, self.z, self.z - step))
            if o.early_stop:
                self.stopped.logical_or_(error >= self.best)
            torch.minimum(self.best, error, out=self.best)
            self.beta.mul_(o.kappa)

    def zero(self, shape: torch.Size) -> torch.Tensor:
        return self.z.clone()


class _TritonRounds:
    def __init__(self, w: torch.Tensor, scale: torch.Tensor, o: Any):
        self.loop = triton_loop.Loop(w.numel() // w.shape[-1], w.shape[-1], w.device)

    def load(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        self.loop.load(w, scale, zero)

    def run(self, qmin: int, qmax: int, o: Any) -> None:
        self.loop.run(qmin, qmax, o)

    def zero(self, shape: torch.Size) -> torch.Tensor:
        return self.loop.z.view(shape).clone()


def _body(w: torch.Tensor, scale: torch.Tensor, o: Any) -> _Body:
    if o.cuda_loop == "triton" and o.iters <= triton_loop.MAX_ITERS and triton_loop.available():
        return _TritonRounds(w, scale, o)
    return _TorchRounds(w, scale, o)


def rounds(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int, o: Any) -> torch.Tensor:
    """The rounds uncaptured (any device; the torch body unless ``o.cuda_loop`` is ``triton``):
    the zero points :func:`optimize_zero_cuda` gives."""
    body = _body(w, scale, o) if w.is_cuda else _TorchRounds(w, scale, o)
    body.load(w, scale, zero)
    body.run(qmin, qmax, o)
    return body.zero(zero.shape)


_graphs: OrderedDict[tuple[Any, ...], tuple[_Body, torch.cuda.CUDAGraph]] = OrderedDict()


def optimize_zero_cuda(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int,
                       o: Any) -> torch.Tensor:
    """:func:`rounds`, replayed from a CUDA graph captured for this shape."""
    if w.numel() > MAX_ELEMENTS:
        return rounds(w, scale, zero, qmin, qmax, o)
    key = (tuple(w.shape), tuple(scale.shape), w.device, qmin, qmax, o)
    entry = _graphs.get(key)
    if entry is None:
        body = _body(w, scale, o)
        side = torch.cuda.Stream(device=w.device)
        side.wait_stream(torch.cuda.current_stream(w.device))
        with torch.cuda.stream(side):  # warm-up outside the capture (compilation, allocator, caches)
            body.load(w, scale, zero)
            body.run(qmin, qmax, o)
        torch.cuda.current_stream(w.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body.run(qmin, qmax, o)
        entry = (body, graph)
        _graphs[key] = entry
        while len(_graphs) > MAX_GRAPHS:
            _graphs.popitem(last=False)
    _graphs.move_to_end(key)
    body, graph = entry
    body.load(w, scale, zero)
    graph.replay()
    return body.zero(zero.shape)
