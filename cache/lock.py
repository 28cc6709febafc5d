"""One writer per output: an exclusive ``fcntl.flock`` on ``OUT.lock`` beside the output.

`drct extract` (the cache writer) and `drct train` (the run directory) both hold it while they
write. The kernel releases the lock when the process dies, even by SIGKILL, so a stale lock file
never blocks a rerun; the file itself is left in place (deleting it would race with a second
writer that has opened it but not yet locked it).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Self

from cache.store import CacheError, storage_error


class WriterLocked(CacheError):
    """Another process holds OUT.lock."""


def lock_path(out: str | Path) -> Path:
    """``features.h5`` -> ``features.h5.lock``; ``runs/drct`` -> ``runs/drct.lock``."""
    return Path(str(Path(out)) + ".lock")


class OutputLock:
    """Exclusive, non-blocking lock on `lock_path(out)`; `command` names the writer in the message
    a second one gets. Use as a context manager, or `acquire()` / `release()`."""

    def __init__(self, out: str | Path, command: str):
        self.out = Path(out)
        self.path = lock_path(out)
        self.command = command
        self._fd: int | None = None

    def acquire(self) -> Self:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise storage_error(exc, self.path, 0) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WriterLocked(
                f"another `{self.command}` is writing {self.out} (lock {self.path} is held); "
                "wait for it to finish or choose another --out"
            ) from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
