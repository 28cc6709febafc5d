"""SIGTERM and SIGINT during `drct train`: stop cleanly at a point where the run directory is whole.

While `StopOnSignal` is active, either signal raises `TrainingInterrupted` in the main thread
at once (the fold in progress is discarded: nothing of it is written yet), except inside a
`deferred()` block (writing a fold's files), which finishes first; the exception is raised as
it ends. The trainer turns it into one line and leaves the run marked incomplete
(pipeline/training/rundir.py); a rerun resumes at the first unfinished fold.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Self

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(BaseException):
    """Training stopped by a signal. A BaseException like KeyboardInterrupt, so that no
    ``except Exception`` on the way swallows it; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"stopped by {signal_name(signum)}")
        self.signum = signum
        self.message = message or f"stopped by {signal_name(signum)}"

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopOnSignal:
    """Context manager: SIGTERM/SIGINT -> `TrainingInterrupted` (see the module docstring).
    Outside the main thread (where Python cannot install handlers) it does nothing."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self._depth = 0
        self._raised = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, _frame) -> None:
        if self.pending is None:
            self.pending = signum
        if self._depth == 0 and not self._raised:
            self._raised = True
            raise TrainingInterrupted(signum)

    @contextmanager
    def deferred(self, raise_pending: bool = True) -> Iterator[None]:
        """A block a signal does not interrupt; a signal that arrived meanwhile is raised at its end
        (unless `raise_pending` is False, or the block itself raised)."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if raise_pending and self._depth == 0 and self.pending is not None and not self._raised:
            self._raised = True
            raise TrainingInterrupted(self.pending)
