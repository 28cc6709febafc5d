"""The feature cache file format (schema version 1), its reader and its whole-file writer.

Layout of one HDF5 file::

    attrs   schema_version, complete (written last), provenance attributes (PROVENANCE_KEYS),
            label_names (JSON list), layout, data_root
    /scans/scan_id      str   (n_scans,)            /scans/patient_id  str (n_scans,)
    /scans/labels       f4    (n_scans, n_classes)  NaN where unknown (folder layout)
    /scans/offset       i8    (n_scans,)            first row of the scan in /slices and /features
    /scans/n_slices     i4    (n_scans,)
    /slices/z           f8    (n_slices,)           position along the slice normal, z order per scan
    /slices/sop_uid     str   (n_slices,)
    /slices/path        str   (n_slices,)           DICOM path (relative to data_root where possible)
    /slices/labels      i1    (n_slices, n_classes) -1 where unknown
    /features/<res>     f2    (n_slices, 512)       one array per resolution, e.g. /features/224
    /rejects/scan_id, /rejects/path, /rejects/reason   str (n_rejects,)  optional: slices and scans
                                                    left out by extraction (cache/writer.py)
    /rejects/rejected_scan_id  str                  optional: scans with no decodable slice

A scan's slices are the contiguous rows offset..offset+n_slices of every /slices and /features
array, so one scan at one resolution is a single slice read (O(1) lookup through the scan table).
The writer produces the file under a temporary name and renames it into place, and `complete`
is set last: a file without it is never accepted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

SCHEMA_VERSION = 1
FEATURE_DIM = 512
PROVENANCE_KEYS = (
    "encoder",
    "weights",
    "weights_digest",
    "resolutions",
    "windows",
    "aps_source",
    "preprocess_version",
    "software_version",
)
STR = h5py.string_dtype("utf-8")


class CacheError(RuntimeError):
    """A cache that cannot be used; the message says what is wrong and what to do."""


@dataclass
class ScanTable:
    """In-memory scan and slice tables (small: no features)."""

    scan_id: np.ndarray           # (n_scans,) object
    patient_id: np.ndarray        # (n_scans,) object
    labels: np.ndarray            # (n_scans, n_classes) float32, NaN unknown
    offset: np.ndarray            # (n_scans,) int64
    n_slices: np.ndarray          # (n_scans,) int32
    z: np.ndarray                 # (n_total,) float64
    sop_uid: np.ndarray           # (n_total,) object
    path: np.ndarray              # (n_total,) object
    slice_labels: np.ndarray      # (n_total, n_classes) int8, -1 unknown

    def rows(self, index: int) -> slice:
        start = int(self.offset[index])
        return slice(start, start + int(self.n_slices[index]))


def _decode(values) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


def encode_attr(value):
    """Lists and dicts go into HDF5 attributes as JSON so they round-trip exactly."""
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else value


def decode_attr(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value


class FeatureCache:
    """Read access to a finished cache. Opens the HDF5 file lazily (safe to construct before a
    DataLoader forks; each worker opens its own handle) and checks schema and completeness."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            parts = Path(str(self.path) + ".parts")
            hint = (
                f" An unfinished extraction is in {parts}: run `drct extract` again to resume it."
                if parts.is_dir()
                else " Run `drct extract` to create it."
            )
            raise CacheError(f"feature cache not found: {self.path}.{hint}")
        self._file: h5py.File | None = None
        self._pid: int | None = None
        with h5py.File(self.path, "r") as handle:
            attrs = {key: decode_attr(value) for key, value in handle.attrs.items()}
            version = attrs.get("schema_version")
            if version != SCHEMA_VERSION:
                raise CacheError(
                    f"{self.path}: cache schema version {version!r}, this software reads {SCHEMA_VERSION}; "
                    "re-extract with this version or use the matching software"
                )
            if not attrs.get("complete"):
                raise CacheError(f"{self.path}: cache is not complete (no completion marker); re-run extraction")
        self.attrs = attrs
        self.label_names: list[str] = list(attrs.get("label_names", []))
        self.provenance: dict = {key: attrs.get(key) for key in PROVENANCE_KEYS}
        if "adaptation" in attrs:  # the `drct adapt` record of an adapted encoder (optional), a dict
            record = attrs["adaptation"]
            self.provenance["adaptation"] = json.loads(record) if isinstance(record, str) else record
        self.resolutions: list[int] = [int(r) for r in attrs["resolutions"]]
        self._table: ScanTable | None = None

    # -- handles ---------------------------------------------------------------------------
    @property
    def file(self) -> h5py.File:
        """The HDF5 handle of this process (reopened after a fork)."""
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        return state

    # -- tables ----------------------------------------------------------------------------
    @property
    def table(self) -> ScanTable:
        if self._table is None:
            f = self.file
            self._table = ScanTable(
                scan_id=_decode(f["scans/scan_id"][:]),
                patient_id=_decode(f["scans/patient_id"][:]),
                labels=f["scans/labels"][:].astype(np.float32),
                offset=f["scans/offset"][:].astype(np.int64),
                n_slices=f["scans/n_slices"][:].astype(np.int32),
                z=f["slices/z"][:],
                sop_uid=_decode(f["slices/sop_uid"][:]),
                path=_decode(f["slices/path"][:]),
                slice_labels=f["slices/labels"][:].astype(np.int8),
            )
        return self._table

    @property
    def scan_ids(self) -> list[str]:
        return list(self.table.scan_id)

    def __len__(self) -> int:
        return len(self.table.scan_id)

    def index_of(self, scan_id: str) -> int:
        if not hasattr(self, "_index"):
            self._index = {sid: i for i, sid in enumerate(self.table.scan_id)}
        try:
            return self._index[scan_id]
        except KeyError:
            raise CacheError(f"scan '{scan_id}' is not in {self.path}") from None

    def _check_resolution(self, resolution: int) -> str:
        if int(resolution) not in self.resolutions:
            raise CacheError(f"{self.path} has resolutions {self.resolutions}, not {resolution}")
        return f"features/{int(resolution)}"

    def features(self, scan: int | str, resolution: int) -> np.ndarray:
        """(n_slices, 512) float16 vectors of one scan at one resolution, in z order."""
        index = self.index_of(scan) if isinstance(scan, str) else int(scan)
        return self.file[self._check_resolution(resolution)][self.table.rows(index)]

    def load_all(self, resolution: int, dtype=np.float16) -> np.ndarray:
        """Every slice vector at one resolution, (n_total_slices, 512): for in-memory training."""
        return self.file[self._check_resolution(resolution)][:].astype(dtype, copy=False)


