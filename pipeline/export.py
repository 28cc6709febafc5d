"""Batch export of cached slice vectors to NumPy (.npz), Parquet or a standalone HDF5 subset.

Researchers keep the feature cache for months and want its vectors in their own tools. This
module copies chosen scans (default all) at chosen resolutions (default all) out of a finished
cache (`cache.store.FeatureCache`) without changing a value: the float16 vectors are written as
float16 in every format, so an export compares bit-for-bit equal with the cache.

Memory is bounded: scans are read in batches of at most `batch_slices` slices (a scan is never
split), and each writer streams a batch to disk before the next one is read. A batch of 8,192
slices at two resolutions is 16 MiB of vectors, so an RSNA-sized cache (~750,000 slices, 1.5 GB
of vectors) exports with the scan/slice tables plus one batch in memory.

Formats (one writer class per format, same three calls: `write(batch)`, `close()`, `abort()`):

* ``npz``: one ``.npz`` file readable by ``numpy.load`` (no pickle needed). ``np.savez`` needs
  every array in memory, so `NpzWriter` writes the zip itself: the size of each array is known
  from the scan table, so it writes each ``.npy`` header first and then appends the rows batch by
  batch into the zip member (ZIP64, stored, not compressed, as ``np.savez`` does). The feature
  arrays are ``features_<res>`` (n_slices, 512) float16; the tables are unicode/number arrays;
  ``manifest.json`` is also a member.
* ``parquet``: one row per slice (``scan_id, patient_id, slice_index, z, sop_uid``, one
  ``scan_label_<name>`` float32 column (NaN unknown) and one ``slice_label_<name>`` int8 column
  (-1 unknown) per class, ``features_<res>`` as ``fixed_size_list<halffloat>[512]``), written with
  ``pyarrow.parquet.ParquetWriter`` one row group per batch. The manifest header (without the
  per-slice lists, which are columns) is in the file's key-value metadata under ``drct_manifest``.
* ``h5``: the same schema as the cache itself (`cache.store`), so `FeatureCache` opens the subset
  and every `drct` stage can read it; datasets are created at their final size and filled batch by
  batch, and the ``complete`` attribute is set last.

Nothing that is not an export is ever replaced (`check_target`): an existing ``--out`` is refused
unless ``overwrite``, and even then only an earlier export of the same format (its manifest beside
it says so) is replaced, never a label CSV, a DICOM file, a checkpoint or a cache; nothing is
written inside the cache's data root (its DICOM tree, recorded at extraction).

Every export is written under a temporary name and renamed into place when finished (a killed
export leaves no file that looks complete), and gets a sidecar manifest ``<out>.manifest.json``:
the scan ids in export order, per scan its slice count, offset in the export, z positions, SOP
instance UIDs and labels; label names, resolutions, the cache's provenance and where it came from.
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from cache.store import (
    FEATURE_DIM,
    STR,
    CacheError,
    FeatureCache,
    ScanTable,
    _corrupt_message,
    check_finite,
    encode_attr,
    strings_digest,
)
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


def _ascii(values) -> np.ndarray:
    """Strings -> a fixed-width bytes array (np.load reads it without pickle; DICOM UIDs and our
    ids are ASCII, and 'S' takes a quarter of the memory of numpy's UCS-4 unicode)."""
    encoded = [str(v).encode() for v in values]
    width = max([len(v) for v in encoded] + [1])
    return np.array(encoded, dtype=f"S{width}")


def _unicode(values) -> np.ndarray:
    values = [str(v) for v in values]
    width = max([len(v) for v in values] + [1])
    return np.array(values, dtype=f"<U{width}")


class _Temporary:
    """Shared by the writers: work under `<out>.tmp`, rename on close, delete on abort."""

    def __init__(self, out: Path):
        self.out = out
        self.tmp = out.with_name(out.name + ".tmp")

    def _commit(self) -> None:
        os.replace(self.tmp, self.out)

    def abort(self) -> None:
        self.tmp.unlink(missing_ok=True)


class NpzWriter(_Temporary):
    """One ``.npz`` written member by member (``numpy.load(out)`` reads it, no pickle).

    ``np.savez`` needs every array in memory at once, so the zip is written here: each ``.npy``
    header is written first (the shape is known from the scan table) and the rows follow batch by
    batch. A zip holds one open member at a time, so each feature array is its own pass over the
    cache. Members: ``features_<res>`` (n_slices, 512) float16; per scan ``scan_id, patient_id``
    (bytes), ``scan_offset`` i8, ``scan_n_slices`` i4, ``scan_labels`` (n_scans, C) f4 (NaN
    unknown); per slice ``slice_scan`` i4 (export index of its scan), ``slice_index`` i4,
    ``slice_z`` f8, ``slice_sop_uid`` (bytes), ``slice_labels`` (n_slices, C) i1 (-1 unknown);
    ``label_names`` (unicode), ``resolutions`` i4 and ``manifest.json`` (the manifest header)."""

    def __init__(self, out: Path, cache: FeatureCache, selection: Selection, header: dict,
                 chunk_rows: int = 65536):
        super().__init__(out)
        self.selection = selection
        self.passes = [[res] for res in selection.resolutions]
        self.archive = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self.stream = None
        self.stream_name = None
        table, scans = cache.table, selection.scans
        self._whole("scan_id", _ascii(table.scan_id[scans]))
        self._whole("patient_id", _ascii(table.patient_id[scans]))
        self._whole("scan_offset", selection.offset)
        self._whole("scan_n_slices", selection.n_slices)
        self._whole("scan_labels", table.labels[scans].astype(np.float32))
        self._whole("label_names", _unicode(cache.label_names))
        self._whole("resolutions", np.array(selection.resolutions, dtype=np.int32))
        self.archive.writestr("manifest.json", json.dumps(header, indent=1))
        # per-slice tables, streamed in row blocks (an RSNA export has ~750,000 rows)
        self.features_written: set[int] = set()
        n = selection.total_slices
        uid_width = max([len(str(u)) for u in table.sop_uid] + [1])
        blocks = list(plan_batches(selection, chunk_rows)) if n else []
        self._streamed("slice_scan", (n,), np.int32,
                       (np.repeat(p, selection.n_slices[p]) for p in blocks))
        self._streamed("slice_index", (n,), np.int32,
                       (np.concatenate([np.arange(k) for k in selection.n_slices[p]]) for p in blocks))
        self._streamed("slice_z", (n,), np.float64, (table.z[selection.slice_rows(p)] for p in blocks))
        self._streamed("slice_sop_uid", (n,), np.dtype(f"S{uid_width}"),
                       (np.array([str(u).encode() for u in table.sop_uid[selection.slice_rows(p)]],
                                 dtype=f"S{uid_width}") for p in blocks))
        self._streamed("slice_labels", (n, len(cache.label_names)), np.int8,
                       (table.slice_labels[selection.slice_rows(p)] for p in blocks))

    def _whole(self, name: str, array: np.ndarray) -> None:
        with self.archive.open(name + ".npy", "w", force_zip64=True) as stream:
            np.lib.format.write_array(stream, np.asarray(array), allow_pickle=False)

    def _open(self, name: str, shape: tuple[int, ...], dtype) -> None:
        self._close_stream()
        self.stream = self.archive.open(name + ".npy", "w", force_zip64=True)
        self.stream_name = name
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                  "shape": shape}
        np.lib.format.write_array_header_2_0(self.stream, header)

    def _close_stream(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
            self.stream_name = None

    def _streamed(self, name: str, shape: tuple[int, ...], dtype, blocks) -> None:
        self._open(name, shape, dtype)
        for block in blocks:
            self.stream.write(np.ascontiguousarray(block, dtype=dtype).tobytes())
        self._close_stream()

    def write(self, batch: Batch) -> None:
        (resolution, vectors), = batch.features.items()
        name = f"features_{resolution}"
        if self.stream_name != name:
            self._open(name, (self.selection.total_slices, FEATURE_DIM), np.float16)
            self.features_written.add(resolution)
        self.stream.write(np.ascontiguousarray(vectors, dtype=np.float16).tobytes())

    def close(self) -> None:
        self._close_stream()
        # a resolution whose pass had no batches (empty selection) still gets its empty array
        for resolution in self.selection.resolutions:
            if resolution not in self.features_written:
                self._whole(f"features_{resolution}", np.zeros((0, FEATURE_DIM), np.float16))
        self.archive.close()
        self._commit()

    def abort(self) -> None:
        self._close_stream()
        self.archive.close()
        super().abort()


class ParquetWriter(_Temporary):
    """One row per slice, one row group per batch (`pyarrow.parquet.ParquetWriter`).

    Columns: ``scan_id, patient_id`` (string), ``slice_index`` int32 (position in the scan, z
    order), ``z`` float64, ``sop_uid`` string, ``scan_label_<name>`` float32 (NaN unknown),
    ``slice_label_<name>`` int8 (-1 unknown), ``features_<res>`` fixed_size_list<halffloat>[512].
    The manifest header is in the schema metadata under ``drct_manifest``."""

    def __init__(self, out: Path, cache: FeatureCache, selection: Selection, header: dict):
        import pyarrow as pa
        import pyarrow.parquet as pq

        super().__init__(out)
        self.pa = pa
        self.table, self.selection = cache.table, selection
        self.label_names = list(cache.label_names)
        self.passes = [list(selection.resolutions)]
        fields = [
            pa.field("scan_id", pa.string()),
            pa.field("patient_id", pa.string()),
            pa.field("slice_index", pa.int32()),
            pa.field("z", pa.float64()),
            pa.field("sop_uid", pa.string()),
            *[pa.field(f"scan_label_{name}", pa.float32()) for name in self.label_names],
            *[pa.field(f"slice_label_{name}", pa.int8()) for name in self.label_names],
            *[pa.field(f"features_{res}", pa.list_(pa.float16(), FEATURE_DIM)) for res in selection.resolutions],
        ]
        self.schema = pa.schema(fields, metadata={"drct_manifest": json.dumps(header)})
        self.writer = pq.ParquetWriter(self.tmp, self.schema)

    def write(self, batch: Batch) -> None:
        pa, table = self.pa, self.table
        counts = table.n_slices[batch.scans].astype(np.int64)
        per_slice_scan = np.repeat(batch.scans, counts)
        columns = {
            "scan_id": pa.array(table.scan_id[per_slice_scan].tolist(), pa.string()),
            "patient_id": pa.array(table.patient_id[per_slice_scan].tolist(), pa.string()),
            "slice_index": pa.array(np.concatenate([np.arange(k, dtype=np.int32) for k in counts])),
            "z": pa.array(table.z[batch.rows]),
            "sop_uid": pa.array(table.sop_uid[batch.rows].tolist(), pa.string()),
        }
        scan_labels = table.labels[per_slice_scan]
        slice_labels = table.slice_labels[batch.rows]
        for k, name in enumerate(self.label_names):
            columns[f"scan_label_{name}"] = pa.array(scan_labels[:, k].astype(np.float32))
        for k, name in enumerate(self.label_names):
            columns[f"slice_label_{name}"] = pa.array(slice_labels[:, k].astype(np.int8))
        for res, vectors in batch.features.items():
            flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float16).reshape(-1))
            columns[f"features_{res}"] = pa.FixedSizeListArray.from_arrays(flat, FEATURE_DIM)
        self.writer.write_table(pa.table(columns, schema=self.schema))

    def close(self) -> None:
        self.writer.close()
        self._commit()

    def abort(self) -> None:
        self.writer.close()
        super().abort()


