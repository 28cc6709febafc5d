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
    /rejects/rejected_fingerprint, /rejects/from_index  optional: their input fingerprints; 1 for
                                                    rejects of the index (no labels, localizer ...)
    /scans/fingerprint  str (n_scans,)              optional: input fingerprint of each scan (resume)

A scan's slices are the contiguous rows offset..offset+n_slices of every /slices and /features
array, so one scan at one resolution is a single slice read (O(1) lookup through the scan table).

Integrity: every numeric dataset carries HDF5's Fletcher32 checksum per chunk, so h5py raises on
a flipped byte when the chunk is read (HDF5 filters cannot apply to variable-length strings, so
each string dataset carries a ``sha256`` attribute over its values instead). `FeatureCache`
turns a checksum failure, a truncated file and NaN/inf vectors into a `CacheError`; a cache
written before checksums existed still opens (`cache verify` notes that it has none).
The writer produces the file under a temporary name and renames it into place, and `complete`
is set last: a file without it is never accepted.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import time
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
TABLES = ("scans/scan_id", "scans/patient_id", "scans/labels", "scans/offset", "scans/n_slices", "slices/z",
          "slices/sop_uid", "slices/path", "slices/labels")


class CacheError(RuntimeError):
    """A cache that cannot be used; the message says what is wrong and what to do."""


class DiskSpaceError(CacheError):
    """Not enough free space where a cache file is written (checked before writing, or ENOSPC)."""


MB = 1 << 20
IN_MEMORY_BYTES = 256 * MB
WRITE_PAUSE_ENV = "DRCT_WRITE_PAUSE"  # seconds to sleep before each rename: lets bench/soak.py kill mid-write  # files up to this size (every commit unit) are built in memory, then written


def free_bytes(directory: str | Path) -> int:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return -1


def check_free_space(directory: str | Path, needed: int, what: str) -> None:
    """`DiskSpaceError` before a write that cannot fit: writing HDF5 into a full disk ends in an
    h5py error cascade (and, seen in practice, a segfault), so a write is never started that way."""
    free = free_bytes(directory)
    if 0 <= free < needed:
        raise DiskSpaceError(
            f"no space left on the device of {directory}: {what} needs about {needed / MB:.1f} MB, "
            f"{free / MB:.1f} MB are free"
        )


def storage_error(exc: BaseException, path: Path, needed: int) -> CacheError:
    """A failed write as one clear CacheError: full disk, unwritable folder, or other I/O error."""
    text = str(exc)
    first = (text.strip().splitlines() or [type(exc).__name__])[0][:200]
    errno_ = getattr(exc, "errno", None)
    if errno_ in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "Disk quota" in text:
        return DiskSpaceError(
            f"no space left on the device of {path.parent} while writing {path.name}: it needs about "
            f"{needed / MB:.1f} MB, {max(0, free_bytes(path.parent)) / MB:.1f} MB are free"
        )
    if errno_ in (errno.EACCES, errno.EPERM, errno.EROFS) or "Permission denied" in text or "Read-only" in text:
        return CacheError(f"cannot write {path}: the folder is not writable ({first})")
    return CacheError(f"cannot write {path} ({first}); check --out and its folder")


def remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


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