def write_cache(
    path: str | Path,
    *,
    scan_ids,
    patient_ids,
    scan_labels: np.ndarray,
    n_slices,
    z,
    sop_uids,
    paths,
    slice_labels: np.ndarray,
    features: dict[int, np.ndarray],
    attrs: dict,
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write a complete cache atomically: to `<path>.tmp`, `complete` set last, then renamed.

    `attrs` must contain every PROVENANCE_KEYS entry plus label_names; `features` maps each
    resolution to an (n_total_slices, 512) array. `extra` maps further dataset names to arrays
    (object arrays are stored as UTF-8 strings), e.g. the /rejects tables of stage one.
    """
    path = Path(path)
    missing = [key for key in (*PROVENANCE_KEYS, "label_names") if key not in attrs]
    if missing:
        raise CacheError(f"cannot write cache {path}: provenance attributes missing: {missing}")
    n_slices = np.asarray(n_slices, dtype=np.int32)
    offset = np.concatenate([[0], np.cumsum(n_slices)[:-1]]).astype(np.int64) if len(n_slices) else np.zeros(0, np.int64)
    total = int(n_slices.sum())
    n_classes = len(attrs["label_names"])
    for resolution, array in features.items():
        if array.shape != (total, FEATURE_DIM):
            raise CacheError(f"features at {resolution} have shape {array.shape}, expected ({total}, {FEATURE_DIM})")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION
        for key, value in attrs.items():
            f.attrs[key] = encode_attr(value)
        f.create_dataset("scans/scan_id", data=np.array(list(scan_ids), dtype=object), dtype=STR)
        f.create_dataset("scans/patient_id", data=np.array(list(patient_ids), dtype=object), dtype=STR)
        f.create_dataset("scans/labels", data=np.asarray(scan_labels, np.float32).reshape(len(n_slices), n_classes))
        f.create_dataset("scans/offset", data=offset)
        f.create_dataset("scans/n_slices", data=n_slices)
        f.create_dataset("slices/z", data=np.asarray(z, np.float64))
        f.create_dataset("slices/sop_uid", data=np.array(list(sop_uids), dtype=object), dtype=STR)
        f.create_dataset("slices/path", data=np.array(list(paths), dtype=object), dtype=STR)
        f.create_dataset("slices/labels", data=np.asarray(slice_labels, np.int8).reshape(total, n_classes))
        for resolution, array in features.items():
            chunk_rows = max(1, min(total, 4096))
            f.create_dataset(
                f"features/{int(resolution)}",
                data=np.asarray(array, np.float16),
                chunks=(chunk_rows, FEATURE_DIM) if total else None,
            )
        for name, array in (extra or {}).items():
            array = np.asarray(array)
            f.create_dataset(name, data=array, dtype=STR if array.dtype == object else array.dtype)
        f.attrs["complete"] = True
        f.flush()
    _fsync_path(tmp)  # the bytes are on disk before the name points at them (crash safety)
    os.replace(tmp, path)
    _fsync_path(path.parent)
    return path


def _fsync_path(path: str | Path) -> None:
    """fsync a file or a directory (the latter makes a rename durable); a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
