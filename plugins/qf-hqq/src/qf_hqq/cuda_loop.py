"""HQQ's zero-point rounds on CUDA: every round on the device with no host sync, the whole
loop captured once per weight shape in a CUDA graph and replayed for every weight of that
shape.

The rounds are :func:`qf_hqq.quantizer.optimize_zero`'s, in code units, with the early stop
kept on the device: a round's error is compared with the best so far as a tensor, and after
the first round that does not improve, the zero points stop moving (that round's update is
kept, as the CPU loop and the hqq library keep it). The remaining rounds still run, frozen: a
fixed number of kernels is what a graph can replay. The shrink runs as one dense pass (the pow
is cheap on a GPU; gathering the groups it acts on would need a sync).

On a GPU the loop is launch-bound — a dozen small kernels a round — so one replay per weight
replaces some 250 launches and 20 syncs. Graphs are cached per (shape, device, grid, options),
at most :data:`MAX_GRAPHS` of them (least recently used dropped); weights larger than
:data:`MAX_ELEMENTS` run the same rounds uncaptured.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

MAX_GRAPHS = 8
MAX_ELEMENTS = 1 << 26  # 64M values: the graph's buffers stay a few hundred MB

_graphs: OrderedDict[tuple[Any, ...], tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], torch.Tensor]] = OrderedDict()


def rounds(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int, o: Any) -> torch.Tensor:
    """The rounds without a host sync (``o``: :class:`~qf_hqq.quantizer.HQQOptions`)."""
    inv = 1.0 / scale
    v = w * inv
    u, a = torch.empty_like(v), torch.empty_like(v)
    zero = zero.clone()
    best = torch.full((), float("inf"), device=w.device)
    stopped = torch.zeros((), dtype=torch.bool, device=w.device)
    beta = o.beta
    for _ in range(o.iters):
        torch.add(v, zero, out=u)
        torch.sub(u, torch.round(u, out=a).clamp_(qmin, qmax), out=u)  # d
        torch.abs(u, out=a)
        error = (a.mean(-1, keepdim=True) * scale).mean()
        a.mul_(scale).add_(1e-8).pow_(o.lp_norm - 1).mul_(inv / beta)  # t
        step = torch.minimum(u.abs(), a, out=a).copysign_(u).mean(-1, keepdim=True)
        zero = torch.where(stopped, zero, zero - step)
        if o.early_stop:
            stopped = stopped | (error >= best)
        best = torch.minimum(best, error)
        beta *= o.kappa
    return zero


def optimize_zero_cuda(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int,
                       o: Any) -> torch.Tensor:
    """:func:`rounds`, replayed from a CUDA graph captured for this shape."""
    if w.numel() > MAX_ELEMENTS:
        return rounds(w, scale, zero, qmin, qmax, o)
    key = (tuple(w.shape), tuple(scale.shape), w.device, qmin, qmax, o)
    entry = _graphs.get(key)
    if entry is None:
        static = {"w": w.clone(), "scale": scale.clone(), "zero": zero.clone()}
        side = torch.cuda.Stream(device=w.device)
        side.wait_stream(torch.cuda.current_stream(w.device))
        with torch.cuda.stream(side):  # warm-up outside the capture (allocator, kernel caches)
            rounds(static["w"], static["scale"], static["zero"], qmin, qmax, o)
        torch.cuda.current_stream(w.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = rounds(static["w"], static["scale"], static["zero"], qmin, qmax, o)
        entry = (graph, static, out)
        _graphs[key] = entry
        while len(_graphs) > MAX_GRAPHS:
            _graphs.popitem(last=False)
    _graphs.move_to_end(key)
    graph, static, out = entry
    static["w"].copy_(w)
    static["scale"].copy_(scale)
    static["zero"].copy_(zero)
    graph.replay()
    return out.clone()
