"""What every export format shares: the selection of scans and resolutions, the batches read
from the cache, the sidecar manifest, the temporary file renamed into place, and the check of
the target (`check_target`). The writers are one module per format (npz.py, parquet.py, h5.py);
the driver is `pipeline.export.export_cache` (pipeline/export/__init__.py, which says more).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache.store import FEATURE_DIM, CacheError, FeatureCache, ScanTable, _corrupt_message, check_finite
from pipeline import __version__

FORMATS = ("npz", "parquet", "h5")
SUFFIX = {"npz": ".npz", "parquet": ".parquet", "h5": ".h5"}
MANIFEST_VERSION = 1


class ExportError(ValueError):
    """An export request that cannot be served; the message says what and how to fix it."""


@dataclass
class Batch:
    """A group of whole scans read from the cache: their export positions and vectors."""

    positions: np.ndarray                 # export positions of the scans (consecutive)
    scans: np.ndarray                     # cache indices of the scans, export order
    rows: np.ndarray                      # cache rows of their slices, export order
    dest: slice                           # the same slices' rows in the export
    features: dict[int, np.ndarray]       # resolution -> (len(rows), 512) float16


@dataclass
class Selection:
    """What is exported: scans (cache indices, export order) and resolutions, with the export's
    own slice offsets (scan i occupies rows offset[i] .. offset[i] + n_slices[i])."""

    scans: np.ndarray
    resolutions: list[int]
    n_slices: np.ndarray = field(init=False)
    offset: np.ndarray = field(init=False)
    table: ScanTable = field(repr=False, default=None)

    def __post_init__(self):
        self.n_slices = self.table.n_slices[self.scans].astype(np.int32)
        self.offset = np.concatenate([[0], np.cumsum(self.n_slices, dtype=np.int64)[:-1]]).astype(np.int64)

    @property
    def total_slices(self) -> int:
        return int(self.n_slices.sum())

    def slice_rows(self, positions: Sequence[int] | None = None) -> np.ndarray:
        """Cache rows of the slices of the scans at export `positions` (all if None), in export order."""
        scans = self.scans if positions is None else self.scans[np.asarray(positions, dtype=np.int64)]
        if len(scans) == 0:
            return np.zeros(0, dtype=np.int64)
        starts = self.table.offset[scans]
        counts = self.table.n_slices[scans].astype(np.int64)
        # rows = start_i + 0..count_i-1 for each scan, concatenated, without a Python loop per slice
        repeat_starts = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        return repeat_starts + np.arange(int(counts.sum()), dtype=np.int64)


# -- selection ------------------------------------------------------------------------------


def quote_token(token: str, limit: int = 24) -> str:
    """`token` for an error message: at most `limit` characters (then "..."), control characters
    and quotes escaped (Python's repr)."""
    token = str(token)
    return repr(token[:limit]) + ("..." if len(token) > limit else "")


def select(cache: FeatureCache, scan_ids: Sequence[str] | None = None,
           resolutions: Sequence[int] | None = None) -> Selection:
    """Resolve the user's scan ids (None = every scan, cache order; duplicates kept once, first
    position wins) and resolutions (None = every cached resolution) against the cache."""
    table = cache.table
    if scan_ids is None:
        scans = np.arange(len(table.scan_id), dtype=np.int64)
    else:
        wanted = list(dict.fromkeys(str(s) for s in scan_ids))
        index = {sid: i for i, sid in enumerate(table.scan_id)}
        missing = [sid for sid in wanted if sid not in index]
        if missing:  # one id quoted, truncated: an @FILE of other content (a password file) is not echoed
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise ExportError(f"{len(missing)} scan id(s) not in {cache.path}: {quote_token(missing[0])}{more}")
        scans = np.array([index[sid] for sid in wanted], dtype=np.int64)
    if resolutions is None or len(resolutions) == 0:
        chosen = list(cache.resolutions)
    else:
        chosen = list(dict.fromkeys(int(r) for r in resolutions))
        absent = [r for r in chosen if r not in cache.resolutions]
        if absent:
            raise ExportError(f"{cache.path} has resolutions {cache.resolutions}; not cached: {absent}")
    return Selection(scans=scans, resolutions=chosen, table=table)


def plan_batches(selection: Selection, batch_slices: int) -> Iterator[np.ndarray]:
    """Export positions grouped into batches of whole scans with at most `batch_slices` slices
    (a scan larger than that is a batch of its own)."""
    if batch_slices < 1:
        raise ExportError(f"batch_slices must be >= 1, got {batch_slices}")
    start, count = 0, 0
    for position, n in enumerate(selection.n_slices):
        if count and count + int(n) > batch_slices:
            yield np.arange(start, position)
            start, count = position, 0
        count += int(n)
    if start < len(selection.scans):
        yield np.arange(start, len(selection.scans))


def _runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """(dest_start, src_start, length) of the runs of consecutive cache rows, so a batch of
    neighbouring scans is one HDF5 read instead of one per scan."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(rows)]])
    return [(int(s), int(rows[s]), int(e - s)) for s, e in zip(starts, ends)]


def read_batches(cache: FeatureCache, selection: Selection, resolutions: Sequence[int],
                 batch_slices: int) -> Iterator[Batch]:
    """Stream `Batch`es of the given resolutions from the cache in export order (one batch in
    memory at a time)."""
    for positions in plan_batches(selection, batch_slices):
        rows = selection.slice_rows(positions)
        runs = _runs(rows)
        features = {}
        for resolution in resolutions:
            dataset = cache.file[f"features/{resolution}"]
            out = np.empty((len(rows), FEATURE_DIM), dtype=dataset.dtype)
            try:
                for dest, src, length in runs:
                    dataset.read_direct(out, np.s_[src:src + length], np.s_[dest:dest + length])
            except OSError as exc:  # Fletcher32 mismatch: a damaged chunk is never exported
                raise CacheError(_corrupt_message(cache.path, dataset.name, exc)) from None
            check_finite(out, f"{cache.path}: {dataset.name}")
            features[resolution] = out
        start = int(selection.offset[positions[0]])
        yield Batch(positions=positions, scans=selection.scans[positions], rows=rows,
                    dest=slice(start, start + len(rows)), features=features)


# -- manifest -------------------------------------------------------------------------------


def _json_float(value: float):
    return None if value is None or not np.isfinite(value) else float(value)


def manifest_header(cache: FeatureCache, selection: Selection, fmt: str, out: Path) -> dict:
    """Everything about an export except the per-scan list (small; embedded in the files)."""
    stat = cache.path.stat()
    return {
        "manifest_version": MANIFEST_VERSION,
        "format": fmt,
        "file": out.name,
        "n_scans": len(selection.scans),
        "n_slices": selection.total_slices,
        "resolutions": selection.resolutions,
        "feature_dim": FEATURE_DIM,
        "feature_dtype": "float16",
        "label_names": list(cache.label_names),
        "slice_order": "z ascending along the slice normal, as in the cache; a scan's slices are "
                       "the contiguous rows offset .. offset + n_slices - 1",
        "provenance": cache.provenance,
        "source": {
            "cache": str(cache.path.resolve()),
            "cache_bytes": int(stat.st_size),
            "cache_mtime": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(stat.st_mtime)),
            "layout": cache.attrs.get("layout"),
            "data_root": cache.attrs.get("data_root"),
        },
        "exported_by": f"drct2-pipeline {__version__}",
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def scan_entry(table: ScanTable, selection: Selection, position: int) -> dict:
    """The manifest record of the scan at export `position`."""
    index = int(selection.scans[position])
    rows = table.rows(index)
    return {
        "scan_id": str(table.scan_id[index]),
        "patient_id": str(table.patient_id[index]),
        "offset": int(selection.offset[position]),
        "n_slices": int(selection.n_slices[position]),
        "labels": [_json_float(v) for v in table.labels[index]],
        "z": [float(v) for v in table.z[rows]],
        "sop_uid": [str(v) for v in table.sop_uid[rows]],
    }


class ManifestWriter:
    """Writes ``<out>.manifest.json`` scan by scan (the per-slice lists of an RSNA-sized export
    are tens of MB of JSON; they never need to be one string in memory)."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.handle = open(self.tmp, "w")  # noqa: SIM115 (closed in close/abort)
        head = json.dumps(header, indent=1)
        self.handle.write(head[:-2] + ',\n "scans": [')
        self.first = True

    def add(self, entry: dict) -> None:
        self.handle.write(("\n  " if self.first else ",\n  ") + json.dumps(entry))
        self.first = False

    def close(self) -> None:
        self.handle.write("\n ]\n}\n")
        self.handle.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.handle.close()
        self.tmp.unlink(missing_ok=True)


def manifest_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".manifest.json")


