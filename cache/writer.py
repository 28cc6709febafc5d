"""The crash-safe writer of stage one: commit units in a parts folder, merged once at the end.

HDF5 files are easily corrupted by a writer that dies mid-write, so the cache at OUT is never
written incrementally. Instead:

1. **One writer.** ``fcntl.flock`` on ``OUT.lock`` (released by the kernel when the process dies,
   even by SIGKILL); a second `drct extract` on the same OUT stops with a clear message.
2. **Manifest.** ``OUT.parts/manifest.json`` records the provenance (encoder, weights and their
   digest, resolutions, windows, aps source, preprocessing version), precision, label names,
   layout and data root. A resume whose config differs in any of these is refused, naming the
   field: parts of another encoder are never mixed into a cache.
3. **Commit units.** Every ``extract.scans_per_commit`` scans become one part file
   ``OUT.parts/unit-<first scan index>.h5``, itself a small cache in the `cache.store` format
   (written by `write_cache`: temporary name, fsync, `complete` attribute last, ``os.replace``,
   directory fsync). A part therefore exists whole or not at all; a run killed at any moment
   loses at most the unit in progress. Slice and scan rejects of the unit travel in the part
   (the optional ``/rejects`` datasets of the format) so a resumed run reports them too.
4. **Resume.** Leftover ``*.tmp`` files are deleted; scans found in parts are skipped, unless
   their inputs changed: each scan records a fingerprint of its input files (relative path, size
   and mtime of every slice, `input_fingerprint`), and a scan whose files were edited, added or
   removed since is extracted again. Its new part supersedes the old rows: every part carries a
   ``commit_seq`` attribute and, in the merge, the latest source holding a scan owns it (its
   vectors and its rejects), the previous finished cache being the oldest source.
5. **Merge.** When every scan is done, parts are merged in scan-index order into OUT with
   `write_cache` (atomic), the rejects CSV is replaced atomically *before* OUT appears, and the
   parts folder is removed last. A crash between the two leaves a complete OUT plus stale parts,
   which the next run recognises (OUT's scans count as done) and merges again; since each scan's
   rejects come from its owning source only, no reject row is doubled. Index-time rejects (no
   labels, localizers, unreadable files) go into OUT's ``/rejects`` too, flagged
   ``/rejects/from_index`` so that a later merge does not read them back as extraction rejects.

Determinism: units are fixed runs of consecutive scans of the index, each encoded in batches that
never cross a unit, and the merge follows index order; so a killed-and-resumed run gives the same
arrays, byte for byte, as an uninterrupted one.

A finished OUT whose provenance matches also counts as done: a rerun on a grown dataset extracts
only the new scans and merges them with OUT's (OUT is read as one more source).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import h5py
import numpy as np

from cache.lock import OutputLock, WriterLocked, lock_path  # noqa: F401 - WriterLocked, lock_path: re-exported
from cache.provenance import provenance_differences
from cache.rejects import Reject, write_rejects
from cache.store import (
    FEATURE_DIM,
    MB,
    CacheError,
    DiskSpaceError,
    _decode,
    _fsync_path,
    decode_attr,
    remove_quietly,
    storage_error,
    write_cache,
)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "drct-extract-parts"
PART_PREFIX = "unit-"
# Fields besides provenance_differences' CHECKED_FIELDS that must match for a resume.
RESUME_FIELDS = ("weights_digest", "precision", "label_names", "layout", "data_root", "ids", "id_key")
# Caches written before ids were pseudonymised kept them verbatim.
RESUME_DEFAULTS = {"ids": "kept", "id_key": ""}


class ResumeRefused(CacheError):
    """The parts (or finished cache) at OUT were made with a different config."""


def parts_dir(out: str | Path) -> Path:
    return Path(str(out) + ".parts")


def rejects_path(out: str | Path) -> Path:
    """``features.h5`` -> ``features.rejects.csv``; any other suffix keeps it (``c.hdf5`` ->
    ``c.hdf5.rejects.csv``), so caches side by side never share a rejects file."""
    out = Path(out)
    return out.with_name((out.stem if out.suffix == ".h5" else out.name) + ".rejects.csv")


def input_fingerprint(paths: Sequence[str], root: str | Path) -> str:
    """What identifies a scan's input files: sha256 over (path relative to root, size, mtime) of
    each, in order. Editing, adding or removing a file changes it; a missing file counts too."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            stat = os.stat(path)
            state = f"{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            state = "missing"
        digest.update(f"{_relative(str(path), str(root))}\0{state}\n".encode("utf-8", errors="surrogateescape"))
    return digest.hexdigest()[:32]