class H5Writer(_Temporary):
    """A standalone cache holding the selected scans, in the cache's own schema (`cache.store`),
    so `FeatureCache` and every `drct` stage open it. Datasets are created at their final size
    and filled batch by batch; the cache's attributes (provenance, label names, layout) are
    copied, ``export_of`` names the source, and ``complete`` is set last."""

    def __init__(self, out: Path, cache: FeatureCache, selection: Selection, header: dict):
        super().__init__(out)
        self.table, self.selection = cache.table, selection
        self.passes = [list(selection.resolutions)]
        table, scans = cache.table, selection.scans
        n, c = selection.total_slices, len(cache.label_names)
        self.file = h5py.File(self.tmp, "w")
        f = self.file
        for key, value in cache.attrs.items():
            if key not in ("complete", "resolutions"):
                f.attrs[key] = encode_attr(value)
        f.attrs["resolutions"] = encode_attr(list(selection.resolutions))
        f.attrs["export_of"] = str(cache.path.resolve())
        f.create_dataset("scans/scan_id", data=np.array(list(table.scan_id[scans]), dtype=object), dtype=STR)
        f.create_dataset("scans/patient_id", data=np.array(list(table.patient_id[scans]), dtype=object), dtype=STR)
        # Checksums as in the cache (cache/store.py): Fletcher32 on numbers, sha256 on strings (at close).
        f.create_dataset("scans/labels", data=table.labels[scans].astype(np.float32).reshape(len(scans), c),
                         fletcher32=True)
        f.create_dataset("scans/offset", data=selection.offset, fletcher32=True)
        f.create_dataset("scans/n_slices", data=selection.n_slices, fletcher32=True)
        f.create_dataset("slices/z", shape=(n,), dtype=np.float64, fletcher32=True)
        f.create_dataset("slices/sop_uid", shape=(n,), dtype=STR)
        f.create_dataset("slices/path", shape=(n,), dtype=STR)
        f.create_dataset("slices/labels", shape=(n, c), dtype=np.int8, fletcher32=True)
        chunks = (max(1, min(n, 4096)), FEATURE_DIM) if n else None
        for res in selection.resolutions:
            f.create_dataset(f"features/{res}", shape=(n, FEATURE_DIM), dtype=np.float16, chunks=chunks,
                             fletcher32=True)

    def write(self, batch: Batch) -> None:
        f, table, dest = self.file, self.table, batch.dest
        f["slices/z"][dest] = table.z[batch.rows]
        f["slices/sop_uid"][dest] = np.array(list(table.sop_uid[batch.rows]), dtype=object)
        f["slices/path"][dest] = np.array(list(table.path[batch.rows]), dtype=object)
        f["slices/labels"][dest] = table.slice_labels[batch.rows]
        for res, vectors in batch.features.items():
            f[f"features/{res}"][dest] = vectors

    def close(self) -> None:
        for name in ("scans/scan_id", "scans/patient_id", "slices/sop_uid", "slices/path"):
            self.file[name].attrs["sha256"] = strings_digest(self.file[name][()])
        self.file.attrs["complete"] = True
        self.file.flush()
        self.file.close()
        self._commit()

    def abort(self) -> None:
        try:
            self.file.close()
        finally:
            super().abort()


