"""The reject record: a file or scan left out of a cache, and why.

It lives in the cache package because the cache stores rejects (the ``/rejects`` datasets and
the rejects CSV beside OUT); the readers produce them, so `pipeline.data.scan_index` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cache import csv_safe


@dataclass
class Reject:
    """A file or scan left out, and why. Written to the rejects CSV beside the cache."""

    path: str
    reason: str
    scan_id: str = ""


REJECT_FIELDS = ["scan_id", "path", "reason"]


def write_rejects(rejects: list[Reject], path: str | Path) -> None:
    """Write (replace) a rejects CSV: one row per left-out file or scan with its reason."""
    with open(path, "w", newline="") as handle:
        writer = csv_safe.dict_writer(handle, fieldnames=REJECT_FIELDS)
        writer.writeheader()
        for reject in rejects:
            writer.writerow({"scan_id": reject.scan_id, "path": reject.path, "reason": reject.reason})