@dataclass
class ScanFeatures:
    """One extracted scan: its kept slices (decodable, z order) and their vectors per resolution."""

    scan_id: str
    patient_id: str
    labels: list[float] | None
    z: list[float]
    sop_uids: list[str]
    paths: list[str]
    slice_labels: list[list[int] | None]
    features: dict[int, np.ndarray]          # resolution -> (n_kept, 512) float16
    fingerprint: str = ""                    # input_fingerprint of the scan's files ("" = not recorded)


@dataclass
class Unit:
    """A commit unit: the scans extracted and the rejects met on the way."""

    first_index: int
    scans: list[ScanFeatures] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    rejected_scan_ids: list[str] = field(default_factory=list)
    rejected_fingerprints: list[str] = field(default_factory=list)  # aligned with rejected_scan_ids


def _differences(have: dict, want: dict) -> list[str]:
    differences = provenance_differences(have.get("provenance", {}), want["provenance"])
    for key in RESUME_FIELDS:
        a = have.get("provenance", {}).get(key, have.get(key, RESUME_DEFAULTS.get(key)))
        b = want["provenance"].get(key, want.get(key, RESUME_DEFAULTS.get(key)))
        if a != b:
            differences.append(f"{key}: existing has {a!r}, this run has {b!r}")
    return differences


