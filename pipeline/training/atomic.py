"""Atomic files of a run directory: written whole or not at all (see pipeline/training/rundir.py).

Every file goes to ``NAME.tmp`` first, then `os.replace`: a file exists whole or not at all, and
a full disk is one `cache.store.DiskSpaceError` (where, how much is needed and free) with the
temporary file removed, as in `drct extract`. Used by the run directory's writers (trainer.py,
rundir.py's marker, checkpoint.py) and by `drct predict`'s predictions.npz (pipeline/oof.py).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from cache import store


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> Path:
    """Write `data` to `path` through ``path.tmp`` (free space checked first, fsync, `os.replace`).
    A full disk or an unwritable folder raises one `cache.store.CacheError` (`DiskSpaceError` for
    a full disk, naming the folder and the size) and leaves no temporary file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    needed = len(data) + 64 * 1024
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        store.check_free_space(path.parent, needed, f"writing {path.name}")
        with open(tmp, "wb") as handle:
            handle.write(data)
        store._fsync_path(tmp)
        os.replace(tmp, path)
    except store.DiskSpaceError:
        store.remove_quietly(tmp)
        raise
    except OSError as exc:
        store.remove_quietly(tmp)
        raise store.storage_error(exc, path, needed) from None
    store._fsync_path(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def npz_bytes(**arrays) -> memoryview:
    """An uncompressed .npz in memory (written with `atomic_write_bytes`: np.savez into a full
    disk fails inside zipfile and leaves half a file)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getbuffer()