WRITERS = {"npz": NpzWriter, "parquet": ParquetWriter, "h5": H5Writer}


# -- driver ----------------------------------------------------------------------------------


@dataclass
class ExportSummary:
    out: Path
    manifest: Path
    format: str
    n_scans: int
    n_slices: int
    resolutions: list[int]
    seconds: float
    bytes: int

    @property
    def scans_per_second(self) -> float:
        return self.n_scans / self.seconds if self.seconds > 0 else float("inf")


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


def export_cache(
    cache_path: str | Path,
    out: str | Path,
    fmt: str,
    *,
    scan_ids: Sequence[str] | None = None,
    resolutions: Sequence[int] | None = None,
    batch_slices: int = 8192,
    progress: bool = True,
    overwrite: bool = False,
) -> ExportSummary:
    """Export `scan_ids` (None = all) at `resolutions` (None = all) of the cache at `cache_path`
    to `out` in format `fmt` (npz | parquet | h5), plus `<out>.manifest.json`. Streams: at most
    one batch of `batch_slices` slices of vectors is in memory. Raises ExportError / CacheError
    with a message for bad requests. `out` must not exist unless `overwrite`, and then must be an
    earlier export of format `fmt`; nothing is written inside the cache's data root (`check_target`)."""
    from tqdm import tqdm

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    cache = FeatureCache(cache_path)
    try:
        if out.resolve() == cache.path.resolve():
            raise ExportError(f"refusing to export {cache.path} onto itself")
        if out.is_dir():
            raise ExportError(f"--out {out} is a directory; give a file name, e.g. {out / ('features' + SUFFIX[fmt])}")
        check_target(out, fmt, overwrite, [cache.attrs.get("data_root")])
        selection = select(cache, scan_ids, resolutions)
        out.parent.mkdir(parents=True, exist_ok=True)
        header = manifest_header(cache, selection, fmt, out)
        started = time.perf_counter()
        writer = WRITERS[fmt](out, cache, selection, header)
        manifest = ManifestWriter(manifest_path(out), header)
        n_scans = len(selection.scans)
        bar = tqdm(total=n_scans * len(writer.passes), unit="scan", desc=f"export {fmt}",
                   disable=not progress, dynamic_ncols=True)
        try:
            for pass_resolutions in writer.passes:
                for batch in read_batches(cache, selection, pass_resolutions, batch_slices):
                    writer.write(batch)
                    bar.update(len(batch.scans))
            table = cache.table
            for position in range(n_scans):
                manifest.add(scan_entry(table, selection, position))
            writer.close()
            manifest.close()
        except BaseException:
            writer.abort()
            manifest.abort()
            raise
        finally:
            bar.close()
        seconds = time.perf_counter() - started
        return ExportSummary(out=out, manifest=manifest_path(out), format=fmt, n_scans=n_scans,
                             n_slices=selection.total_slices, resolutions=selection.resolutions,
                             seconds=seconds, bytes=out.stat().st_size)
    finally:
        cache.close()


def cache_error_types() -> tuple[type[Exception], ...]:
    """Errors `export_cache` raises for bad input (the CLI turns them into messages)."""
    return (ExportError, CacheError, OSError)