def _relative(path: str, root: str) -> str:
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError):  # a symlink loop (it is a reject for that reason)
        resolved = Path(os.path.abspath(path))
    try:
        return str(resolved.relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


class PartsWriter:
    """Writes commit units for OUT and merges them at the end. Use as a context manager (holds the lock).

    `manifest` = {"provenance": {... PROVENANCE_KEYS ..., "precision": ...}, "label_names", "layout",
    "data_root", "n_scans"}.
    """

    def __init__(self, out: str | Path, manifest: dict):
        self.out = Path(out)
        self.parts = parts_dir(self.out)
        self.manifest = {"format": MANIFEST_FORMAT, "version": 1, **manifest}
        self._lock = OutputLock(self.out, "drct extract")
        self.done: set[str] = set()
        self.job_bytes = 0   # estimate of the space the whole extraction needs (set by the caller)
        self.fingerprints: dict[str, str] = {}   # scan id -> recorded input fingerprint (latest source)
        self.previous_cache: Path | None = None
        self.previous_scans: set[str] = set()
        self._seq = 0

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        self._lock.acquire()
        try:
            for stale in (self.out.with_name(self.out.name + ".tmp"), rejects_path(self.out).with_suffix(".csv.tmp")):
                stale.unlink(missing_ok=True)
            self._check_previous_cache()
            self._open_parts()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._lock.release()

    def _check_previous_cache(self) -> None:
        if not self.out.exists():
            return
        try:
            with h5py.File(self.out, "r") as f:
                attrs = {key: decode_attr(value) for key, value in f.attrs.items()}
                scan_ids = list(_decode(f["scans/scan_id"][:]))
                rejected_ids = read_rejects_tables(f)[1]
                recorded = _recorded_fingerprints(f)
        except (OSError, KeyError) as exc:
            raise CacheError(f"{self.out} exists but is not a readable feature cache ({exc}); remove it") from None
        if not attrs.get("complete"):
            raise CacheError(f"{self.out} exists but is not complete; remove it and run drct extract again")
        have = {"provenance": {**attrs}, **attrs}
        differences = _differences(have, self.manifest)
        if differences:
            raise ResumeRefused(
                f"{self.out} was made with a different configuration ({'; '.join(differences)}). "
                "Remove it or choose another --out; a cache never mixes encoders or settings."
            )
        self.previous_cache = self.out
        self.previous_scans = set(scan_ids) | set(rejected_ids)
        self.done.update(scan_ids)
        self.done.update(rejected_ids)
        self.fingerprints.update(recorded)

    def _open_parts(self) -> None:
        manifest_file = self.parts / MANIFEST
        if self.parts.is_dir() and manifest_file.is_file():
            try:
                have = json.loads(manifest_file.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise CacheError(f"{manifest_file} is unreadable ({exc}); remove {self.parts} to start over") from None
            differences = _differences(have, self.manifest)
            if differences:
                raise ResumeRefused(
                    f"cannot resume the unfinished extraction in {self.parts}: it was made with a different "
                    f"configuration ({'; '.join(differences)}). Run with the original settings to finish it, "
                    f"or remove {self.parts} to start over."
                )
        else:
            try:
                self.parts.mkdir(parents=True, exist_ok=True)
                _atomic_write_text(manifest_file, json.dumps(self.manifest, indent=1, sort_keys=True))
            except OSError as exc:
                remove_quietly(manifest_file.with_name(manifest_file.name + ".tmp"))
                raise storage_error(exc, manifest_file, 0) from None
        for tmp in self.parts.glob("*.tmp"):
            tmp.unlink()
        for part in self.part_files():
            try:
                with h5py.File(part, "r") as f:
                    self.done.update(_decode(f["scans/scan_id"][:]))
                    self.done.update(read_rejects_tables(f)[1])
                    self.fingerprints.update(_recorded_fingerprints(f))
                    self._seq = max(self._seq, int(f.attrs.get("commit_seq", 0)))
            except (OSError, KeyError) as exc:
                raise CacheError(
                    f"{part} is not a readable part ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                    f"remove it and run drct extract again: its scans are extracted anew"
                ) from None

    def part_files(self) -> list[Path]:
        """Committed parts, oldest commit first (`commit_seq`; parts of older versions count as 0)."""
        parts = sorted(self.parts.glob(f"{PART_PREFIX}*.h5"))
        return sorted(parts, key=_commit_seq)

    def needs(self, scan_id: str, fingerprint: str) -> bool:
        """True when a scan is to be extracted: never done, or done from inputs that changed since.
        A scan recorded without a fingerprint (older caches) counts as done."""
        if scan_id not in self.done:
            return True
        recorded = self.fingerprints.get(scan_id, "")
        return bool(recorded and fingerprint and recorded != fingerprint)

    def up_to_date(self, scan_order: Sequence[str]) -> bool:
        """OUT holds exactly the scans of `scan_order` (a scan whose files were all removed must
        leave the cache too) and nothing is left in parts."""
        return self.previous_cache is not None and not self.part_files() and self.previous_scans == set(scan_order)

    # -- commit ------------------------------------------------------------------------------
    def _attrs(self, extra: dict) -> dict:
        m = self.manifest
        return {
            **m["provenance"],
            "label_names": list(m["label_names"]),
            "layout": m["layout"],
            "data_root": m["data_root"],
            "ids": m.get("ids", "kept"),
            "id_key": m.get("id_key", ""),
            **extra,
        }

    def commit(self, unit: Unit) -> Path:
        """Write one unit as a part (all or nothing)."""
        resolutions = [int(r) for r in self.manifest["provenance"]["resolutions"]]
        n_classes = len(self.manifest["label_names"])
        tables = _stack_scans(unit.scans, resolutions, n_classes, self.manifest["data_root"])
        self._seq += 1
        part = self.parts / f"{PART_PREFIX}{unit.first_index:08d}.h5"
        if part.exists():  # a re-extraction of changed scans: never overwrite the part it supersedes
            part = self.parts / f"{PART_PREFIX}{unit.first_index:08d}-{self._seq:06d}.h5"
        try:
            write_cache(
                part,
                **tables,
                attrs=self._attrs({"commit_seq": self._seq}),
                extra=rejects_tables(unit.rejects, unit.rejected_scan_ids, unit.rejected_fingerprints,
                                     data_root=self.manifest["data_root"]),
            )
        except DiskSpaceError as exc:
            raise self._space_error(exc) from None
        self.done.update(s.scan_id for s in unit.scans)
        self.done.update(unit.rejected_scan_ids)
        self.fingerprints.update({s.scan_id: s.fingerprint for s in unit.scans})
        self.fingerprints.update(zip(unit.rejected_scan_ids, unit.rejected_fingerprints))
        return part

    # -- merge -------------------------------------------------------------------------------
    def finish(self, scan_order: Sequence[str], index_rejects: Iterable[Reject]) -> tuple[Path, Path, int]:
        """Merge every source in `scan_order` into OUT; returns (OUT, rejects CSV, number of rejects)."""
        sources = ([self.previous_cache] if self.previous_cache else []) + self.part_files()
        merged = _merge_sources(sources, scan_order, [int(r) for r in self.manifest["provenance"]["resolutions"]],
                                self.manifest["data_root"])
        extraction_rejects = merged.pop("rejects")
        index_rejects = list(index_rejects)
        rejects = index_rejects + extraction_rejects
        rejected_scan_ids = merged.pop("rejected_scan_ids")
        rejected_fingerprints = merged.pop("rejected_fingerprints")
        csv_path = rejects_path(self.out)
        tmp_csv = csv_path.with_suffix(".csv.tmp")
        try:
            write_rejects(rejects, tmp_csv)
            _fsync_path(tmp_csv)
            os.replace(tmp_csv, csv_path)
        except OSError as exc:
            remove_quietly(tmp_csv)
            error = storage_error(exc, csv_path, 0)
            raise (self._space_error(error) if isinstance(error, DiskSpaceError) else error) from None
        try:
            write_cache(
                self.out,
                **merged,
                attrs=self._attrs({}),
                extra={
                    **rejects_tables(index_rejects + extraction_rejects, rejected_scan_ids, rejected_fingerprints,
                                     data_root=self.manifest["data_root"]),
                    "rejects/from_index": np.array([1] * len(index_rejects) + [0] * len(extraction_rejects), np.int8),
                },
            )
        except DiskSpaceError as exc:
            raise self._space_error(exc, merging=True) from None
        shutil.rmtree(self.parts, ignore_errors=True)
        return self.out, csv_path, len(rejects)

    def _space_error(self, exc: DiskSpaceError, merging: bool = False) -> DiskSpaceError:
        """A full disk, with what the whole extraction needs and how to go on (nothing committed is lost)."""
        job = f"; the whole extraction needs about {self.job_bytes / MB:.0f} MB there" if self.job_bytes else ""
        step = "in the final merge, which writes the cache beside the parts" if merging else "while committing scans"
        return DiskSpaceError(
            f"{exc}, {step}{job}. Free space (or give another --out) and run the same command again: "
            f"the {len(self.done)} scans committed so far are kept"
        )

    def discard_parts(self) -> None:
        """Remove a parts folder whose content is already in OUT (a crash after the merge)."""
        shutil.rmtree(self.parts, ignore_errors=True)


def rejects_tables(
    rejects: Sequence[Reject],
    rejected_scan_ids: Sequence[str],
    rejected_fingerprints: Sequence[str] | None = None,
    data_root: str | None = None,
) -> dict[str, np.ndarray]:
    """The optional /rejects datasets of a cache or part (datasets, not attributes: no 64 KiB limit).
    Paths are stored relative to `data_root` where they lie under it (a cache is shareable; the
    rejects CSV beside it keeps absolute paths for the operator)."""
    strings = lambda values: np.array(list(values), dtype=object)
    where = (lambda p: _relative(p, data_root) if p else p) if data_root else (lambda p: p)
    fingerprints = list(rejected_fingerprints or [])
    fingerprints += [""] * (len(rejected_scan_ids) - len(fingerprints))
    return {
        "rejects/scan_id": strings(r.scan_id for r in rejects),
        "rejects/path": strings(where(r.path) for r in rejects),
        "rejects/reason": strings(r.reason for r in rejects),
        "rejects/rejected_scan_id": strings(rejected_scan_ids),
        "rejects/rejected_fingerprint": strings(fingerprints),
    }


def read_rejects_tables(
    f: h5py.File, *, with_index: bool = True, data_root: str | None = None
) -> tuple[list[Reject], list[str]]:
    """(rejects, scan ids rejected whole) of an open cache or part; empty where absent.
    ``with_index=False`` leaves out the index-time rejects a finished cache also stores;
    `data_root` turns the stored relative paths back into absolute ones."""
    if "rejects" not in f:
        return [], []
    g = f["rejects"]
    from_index = g["from_index"][:] if "from_index" in g else np.zeros(len(g["scan_id"]), np.int8)
    absolute = (lambda p: str(Path(data_root) / p) if p and not os.path.isabs(p) else p) if data_root else (lambda p: p)
    rejects = [
        Reject(path=absolute(p), reason=r, scan_id=s)
        for s, p, r, i in zip(_decode(g["scan_id"][:]), _decode(g["path"][:]), _decode(g["reason"][:]), from_index)
        if with_index or not i
    ]
    return rejects, list(_decode(g["rejected_scan_id"][:]))


def _recorded_fingerprints(f: h5py.File) -> dict[str, str]:
    """{scan id: input fingerprint} of the scans (extracted or rejected whole) of a cache or part."""
    found: dict[str, str] = {}
    if "scans/fingerprint" in f:
        found.update(zip(_decode(f["scans/scan_id"][:]), _decode(f["scans/fingerprint"][:])))
    if "rejects/rejected_fingerprint" in f:
        found.update(zip(_decode(f["rejects/rejected_scan_id"][:]), _decode(f["rejects/rejected_fingerprint"][:])))
    return found


def _commit_seq(part: Path) -> tuple[int, str]:
    try:
        with h5py.File(part, "r") as f:
            return int(f.attrs.get("commit_seq", 0)), part.name
    except OSError:
        return 0, part.name


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync_path(tmp)
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _stack_scans(scans: list[ScanFeatures], resolutions: list[int], n_classes: int, data_root: str) -> dict:
    """ScanFeatures -> the keyword arguments of `write_cache`."""
    nan_row = [float("nan")] * n_classes
    unknown = [-1] * n_classes
    slice_labels = [lab if lab is not None else unknown for s in scans for lab in s.slice_labels]
    return dict(  # noqa: C408 - keyword form mirrors write_cache
        scan_ids=[s.scan_id for s in scans],
        patient_ids=[s.patient_id for s in scans],
        fingerprints=[s.fingerprint for s in scans],
        scan_labels=np.array([s.labels if s.labels is not None else nan_row for s in scans], np.float32).reshape(
            len(scans), n_classes
        ),
        n_slices=[len(s.z) for s in scans],
        z=np.array([z for s in scans for z in s.z], np.float64),
        sop_uids=[u for s in scans for u in s.sop_uids],
        paths=[_relative(p, data_root) for s in scans for p in s.paths],
        slice_labels=np.array(slice_labels, np.int8).reshape(len(slice_labels), n_classes),
        features={
            r: (
                np.concatenate([s.features[r] for s in scans]).astype(np.float16)
                if scans
                else np.zeros((0, FEATURE_DIM), np.float16)
            )
            for r in resolutions
        },
    )


def _merge_sources(
    sources: list[Path], scan_order: Sequence[str], resolutions: list[int], data_root: str | None = None
) -> dict:
    """Read scan rows from every source (previous cache, then parts in commit order) and lay them
    out in `scan_order`. The latest source that holds a scan (extracted or rejected whole) owns
    it: its rows, its rejects and its fingerprint; older copies (changed inputs, or a crash after
    the final rename) are ignored, so nothing is duplicated."""
    wanted = {sid: i for i, sid in enumerate(scan_order)}
    tables = []
    owner: dict[str, int] = {}
    for source_number, source in enumerate(sources):
        with h5py.File(source, "r") as f:
            t = {
                "scan_id": _decode(f["scans/scan_id"][:]),
                "patient_id": _decode(f["scans/patient_id"][:]),
                "labels": f["scans/labels"][:],
                "offset": f["scans/offset"][:],
                "n_slices": f["scans/n_slices"][:],
                "z": f["slices/z"][:],
                "sop_uid": _decode(f["slices/sop_uid"][:]),
                "path": _decode(f["slices/path"][:]),
                "slice_labels": f["slices/labels"][:],
                "features": {r: f[f"features/{r}"][:] for r in resolutions},
                "fingerprints": _recorded_fingerprints(f),
            }
            t["rejects"], t["rejected"] = read_rejects_tables(f, with_index=False, data_root=data_root)
        tables.append(t)
        for scan_id in (*t["scan_id"], *t["rejected"]):
            if scan_id in wanted:
                owner[scan_id] = source_number
    rejects: list[Reject] = []
    rejected: list[str] = []
    for source_number, t in enumerate(tables):
        rejects.extend(r for r in t["rejects"] if owner.get(r.scan_id) == source_number)
        rejected.extend(s for s in t["rejected"] if owner.get(s) == source_number)
    found: dict[str, tuple[int, int, int]] = {}  # scan id -> (source, row start, index in source)
    for source_number, t in enumerate(tables):
        for i, scan_id in enumerate(t["scan_id"]):
            if owner.get(scan_id) == source_number:
                found[scan_id] = (source_number, int(t["offset"][i]), i)
    order = [sid for sid in scan_order if sid in found]
    pieces: dict[str, list] = {k: [] for k in ("z", "sop_uid", "path", "slice_labels")}
    feats: dict[int, list] = {r: [] for r in resolutions}
    scan_ids, patient_ids, labels, n_slices, fingerprints = [], [], [], [], []
    for scan_id in order:
        source_number, start, i = found[scan_id]
        t = tables[source_number]
        n = int(t["n_slices"][i])
        rows = slice(start, start + n)
        scan_ids.append(scan_id)
        patient_ids.append(t["patient_id"][i])
        labels.append(t["labels"][i])
        n_slices.append(n)
        fingerprints.append(t["fingerprints"].get(scan_id, ""))
        pieces["z"].append(t["z"][rows])
        pieces["sop_uid"].extend(t["sop_uid"][rows])
        pieces["path"].extend(t["path"][rows])
        pieces["slice_labels"].append(t["slice_labels"][rows])
        for r in resolutions:
            feats[r].append(t["features"][r][rows])
    n_classes = tables[0]["labels"].shape[1] if tables else 0
    # Rejects in scan-index order, so a resumed run writes the same CSV as an uninterrupted one.
    rejects.sort(key=lambda r: (wanted[r.scan_id], r.path))
    rejected = sorted(set(rejected), key=lambda s: wanted[s])
    return dict(  # noqa: C408 - keyword form mirrors write_cache
        scan_ids=scan_ids,
        patient_ids=patient_ids,
        fingerprints=fingerprints,
        scan_labels=np.array(labels, np.float32).reshape(len(order), n_classes),
        n_slices=n_slices,
        z=np.concatenate(pieces["z"]) if order else np.zeros(0),
        sop_uids=pieces["sop_uid"],
        paths=pieces["path"],
        slice_labels=(np.concatenate(pieces["slice_labels"]) if order else np.zeros((0, n_classes), np.int8)),
        features={
            r: (np.concatenate(feats[r]) if order else np.zeros((0, FEATURE_DIM), np.float16)) for r in resolutions
        },
        rejects=rejects,
        rejected_scan_ids=rejected,
        rejected_fingerprints=[tables[owner[s]]["fingerprints"].get(s, "") for s in rejected],
    )