def read_manifest(out: str | Path) -> dict:
    """The sidecar manifest of an export."""
    return json.loads(manifest_path(out).read_text())


# -- writers ---------------------------------------------------------------------------------
#
# A writer is built with (out, cache, selection, header) and says in `passes` which resolutions
# each pass over the selection must carry; `write(batch)` takes the batches of each pass in
# export order; `close()` finishes the file and renames it into place; `abort()` removes it.


class _Temporary:
    """Shared by the writers: work under `<out>.tmp`, rename on close, delete on abort."""

    def __init__(self, out: Path):
        self.out = out
        self.tmp = out.with_name(out.name + ".tmp")

    def _commit(self) -> None:
        os.replace(self.tmp, self.out)

    def abort(self) -> None:
        self.tmp.unlink(missing_ok=True)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def check_target(out: Path, fmt: str, overwrite: bool, data_roots: Sequence[str | Path | None] = ()) -> None:
    """`ExportError` unless `out` (and its manifest) may be written: never inside a data root;
    an existing file only with `overwrite`, and only if it is an export of format `fmt` (its
    ``<out>.manifest.json`` is a manifest of that format for that file name)."""
    resolved = out.resolve()
    for root in data_roots:
        if root and _inside(resolved, Path(root).resolve()):
            raise ExportError(f"refusing to write {out} inside the data root {root} (the DICOM tree the cache was "
                              "extracted from); choose an --out outside it")
    manifest = manifest_path(out)
    existing = [p for p in (out, manifest) if p.exists() or p.is_symlink()]
    if not existing:
        return
    if not overwrite:
        raise ExportError(f"{existing[0]} exists; pass --overwrite to replace an earlier export, or choose "
                          "another --out")
    try:
        header = json.loads(manifest.read_text()) if manifest.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        header = None
    ours = isinstance(header, dict) and header.get("manifest_version") == MANIFEST_VERSION \
        and header.get("file") == out.name
    if ours and header.get("format") != fmt:
        why = f"it is a {header.get('format')} export, not {fmt}"
    elif not ours or (out.exists() and not out.is_file()):
        why = f"it is not a drct export (no manifest {manifest.name} of it beside it) and may be data: labels, DICOM, " \
              "checkpoints, a cache"
    else:
        return
    raise ExportError(f"refusing to overwrite {out}: {why}; --overwrite only replaces an earlier export of the "
                      "same format: choose another --out")
