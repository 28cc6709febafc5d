"""Checks of a feature cache (finished file) or of an unfinished extraction (OUT.parts folder),
and the human summary behind `drct cache info`.

`verify_cache` goes further than `FeatureCache`'s open-time check: structure and dtypes of every
table, contiguous offsets, consistent counts, unique scan ids, the provenance attributes, and
every feature value finite (read in chunks, so an RSNA-size cache verifies in bounded memory),
and every checksum: each dataset is read whole, so HDF5's Fletcher32 filter checks every chunk,
and string datasets are compared with their stored sha256 (see cache/store.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from cache.store import (
    FEATURE_DIM,
    PROVENANCE_KEYS,
    SCHEMA_VERSION,
    TABLES,
    _decode,
    decode_attr,
    strings_digest,
    table_problems,
)
from cache.writer import MANIFEST, PART_PREFIX, _commit_seq, parts_dir, read_rejects_tables

CHUNK_ROWS = 65536

SCAN_TABLES = {"scans/scan_id": "str", "scans/patient_id": "str", "scans/labels": "f", "scans/offset": "i",
               "scans/n_slices": "i"}
SLICE_TABLES = {"slices/z": "f", "slices/sop_uid": "str", "slices/path": "str", "slices/labels": "i"}


@dataclass
class Report:
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.ok = False
        self.problems.append(message)


def _kind(dataset: h5py.Dataset) -> str:
    if h5py.check_string_dtype(dataset.dtype) is not None or dataset.dtype.kind in "OSU":
        return "str"
    return dataset.dtype.kind  # f, i, u ...


def _check_checksums(f: h5py.File, report: Report) -> None:
    """Read every dataset except the feature arrays (checked chunk by chunk by the caller):
    Fletcher32 mismatches and string digests that differ become problems."""
    unchecked = []

    def visit(name: str, obj) -> None:
        if not isinstance(obj, h5py.Dataset) or name.startswith("features/"):
            return
        try:
            values = obj[()]
        except OSError as exc:
            report.fail(f"/{name}: checksum mismatch, the data was damaged ({str(exc).splitlines()[0]})")
            return
        expected = obj.attrs.get("sha256")
        if expected is not None:
            expected = expected.decode() if isinstance(expected, bytes) else str(expected)
            if strings_digest(np.asarray(values).reshape(-1)) != expected:
                report.fail(f"/{name}: checksum mismatch, the strings differ from their sha256")
        elif not obj.fletcher32:
            unchecked.append(name)

    f.visititems(visit)
    features = [name for name in f.get("features", {}) if not f[f"features/{name}"].fletcher32]
    if unchecked or features:
        report.notes.append(
            "no checksums on " + ", ".join([*unchecked, *(f"features/{n}" for n in features)])
            + " (written before checksums were added): flipped bytes there cannot be detected"
        )


def verify_cache(path: str | Path, *, need_complete: bool = True) -> Report:
    """Every check of one cache file (also used for each part of an unfinished extraction)."""
    path = Path(path)
    report = Report()
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        report.fail(f"{path}: not a readable HDF5 file ({exc})")
        return report
    with f:
        attrs = {key: decode_attr(value) for key, value in f.attrs.items()}
        if attrs.get("schema_version") != SCHEMA_VERSION:
            report.fail(f"schema_version is {attrs.get('schema_version')!r}, expected {SCHEMA_VERSION}")
        if need_complete and not attrs.get("complete"):
            report.fail("no completion marker (attribute 'complete'): the file was not finished")
        missing = [key for key in (*PROVENANCE_KEYS, "label_names") if key not in attrs]
        if missing:
            report.fail(f"provenance attributes missing: {', '.join(missing)}")
        _check_checksums(f, report)
        structure_ok = True
        for name, kind in {**SCAN_TABLES, **SLICE_TABLES}.items():
            problems_before = len(report.problems)
            if name not in f:
                report.fail(f"dataset /{name} missing")
            elif kind != "str" and _kind(f[name]) != kind and not (kind == "i" and _kind(f[name]) == "u"):
                report.fail(f"dataset /{name} has dtype {f[name].dtype}, expected kind {kind!r}")
            elif kind == "str" and _kind(f[name]) != "str":
                report.fail(f"dataset /{name} has dtype {f[name].dtype}, expected strings")
            structure_ok = structure_ok and len(report.problems) == problems_before
        if not structure_ok:
            return report
        try:
            tables = {name: f[name][()] for name in TABLES}
        except OSError:
            return report  # a table whose checksum fails: _check_checksums has said which
        tables["scans/scan_id"] = _decode(tables["scans/scan_id"]) if tables["scans/scan_id"].ndim == 1 else []
        n_classes = len(attrs.get("label_names", []))
        table_ok = True
        for problem in table_problems(tables, n_classes):
            report.fail(problem)
            table_ok = False
        n_scans = len(tables["scans/scan_id"])
        scan_ids = tables["scans/scan_id"]
        n_slices = np.asarray(tables["scans/n_slices"]).astype(np.int64).reshape(-1)
        offset = np.asarray(tables["scans/offset"]).astype(np.int64).reshape(-1)
        total = int(n_slices.sum())
        if not table_ok:  # rows cannot be named by scan on misshapen tables
            offset, scan_ids, n_scans = np.zeros(0, np.int64), [], 0
        resolutions = attrs.get("resolutions") or []
        for resolution in resolutions:
            name = f"features/{int(resolution)}"
            if name not in f:
                report.fail(f"/{name} missing (resolutions attribute lists {resolution})")
                continue
            data = f[name]
            if data.dtype != np.float16:
                report.fail(f"/{name} has dtype {data.dtype}, expected float16")
            if data.shape != (total, FEATURE_DIM):
                report.fail(f"/{name} has shape {data.shape}, expected ({total}, {FEATURE_DIM})")
                continue
            bad_rows = 0
            first_bad = None
            damaged = []
            for start in range(0, total, CHUNK_ROWS):
                try:
                    block = data[start : start + CHUNK_ROWS]
                except OSError:
                    block = _damaged_rows(data, start, min(total, start + CHUNK_ROWS), damaged)
                finite = np.isfinite(block).all(axis=1)
                if not finite.all():
                    bad_rows += int((~finite).sum())
                    if first_bad is None:
                        first_bad = start + int(np.flatnonzero(~finite)[0])
            if damaged:
                scans = sorted({scan_ids[int(np.searchsorted(offset, r, side="right") - 1)] for r in damaged}
                               if n_scans else {"?"})
                report.fail(
                    f"/{name}: checksum mismatch in {len(damaged)} slice rows (damaged bytes) of scans "
                    f"{', '.join(map(repr, scans[:5]))}{' ...' if len(scans) > 5 else ''}"
                )
            if bad_rows:
                scan = int(np.searchsorted(offset, first_bad, side="right") - 1) if n_scans else -1
                where = f" (first: slice row {first_bad}, scan {scan_ids[scan]!r})" if scan >= 0 else ""
                report.fail(f"/{name}: {bad_rows} slice vectors contain NaN or inf{where}")
        extra = sorted(set(f.get("features", {}).keys()) - {str(int(r)) for r in resolutions})
        if extra:
            report.fail(f"feature arrays not listed in the resolutions attribute: {', '.join(extra)}")
        report.notes.append(f"{n_scans} scans, {total} slices, resolutions {resolutions}")
    return report


def _damaged_rows(data: h5py.Dataset, start: int, stop: int, damaged: list[int]) -> np.ndarray:
    """Rows start..stop of a feature array read chunk by chunk; rows of chunks whose checksum
    fails are appended to `damaged` and returned as zeros (so the NaN check can go on)."""
    step = (data.chunks or (stop - start,))[0]
    block = np.zeros((stop - start, data.shape[1]), data.dtype)
    for first in range(start, stop, step):
        last = min(stop, first + step)
        try:
            block[first - start : last - start] = data[first:last]
        except OSError:
            damaged.extend(range(first, last))
    return block


def verify_parts(parts: str | Path) -> Report:
    """An unfinished extraction: manifest readable, every part a valid cache, no scan twice."""
    parts = Path(parts)
    report = Report()
    manifest_file = parts / MANIFEST
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        report.fail(f"{manifest_file}: missing or unreadable ({exc})")
        return report
    n_total = int(manifest.get("n_scans", 0))
    seen: set[str] = set()
    done = 0
    files = sorted(sorted(parts.glob(f"{PART_PREFIX}*.h5")), key=_commit_seq)
    superseded = 0
    for part in files:
        sub = verify_cache(part)
        for problem in sub.problems:
            report.fail(f"{part.name}: {problem}")
        if not sub.ok:
            continue
        with h5py.File(part, "r") as f:
            ids = list(_decode(f["scans/scan_id"][:])) + read_rejects_tables(f)[1]
        # A later part holding a scan again re-extracted it after its inputs changed: it supersedes.
        twice = seen.intersection(ids)
        superseded += len(twice)
        seen.update(ids)
        done += len(set(ids) - twice)
    leftovers = sorted(p.name for p in parts.glob("*.tmp"))
    report.notes.append(
        f"unfinished extraction: {done} of {n_total} scans committed in {len(files)} parts"
        + (f"; {len(leftovers)} temporary files from an interrupted write (deleted on resume)" if leftovers else "")
    )
    if superseded:
        report.notes.append(f"{superseded} scans re-extracted after their inputs changed (the later part wins)")
    report.notes.append("run drct extract again (same settings) to resume")
    return report


def resolve_target(path: str | Path) -> tuple[str, Path]:
    """('cache', file) or ('parts', folder) for a cache path, its parts folder, or an OUT with only parts."""
    path = Path(path)
    if path.is_dir() and (path / MANIFEST).is_file():
        return "parts", path
    if path.is_file():
        return "cache", path
    if parts_dir(path).is_dir():
        return "parts", parts_dir(path)
    return "missing", path


def human_size(n_bytes: int) -> str:
    size = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} TiB"


def cache_info(path: str | Path) -> str:
    """Provenance, scans, slices, classes with positive counts, resolutions and size of a cache."""
    from cache.store import FeatureCache

    cache = FeatureCache(path)
    with cache:
        table = cache.table
        lines = [f"cache        {cache.path}  ({human_size(cache.path.stat().st_size)})"]
        lines.append(f"schema       {cache.attrs.get('schema_version')}")
        for key in PROVENANCE_KEYS:
            lines.append(f"{key:<12} {cache.provenance.get(key)}")
        for key in ("precision", "layout", "data_root"):
            if key in cache.attrs:
                lines.append(f"{key:<12} {cache.attrs[key]}")
        n = len(table.scan_id)
        lines.append(f"scans        {n} ({len(set(table.patient_id))} patients)")
        counts = table.n_slices
        if n:
            lines.append(
                f"slices       {int(counts.sum())} (per scan: min {counts.min()}, median {int(np.median(counts))}, "
                f"max {counts.max()})"
            )
        else:
            lines.append("slices       0")
        lines.append(f"resolutions  {', '.join(str(r) for r in cache.resolutions)} px, float16 x {FEATURE_DIM}")
        if cache.label_names:
            known = ~np.isnan(table.labels).any(axis=1) if n else np.zeros(0, bool)
            positives = ", ".join(
                f"{name} {int((table.labels[known, k] > 0.5).sum())}" for k, name in enumerate(cache.label_names)
            )
            lines.append(f"classes      positive scans ({int(known.sum())} labelled): {positives}")
            slice_known = (table.slice_labels >= 0).all(axis=1) if len(table.slice_labels) else np.zeros(0, bool)
            if slice_known.any():
                positives = ", ".join(
                    f"{name} {int((table.slice_labels[slice_known, k] == 1).sum())}"
                    for k, name in enumerate(cache.label_names)
                )
                lines.append(f"             positive slices ({int(slice_known.sum())} labelled): {positives}")
        else:
            lines.append("classes      none (unlabelled layout)")
        extraction_rejects, rejected = read_rejects_tables(cache.file, with_index=False)
        lines.append(f"rejects      {len(extraction_rejects)} at extraction ({len(rejected)} whole scans)")
    return "\n".join(lines)
