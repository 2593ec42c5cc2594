"""A rich progress bar (per block, per variant, per training step) with ETA, quiet when disabled or
not on a terminal; plugins reach it as :class:`quantfoundry.toolkit.Progress`."""

from __future__ import annotations

from types import TracebackType


class Progress:
    def __init__(self, *, enabled: bool, total: int, label: str, unit: str = "blocks", transient: bool = False):
        self._bar = None
        if enabled:  # rich only when a bar is shown (importing quantfoundry stays lean)
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as _RichProgress

            self._bar = _RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn(unit), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                transient=transient)
            self._task = self._bar.add_task(label, total=total)

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=text)

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()
