"""Stopping a run at a block boundary on Ctrl-C (SIGINT) or SIGTERM.

Inside :class:`StopAtBlockBoundary` the first signal only sets a flag; the block loop checks it
after each block is in the journal and stops there with :class:`RunInterrupted`, whose message
says how to resume. A second Ctrl-C stops at once (the journal still holds every finished block).
Outside the main thread (where Python cannot install handlers) nothing changes.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

from ..errors import QFError


class RunInterrupted(QFError):
    """The run stopped at a block boundary on a signal; the journal can resume it."""

    exit_code = 130


class EvaluationInterrupted(QFError):
    """Ctrl-C during evaluation: the artifact is complete; only its report is missing."""

    exit_code = 130


class StopAtBlockBoundary:
    """Context manager: SIGINT/SIGTERM set :attr:`requested` instead of stopping at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> StopAtBlockBoundary:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = name

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()