def table_problems(tables: dict, n_classes: int) -> list[str]:
    """What is wrong with a cache's scan and slice tables, as messages (empty: nothing).

    `tables` maps dataset names (``scans/scan_id``, ``scans/labels``, ``scans/offset``,
    ``scans/n_slices``, ``scans/patient_id``, ``slices/z``, ``slices/sop_uid``, ``slices/path``,
    ``slices/labels``) to their values. Checked: one row per scan in every /scans table and one per
    slice in every /slices table, label matrices of n_classes columns, scan labels in {0, 1, NaN},
    slice labels in {-1, 0, 1}, every scan with slices, contiguous offsets, unique scan ids.
    `drct cache verify` (cache/verify.py) and every reader of a cache (`FeatureCache.table`: train,
    export, cache info, interpret, report, predict) call this one function, so a tampered table is
    refused everywhere with the same message."""
    problems: list[str] = []
    n_scans = len(tables["scans/scan_id"])
    for name in ("scans/patient_id", "scans/labels", "scans/offset", "scans/n_slices"):
        if name in tables and np.shape(tables[name])[:1] != (n_scans,):
            problems.append(f"/{name} has {np.shape(tables[name])[0] if np.ndim(tables[name]) else 0} rows, "
                            f"/scans/scan_id has {n_scans}")
    labels = np.asarray(tables["scans/labels"])
    if labels.shape != (n_scans, n_classes):
        problems.append(f"/scans/labels has shape {labels.shape}, expected ({n_scans}, {n_classes})")
    elif labels.size:
        values = labels.astype(np.float64, copy=False)
        bad = ~(np.isnan(values) | (values == 0) | (values == 1))
        if bad.any():
            scan, column = (int(v) for v in np.argwhere(bad)[0])
            problems.append(f"/scans/labels holds {int(bad.sum())} values that are not 0, 1 or NaN (first: "
                            f"{values[scan, column]:g} for scan row {scan}, class {column})")
    if problems:
        return problems  # the checks below index by scan: meaningless on misshapen tables
    offset = np.asarray(tables["scans/offset"]).astype(np.int64)
    n_slices = np.asarray(tables["scans/n_slices"]).astype(np.int64)
    total = int(n_slices.sum())
    if (n_slices < 1).any():
        problems.append(f"{int((n_slices < 1).sum())} scans have no slices")
    expected = np.concatenate([[0], np.cumsum(n_slices)[:-1]]) if n_scans else np.zeros(0, np.int64)
    if not np.array_equal(offset, expected):
        bad = int(np.flatnonzero(offset != expected)[0])
        problems.append(f"scan offsets are not contiguous: scan {bad} starts at {offset[bad]}, expected {expected[bad]}")
    scan_ids = [str(v) for v in tables["scans/scan_id"]]
    if len(set(scan_ids)) != len(scan_ids):
        dupes = sorted({s for s in scan_ids if scan_ids.count(s) > 1})
        problems.append(f"duplicated scan ids: {', '.join(dupes[:5])}")
    for name in ("slices/z", "slices/sop_uid", "slices/path", "slices/labels"):
        if name in tables and np.shape(tables[name])[:1] != (total,):
            problems.append(f"/{name} has {np.shape(tables[name])[0] if np.ndim(tables[name]) else 0} rows, "
                            f"the scan table counts {total} slices")
    slice_labels = np.asarray(tables["slices/labels"])
    if slice_labels.ndim != 2 or slice_labels.shape[1] != n_classes:
        problems.append(f"/slices/labels has shape {slice_labels.shape}, expected ({total}, {n_classes})")
    elif slice_labels.size and not np.isin(slice_labels, (-1, 0, 1)).all():
        problems.append(f"/slices/labels holds {int((~np.isin(slice_labels, (-1, 0, 1))).sum())} values that are "
                        "not -1 (unknown), 0 or 1")
    return problems


def strings_digest(values) -> str:
    """sha256 of a string dataset's values (length-prefixed UTF-8), the checksum of /.../str arrays."""
    digest = hashlib.sha256()
    for value in values:
        data = value if isinstance(value, bytes) else str(value).encode("utf-8", errors="surrogateescape")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def storable(value) -> str:
    """A str h5py can store as UTF-8: NULs removed, undecodable surrogates (odd file names) replaced."""
    text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
    if "\x00" in text:
        text = text.replace("\x00", "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", errors="replace").decode("utf-8")
    return text


def create_checked(f: h5py.File | h5py.Group, name: str, data, **kwargs) -> h5py.Dataset:
    """Create a dataset with its checksum: Fletcher32 per chunk for numbers, a sha256 attribute for strings."""
    array = np.asarray(data)
    if array.dtype == object or array.dtype.kind in "US":
        values = [storable(v) for v in array.reshape(-1)]
        dataset = f.create_dataset(name, data=np.array(values, dtype=object).reshape(array.shape), dtype=STR)
        dataset.attrs["sha256"] = strings_digest(values)
        return dataset
    return f.create_dataset(name, data=array, fletcher32=True, **kwargs)


