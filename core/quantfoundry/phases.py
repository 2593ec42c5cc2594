"""Where a run's time goes: named phases, timed on the thread that runs them.

The pipeline opens a :class:`PhaseClock` for each run and wraps its own work (``load``,
``calibrate``, ``quantize``, ``export``, ``evaluate``); components mark finer phases inside
theirs with :func:`phase` — a GGUF format its final ``encode``, a quantizer its ``search``.
Time is *exclusive*: a phase's total leaves out the phases nested in it, so the totals add up
to the wall time spent inside phases. Outside a clock (a plugin's unit test), :func:`phase`
costs one context-variable read.

Wall time on the calling thread: GPU work launched in a phase but finished later is counted
where the host waits for it (a ``.cpu()``, a synchronize), as any host-side timer sees it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass
class PhaseClock:
    """Exclusive seconds per phase name, in first-seen order."""

    totals: dict[str, float] = field(default_factory=dict)
    _stack: list[list[float]] = field(default_factory=list)  # [start, time spent in nested phases]

    def seconds(self) -> dict[str, float]:
        return dict(self.totals)


_clock: ContextVar[PhaseClock | None] = ContextVar("qf_phase_clock", default=None)


@contextmanager
def measuring(clock: PhaseClock | None = None) -> Iterator[PhaseClock]:
    """Time the phases run inside the ``with`` into ``clock`` (a new one by default)."""
    clock = clock if clock is not None else PhaseClock()
    token = _clock.set(clock)
    try:
        yield clock
    finally:
        _clock.reset(token)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Count the time inside the ``with`` (less nested phases) as ``name``."""
    clock = _clock.get()
    if clock is None:
        yield
        return
    frame = [time.perf_counter(), 0.0]
    clock._stack.append(frame)
    try:
        yield
    finally:
        clock._stack.pop()
        elapsed = time.perf_counter() - frame[0]
        clock.totals[name] = clock.totals.get(name, 0.0) + elapsed - frame[1]
        if clock._stack:
            clock._stack[-1][1] += elapsed
