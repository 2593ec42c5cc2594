"""HQQ's zero-point rounds on CUDA: the rounds on the device with no host sync inside, in
chunks of :data:`CHUNK` rounds captured once per weight shape in a CUDA graph and replayed for
every weight of that shape.

The rounds are :func:`qf_hqq.quantizer.optimize_zero`'s, in code units, with the early stop
kept on the device: a round's error is compared with the best so far as a tensor, and after
the first round that does not improve, the zero points stop moving (that round's update is
kept, as the CPU loop and the hqq library keep it). Between chunks one host read of that flag
ends the loop, so at most :data:`CHUNK` − 1 frozen rounds run. The shrink runs as one dense
pass (the pow is cheap on a GPU; gathering the groups it acts on would need a sync).

On a GPU the loop is launch-bound — a dozen small kernels a round — so a replay per chunk
replaces some 50 launches and 4 syncs. Graphs are cached per (shape, device, grid, options,
chunk length), at most :data:`MAX_GRAPHS` weights' worth (least recently used dropped);
weights larger than :data:`MAX_ELEMENTS` run the same chunks uncaptured.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

MAX_GRAPHS = 8
MAX_ELEMENTS = 1 << 26  # 64M values: the graph's buffers stay a few hundred MB
CHUNK = 4  # rounds per replay: the paper's 20 rounds are at most five replays


class _State:
    """The tensors one loop reads and writes in place (a graph replays on the same memory)."""

    def __init__(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        self.w, self.scale, self.zero = w.clone(), scale.clone(), zero.clone()
        self.inv = torch.empty_like(scale)
        self.v, self.u, self.a = torch.empty_like(w), torch.empty_like(w), torch.empty_like(w)
        self.ib = torch.empty_like(scale)
        self.best = torch.empty((), device=w.device)
        self.stopped = torch.empty((), dtype=torch.bool, device=w.device)
        self.beta = torch.empty((), device=w.device)

    def load(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, beta: float) -> None:
        self.w.copy_(w)
        self.scale.copy_(scale)
        self.zero.copy_(zero)
        torch.reciprocal(self.scale, out=self.inv)
        torch.mul(self.w, self.inv, out=self.v)  # W / s: constant over the rounds
        self.best.fill_(float("inf"))
        self.stopped.fill_(False)
        self.beta.fill_(beta)


def _chunk(s: _State, qmin: int, qmax: int, o: Any, k: int) -> None:
    """``k`` rounds on ``s``, in place, no host sync (``o``: :class:`~qf_hqq.quantizer.HQQOptions`)."""
    for _ in range(k):
        torch.add(s.v, s.zero, out=s.u)
        torch.sub(s.u, torch.round(s.u, out=s.a).clamp_(qmin, qmax), out=s.u)  # d
        torch.abs(s.u, out=s.a)
        error = (s.a.mean(-1, keepdim=True) * s.scale).mean()
        torch.div(s.inv, s.beta, out=s.ib)
        s.a.mul_(s.scale).add_(1e-8).pow_(o.lp_norm - 1).mul_(s.ib)  # t
        step = torch.minimum(s.u.abs(), s.a, out=s.a).copysign_(s.u).mean(-1, keepdim=True)
        s.zero.copy_(torch.where(s.stopped, s.zero, s.zero - step))
        if o.early_stop:
            s.stopped.logical_or_(error >= s.best)
        torch.minimum(s.best, error, out=s.best)
        s.beta.mul_(o.kappa)


def _lengths(o: Any) -> list[int]:
    return [CHUNK] * (o.iters // CHUNK) + ([o.iters % CHUNK] if o.iters % CHUNK else [])


def rounds(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int, o: Any) -> torch.Tensor:
    """The rounds in chunks, uncaptured (any device): the zero points :func:`optimize_zero_cuda` gives."""
    s = _State(w, scale, zero)
    s.load(w, scale, zero, o.beta)
    for k in _lengths(o):
        _chunk(s, qmin, qmax, o, k)
        if o.early_stop and bool(s.stopped):
            break
    return s.zero.clone()


_graphs: OrderedDict[tuple[Any, ...], tuple[_State, dict[int, torch.cuda.CUDAGraph]]] = OrderedDict()


def optimize_zero_cuda(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int,
                       o: Any) -> torch.Tensor:
    """:func:`rounds`, each chunk replayed from a CUDA graph captured for this shape."""
    if w.numel() > MAX_ELEMENTS:
        return rounds(w, scale, zero, qmin, qmax, o)
    key = (tuple(w.shape), tuple(scale.shape), w.device, qmin, qmax, o)
    entry = _graphs.get(key)
    if entry is None:
        state = _State(w, scale, zero)
        graphs: dict[int, torch.cuda.CUDAGraph] = {}
        side = torch.cuda.Stream(device=w.device)
        side.wait_stream(torch.cuda.current_stream(w.device))
        with torch.cuda.stream(side):  # warm-up outside the capture (allocator, kernel caches)
            state.load(w, scale, zero, o.beta)
            _chunk(state, qmin, qmax, o, 1)
        torch.cuda.current_stream(w.device).wait_stream(side)
        for k in set(_lengths(o)):
            graphs[k] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graphs[k]):
                _chunk(state, qmin, qmax, o, k)
        entry = (state, graphs)
        _graphs[key] = entry
        while len(_graphs) > MAX_GRAPHS:
            _graphs.popitem(last=False)
    _graphs.move_to_end(key)
    state, graphs = entry
    state.load(w, scale, zero, o.beta)
    for k in _lengths(o):
        graphs[k].replay()
        if o.early_stop and bool(state.stopped):
            break
    return state.zero.clone()
