"""Choosing one option per tensor under a byte budget (the planners' knapsack).

Each tensor has options ``(bytes, cost)`` (a format's exact size and the quality it loses, e.g.
the output KL it adds); :func:`allocate` picks one per tensor so that the summed bytes fit the
budget and the summed cost is small. It is the Lagrangian method: on each tensor's lower convex
hull of (bytes, cost), upgrades are taken in order of cost saved per byte — every tensor then
sits where the slope of its hull crosses one common multiplier λ, the optimum of the relaxed
problem — and the bytes left over are spent on the best upgrades that still fit, hull or not.
Costs are assumed additive over tensors (each measured with that tensor alone changed).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Allocation:
    """The choice (option index per tensor), its bytes and cost, and the multiplier λ (cost per
    byte of the last hull upgrade taken; 0 when every tensor got its best option)."""

    choice: dict[str, int]
    bytes: int
    cost: float
    multiplier: float


def lower_hull(options: Sequence[tuple[int, float]]) -> list[int]:
    """Indices of the options on the lower convex hull of (bytes, cost), from the smallest to the
    cheapest in cost: each next one has more bytes, lower cost and a smaller saving per byte."""
    order = sorted(range(len(options)), key=lambda i: (options[i][0], options[i][1]))
    pts: list[int] = []
    for i in order:
        b, c = options[i]
        if pts and options[pts[-1]][0] == b:
            continue  # same bytes, not cheaper (sorted by cost within equal bytes)
        if pts and c >= options[pts[-1]][1]:
            continue  # more bytes for no gain: never worth taking
        while len(pts) >= 2:
            (b1, c1), (b2, c2) = options[pts[-2]], options[pts[-1]]
            # the middle point is above the chord from pts[-2] to i: not on the hull
            if (c2 - c1) * (b - b1) >= (c - c1) * (b2 - b1):
                pts.pop()
            else:
                break
        pts.append(i)
    return pts


def allocate(options: Mapping[str, Sequence[tuple[int, float]]], budget: int, *, fixed: int = 0) -> Allocation:
    """One option per tensor with ``fixed + Σ bytes <= budget`` and a small ``Σ cost``.

    :raises ValueError: when even the smallest option of every tensor exceeds the budget (the
        message says the smallest reachable size)."""
    smallest = {n: min(range(len(o)), key=lambda i: (o[i][0], o[i][1])) for n, o in options.items()}
    used = fixed + sum(options[n][i][0] for n, i in smallest.items())
    if used > budget:
        raise ValueError(f"the budget of {budget:,} bytes is below the smallest plan ({used:,} bytes)")
    hulls = {n: lower_hull(o) for n, o in options.items()}
    choice = {n: hulls[n][0] for n in options}
    used = fixed + sum(options[n][i][0] for n, i in choice.items())
    heap: list[tuple[float, str, int]] = []

    def push(name: str, pos: int) -> None:
        hull = hulls[name]
        if pos + 1 < len(hull):
            (b0, c0), (b1, c1) = options[name][hull[pos]], options[name][hull[pos + 1]]
            heapq.heappush(heap, (-(c0 - c1) / (b1 - b0), name, pos))

    for name in options:
        push(name, 0)
    multiplier = 0.0
    while heap:
        neg_rate, name, pos = heapq.heappop(heap)
        hull = hulls[name]
        extra = options[name][hull[pos + 1]][0] - options[name][hull[pos]][0]
        if used + extra > budget:
            multiplier = max(multiplier, -neg_rate)
            continue  # this tensor's later hull steps save less per byte: it stays here
        used += extra
        choice[name] = hull[pos + 1]
        push(name, pos + 1)
    # spend what is left: the upgrade (any option) saving the most cost that still fits
    while True:
        best: tuple[float, str, int] | None = None
        for name, opts in options.items():
            b0, c0 = opts[choice[name]]
            for i, (b, c) in enumerate(opts):
                if c < c0 and used - b0 + b <= budget and (best is None or c0 - c > best[0]):
                    best = (c0 - c, name, i)
        if best is None:
            break
        _, name, i = best
        used += options[name][i][0] - options[name][choice[name]][0]
        choice[name] = i
    cost = sum(options[n][i][1] for n, i in choice.items())
    return Allocation(choice, used, cost, multiplier)