def read_checked(dataset: h5py.Dataset, where: str = ""):
    """All values of a dataset, its checksum verified; `CacheError` naming the dataset on a mismatch."""
    try:
        values = dataset[()]
    except OSError as exc:
        raise CacheError(_corrupt_message(where, dataset.name, exc)) from None
    expected = dataset.attrs.get("sha256")
    if expected is not None:
        expected = expected.decode() if isinstance(expected, bytes) else str(expected)
        if strings_digest(np.asarray(values).reshape(-1)) != expected:
            raise CacheError(_corrupt_message(where, dataset.name, "sha256 of the strings does not match"))
    return values


def _corrupt_message(where, name: str, detail) -> str:
    detail = (str(detail).strip().splitlines() or [""])[0]
    return (
        f"{where}: dataset {name} is corrupt (checksum mismatch: {detail}). The file was damaged after it "
        "was written; run `drct cache verify` on it, and re-extract (remove the file first)"
    )


def open_h5(path: str | Path) -> h5py.File:
    """Open an HDF5 file read-only; a truncated or damaged file is a `CacheError` with one clear line."""
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise CacheError(
            f"{path} is not a readable feature cache (truncated or damaged HDF5 file: {detail}); "
            "remove it and run `drct extract` again"
        ) from None


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
        with open_h5(self.path) as handle:
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
            self._file = open_h5(self.path)
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

            def read(name: str):
                try:
                    return read_checked(f[name], str(self.path))
                except KeyError:
                    raise CacheError(f"{self.path}: dataset /{name} is missing; the cache is damaged") from None

            tables = {name: read(name) for name in TABLES}
            for name in ("scans/scan_id", "scans/patient_id", "slices/sop_uid", "slices/path"):
                tables[name] = _decode(tables[name]) if np.ndim(tables[name]) == 1 else tables[name]
            problems = table_problems(tables, len(self.label_names))
            if problems:
                more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
                raise CacheError(f"{self.path}: {problems[0]}{more}; the cache is damaged or was edited: run "
                                 "`drct cache verify` on it, and re-extract")
            self._table = ScanTable(
                scan_id=tables["scans/scan_id"],
                patient_id=tables["scans/patient_id"],
                labels=tables["scans/labels"].astype(np.float32),
                offset=tables["scans/offset"].astype(np.int64),
                n_slices=tables["scans/n_slices"].astype(np.int32),
                z=tables["slices/z"],
                sop_uid=tables["slices/sop_uid"],
                path=tables["slices/path"],
                slice_labels=tables["slices/labels"].astype(np.int8),
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
        """(n_slices, 512) float16 vectors of one scan at one resolution, in z order (checked:
        checksums and finite values)."""
        index = self.index_of(scan) if isinstance(scan, str) else int(scan)
        name = self._check_resolution(resolution)
        return self.checked_rows(name, self.table.rows(index))

    def load_all(self, resolution: int, dtype=np.float16) -> np.ndarray:
        """Every slice vector at one resolution, (n_total_slices, 512): for in-memory training."""
        return self.checked_rows(self._check_resolution(resolution), slice(None)).astype(dtype, copy=False)

    def checked_rows(self, name: str, rows) -> np.ndarray:
        """Rows of a feature array; a checksum mismatch or a NaN/inf value is a `CacheError`."""
        try:
            values = self.file[name][rows]
        except OSError as exc:
            raise CacheError(_corrupt_message(self.path, "/" + name, exc)) from None
        check_finite(values, f"{self.path}: /{name}")
        return values


def check_finite(values: np.ndarray, where: str) -> None:
    """`CacheError` when feature vectors hold NaN or inf (they would train to a NaN loss)."""
    finite = np.isfinite(values).all(axis=-1) if values.size else np.ones(0, bool)
    if not finite.all():
        raise CacheError(
            f"{where}: {int((~finite).sum())} slice vectors contain NaN or inf; the cache is unusable "
            "(run `drct cache verify`, fix or reject the inputs and re-extract)"
        )


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
    fingerprints=None,
) -> Path:
    """Write a complete cache atomically: to `<path>.tmp`, `complete` set last, then renamed.

    `attrs` must contain every PROVENANCE_KEYS entry plus label_names; `features` maps each
    resolution to an (n_total_slices, 512) array. `extra` maps further dataset names to arrays
    (object arrays are stored as UTF-8 strings), e.g. the /rejects tables of stage one.
    `fingerprints`: optional per-scan input fingerprints (/scans/fingerprint, see cache/writer.py).
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
    tmp = path.with_name(path.name + ".tmp")
    arrays = [np.asarray(a) for a in (scan_labels, z, slice_labels, *features.values())]
    chunked = sum(-(-total // max(1, min(total, 4096))) * max(1, min(total, 4096)) * FEATURE_DIM * 2 for _ in features)
    strings = sum(len(str(v)) + 16 for values in (scan_ids, patient_ids, sop_uids, paths) for v in values)
    needed = int(1.05 * (sum(a.nbytes for a in arrays[:3]) + chunked + strings)) + 64 * 1024
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        check_free_space(path.parent, needed, f"writing {path.name}")
        args = (attrs, scan_ids, patient_ids, scan_labels, n_slices, offset, fingerprints, z, sop_uids, paths,
                slice_labels, features, extra, total, n_classes)
        if needed <= IN_MEMORY_BYTES:
            # Built in memory, then written with plain file I/O: if the disk fills after the check
            # (another writer), that is an OSError here, never h5py failing mid-file (which can segfault).
            buffer = io.BytesIO()
            with h5py.File(buffer, "w") as f:
                _fill(f, *args)
            with open(tmp, "wb") as handle:
                handle.write(buffer.getbuffer())
        else:
            with h5py.File(tmp, "w") as f:
                _fill(f, *args)
        _fsync_path(tmp)  # the bytes are on disk before the name points at them (crash safety)
        if WRITE_PAUSE_ENV in os.environ:  # bench/soak.py: widen the window in which a kill leaves a .tmp
            time.sleep(float(os.environ[WRITE_PAUSE_ENV] or 0))
        os.replace(tmp, path)
    except DiskSpaceError:
        remove_quietly(tmp)
        raise
    except (OSError, RuntimeError) as exc:  # h5py reports some I/O failures as RuntimeError
        remove_quietly(tmp)
        raise storage_error(exc, path, needed) from None
    _fsync_path(path.parent)
    return path


def _fill(f, attrs, scan_ids, patient_ids, scan_labels, n_slices, offset, fingerprints, z, sop_uids, paths,
          slice_labels, features, extra, total, n_classes) -> None:
    """The datasets and attributes of `write_cache`, `complete` last."""
    f.attrs["schema_version"] = SCHEMA_VERSION
    for key, value in attrs.items():
        f.attrs[key] = encode_attr(value)
    create_checked(f, "scans/scan_id", np.array(list(scan_ids), dtype=object))
    create_checked(f, "scans/patient_id", np.array(list(patient_ids), dtype=object))
    create_checked(f, "scans/labels", np.asarray(scan_labels, np.float32).reshape(len(n_slices), n_classes))
    create_checked(f, "scans/offset", offset)
    create_checked(f, "scans/n_slices", n_slices)
    if fingerprints is not None:
        create_checked(f, "scans/fingerprint", np.array(list(fingerprints), dtype=object))
    create_checked(f, "slices/z", np.asarray(z, np.float64))
    create_checked(f, "slices/sop_uid", np.array(list(sop_uids), dtype=object))
    create_checked(f, "slices/path", np.array(list(paths), dtype=object))
    create_checked(f, "slices/labels", np.asarray(slice_labels, np.int8).reshape(total, n_classes))
    for resolution, array in features.items():
        chunk_rows = max(1, min(total, 4096))
        create_checked(
            f,
            f"features/{int(resolution)}",
            np.asarray(array, np.float16),
            chunks=(chunk_rows, FEATURE_DIM) if total else None,
        )
    for name, array in (extra or {}).items():
        create_checked(f, name, array)
    f.attrs["complete"] = True
    f.flush()


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
