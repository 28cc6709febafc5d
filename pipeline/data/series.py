"""The series helpers the three readers share (headers, z order, label tables).

Kept apart from `pipeline.data.index` (the dispatcher, which imports the readers) so that the
readers import these without importing the dispatcher back: no import circle.

* `read_headers`: every file's header read once (``stop_before_pixels``, only the tags the
  index needs), in a thread pool (I/O bound on network disks) or optionally a process pool
  (header parsing is pure Python), with a tqdm bar and rate when there are many files;
* `split_headers`: files that cannot be slices (not DICOM, a modality not allowed, an image
  size outside `ImageLimits`: ``dataset.max_pixels`` / ``dataset.min_size``) to the rejects list;
* `order_series`: one series' slices in z order along the slice normal, with localizers,
  off-orientation images and duplicate positions moved to the rejects list; a series that mixes
  matrix sizes or pixel spacings is kept with a "note:" in the rejects file (`geometry_notes`);
* `candidate_files`: every file under the root, following symlinked folders (each real folder is
  walked once, so a symlink loop ends; the skipped link is a rejects row);
* `read_scan_labels_csv`: a scan-level label table (used where only scan labels exist, e.g.
  the real RSNA subset's `study_labels_derived.csv`).

Order is ascending position along the normal cross(row, column); for axial images this is
feet -> head. Where any slice of a series lacks ImagePositionPatient/ImageOrientationPatient the
whole series falls back to InstanceNumber (mixing the two scales would be meaningless), and the
fallback is noted in the rejects file (reason starts with "note:"; the slices are kept).

Mixed geometry within a series is kept, not rejected, and noted: every slice is resized on its
own to the encoder resolutions (224/512), so a 64 x 64 slice among 32 x 32 ones, or a slice of
another pixel spacing, still yields vectors of the same shape; what the note warns about is that
anatomy is then not at one scale across the scan (no resampling to a common spacing is done).
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.dicom_io import (
    HEADER_TAGS,
    ImageLimits,
    SliceError,
    check_modality,
    clean_text,
    instance_number,
    is_localizer,
    modality_of,
    read_header,
    slice_normal,
    slice_position,
)
from pipeline.data.scan_index import Reject, SliceRef

log = logging.getLogger(__name__)

# Files with these suffixes are sidecars (labels, docs, previews), never candidate slices.
SIDECAR_SUFFIXES = {
    ".csv",
    ".md",
    ".txt",
    ".json",
    ".png",
    ".jpg",
    ".jpeg",
    ".yaml",
    ".yml",
    ".html",
    ".pdf",
    ".xml",
    ".h5",
    ".zip",
    ".gz",
    ".tar",
    ".py",
    ".log",
    ".nii",
}
PROGRESS_MIN_FILES = 2000  # show a progress bar from this many files on
HEADER_BATCH = 64  # files per unit of work of the header pool
POSITION_TOLERANCE_MM = 0.01  # two slices closer than this along the normal are duplicates
ORIENTATION_TOLERANCE = 0.01  # 1 - |cos(angle)| between a slice normal and the series normal (~8 deg)


@dataclass
class SliceHeader:
    """What the index needs of one file's header (picklable, small). `error` set = not usable."""

    path: str
    error: str | None = None
    sop_uid: str = ""
    series_uid: str = ""
    study_uid: str = ""
    patient_id: str = ""
    position: float | None = None
    normal: tuple[float, float, float] | None = None
    instance_number: int | None = None
    localizer: bool = False
    series_description: str = ""
    convolution_kernel: str = ""
    slice_thickness: float | None = None
    contrast_agent: str = ""
    modality: str = ""
    rows: int = 0
    columns: int = 0
    bits: int = 16
    pixel_spacing: tuple[float, float] | None = None


def header_of(path: str) -> SliceHeader:
    """Read one file's header into a `SliceHeader`; a non-DICOM or non-image file gets `error` set."""
    try:
        ds = read_header(path, tags=HEADER_TAGS)
    except SliceError as exc:
        return SliceHeader(path=path, error=str(exc))
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        return SliceHeader(
            path=path, error=f"multi-frame image ({frames} frames): only single-frame slices are supported"
        )
    if "Rows" not in ds or "Columns" not in ds:
        return SliceHeader(path=path, error="not an image (no Rows/Columns)")
    try:
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        rows, columns = int(ds.Rows), int(ds.Columns)
        bits = int(ds.get("BitsAllocated", 16) or 16)
    except (TypeError, ValueError) as exc:
        return SliceHeader(path=path, error=f"malformed image size tags: {clean_text(exc, 80)}")
    if samples != 1:
        return SliceHeader(path=path, error=f"not a greyscale image (SamplesPerPixel {samples})")
    spacing = ds.get("PixelSpacing")
    try:
        spacing = tuple(float(v) for v in spacing) if spacing is not None and len(spacing) == 2 else None
    except (TypeError, ValueError):
        spacing = None
    normal = slice_normal(ds)
    kernel = ds.get("ConvolutionKernel", "")
    if not isinstance(kernel, (str, bytes)):
        kernel = " ".join(str(k) for k in kernel)
    try:
        thickness = float(ds.get("SliceThickness")) if ds.get("SliceThickness") not in (None, "") else None
    except (TypeError, ValueError):
        thickness = None
    # Every text value goes through clean_text: a NUL, non-UTF-8 or huge tag must not abort a run.
    return SliceHeader(
        path=path,
        sop_uid=clean_text(ds.get("SOPInstanceUID", "")),
        series_uid=clean_text(ds.get("SeriesInstanceUID", "")),
        study_uid=clean_text(ds.get("StudyInstanceUID", "")),
        patient_id=clean_text(ds.get("PatientID", "")),
        position=slice_position(ds),
        normal=None if normal is None else tuple(float(v) for v in normal),
        instance_number=instance_number(ds),
        localizer=is_localizer(ds),
        series_description=clean_text(ds.get("SeriesDescription", "")),
        convolution_kernel=clean_text(kernel),
        slice_thickness=thickness,
        contrast_agent=clean_text(ds.get("ContrastBolusAgent", "")),
        modality=modality_of(ds),
        rows=rows,
        columns=columns,
        bits=bits,
        pixel_spacing=spacing,
    )


def _default_workers() -> int:
    return min(32, 4 * (os.cpu_count() or 1))


def headers_of(paths: list[str]) -> list[SliceHeader]:
    """Headers of a batch of files (the unit of work of `read_headers`' pool)."""
    return [header_of(path) for path in paths]


def read_headers(
    paths: list[str], workers: int | None = None, processes: bool = False, progress: bool | None = None
) -> list[SliceHeader]:
    """Headers of many files, in input order. Threads by default (header reading is mostly I/O
    on network disks); ``processes=True`` spreads pydicom's pure-Python parsing over CPU cores.
    Work goes out in batches of `HEADER_BATCH` files, so 750k files never mean 750k futures. The
    progress bar (with files/s) appears by default from `PROGRESS_MIN_FILES` files on."""
    workers = workers or _default_workers()
    show = len(paths) >= PROGRESS_MIN_FILES if progress is None else progress
    batches = [paths[k : k + HEADER_BATCH] for k in range(0, len(paths), HEADER_BATCH)]
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), desc="reading DICOM headers", unit="file")
    results: list[SliceHeader] = []
    executor = None
    try:
        if workers <= 1 or len(batches) <= 1:
            done: Iterable[list[SliceHeader]] = map(headers_of, batches)
        else:
            executor = (ProcessPoolExecutor if processes else ThreadPoolExecutor)(max_workers=workers)
            done = executor.map(headers_of, batches)  # yields in order; workers run ahead
        for batch in done:
            results.extend(batch)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()
    return results


def candidate_files(root: Path, rejects: list[Reject] | None = None) -> list[str]:
    """Every non-hidden, non-sidecar file under root (absolute paths, sorted for determinism).

    Symlinked folders are followed (a series linked into the tree is read like any other); each
    real folder is walked once, so a link back to an ancestor (a loop) or a second link to the
    same folder ends there, with a row in `rejects` saying why it was not read again."""
    found: list[str] = []
    seen: dict[tuple[int, int], str] = {}
    try:
        info = os.stat(root)
        seen[(info.st_dev, info.st_ino)] = str(root)
    except OSError:
        pass
    for directory, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            sub = os.path.join(directory, name)
            try:
                info = os.stat(sub)
            except OSError as exc:  # a dangling or looping link
                if rejects is not None:
                    rejects.append(Reject(path=os.path.abspath(sub), reason=f"cannot read folder: {exc.strerror}"))
                continue
            key = (info.st_dev, info.st_ino)
            if key in seen:
                if rejects is not None:
                    rejects.append(Reject(
                        path=os.path.abspath(sub),
                        reason=f"symlinked folder leads to {os.path.realpath(sub)}, already read as "
                               f"{seen[key]}: not read twice (a symlink loop or a second link)",
                    ))
                continue
            seen[key] = os.path.abspath(sub)
            keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            if name.startswith(".") or Path(name).suffix.lower() in SIDECAR_SUFFIXES:
                continue
            found.append(os.path.abspath(os.path.join(directory, name)))
    return sorted(found)


def split_headers(
    headers: list[SliceHeader],
    rejects: list[Reject],
    scan_id_of: Callable[[SliceHeader], str] | None = None,
    allow_modalities: list[str] | None = None,
    limits: ImageLimits | None = None,
) -> list[SliceHeader]:
    """Headers that read, whose modality is allowed (CT by default) and whose image size is within
    `limits` (default `ImageLimits()`); the others go to `rejects` with their reason."""
    limits = limits or ImageLimits()
    good = []
    for header in headers:
        if header.error is None:
            header.error = check_modality(header.modality, allow_modalities)
        if header.error is None:
            header.error = limits.reason(header.rows, header.columns, bits=header.bits)
        if header.error is not None:
            rejects.append(
                Reject(
                    path=header.path, reason=header.error, scan_id=scan_id_of(header) if scan_id_of else ""
                )
            )
        elif not header.series_uid:
            rejects.append(
                Reject(path=header.path, reason="no SeriesInstanceUID: cannot group the slice into a scan")
            )
        else:
            good.append(header)
    return good


def order_series(headers: list[SliceHeader], scan_id: str, rejects: list[Reject]) -> list[SliceHeader]:
    """One series' usable slices in z order; everything dropped is appended to `rejects`.

    A series left with no slice gets a scan-level reject too. Steps: drop localizers; drop images whose normal differs from the series' majority normal
    (untagged localizers, stray reformats); sort by `slice_position`, or by InstanceNumber for the
    whole series where any slice lacks a position; keep the first file (by path) of each position
    and reject the others as duplicates; reject slices with neither position nor InstanceNumber.
    """
    kept = []
    for header in sorted(headers, key=lambda h: h.path):
        if header.localizer:
            rejects.append(Reject(path=header.path, reason="localizer/scout image", scan_id=scan_id))
        else:
            kept.append(header)
    normals = [h.normal for h in kept if h.normal is not None]
    if normals:
        rounded = Counter(tuple(round(v, 2) for v in n) for n in normals)
        majority = np.asarray(rounded.most_common(1)[0][0])
        majority = majority / np.linalg.norm(majority)
        same = []
        for header in kept:
            if (
                header.normal is not None
                and 1.0 - abs(float(np.dot(header.normal, majority))) > ORIENTATION_TOLERANCE
            ):
                rejects.append(
                    Reject(
                        path=header.path,
                        scan_id=scan_id,
                        reason="orientation differs from the rest of the series (localizer or reformat?)",
                    )
                )
            else:
                same.append(header)
        kept = same
    placeable = []
    for header in kept:
        if header.position is None and header.instance_number is None:
            reason = "no ImagePositionPatient/ImageOrientationPatient and no InstanceNumber: cannot place the slice"
            rejects.append(Reject(path=header.path, scan_id=scan_id, reason=reason))
        else:
            placeable.append(header)
    kept = placeable
    use_positions = all(h.position is not None for h in kept)
    if use_positions:
        key = lambda h: float(h.position)
        tolerance = POSITION_TOLERANCE_MM
    else:
        # Positions and InstanceNumbers are different scales: the whole series uses InstanceNumber.
        placed = []
        for header in kept:
            if header.instance_number is None:
                reason = (
                    "no InstanceNumber in a series ordered by InstanceNumber (other slices lack a position)"
                )
                rejects.append(Reject(path=header.path, scan_id=scan_id, reason=reason))
            else:
                placed.append(header)
        if placed:
            reason = (
                "note: ImagePositionPatient/ImageOrientationPatient missing on some slices; "
                "series ordered by InstanceNumber (slices kept)"
            )
            rejects.append(Reject(path=os.path.dirname(placed[0].path), scan_id=scan_id, reason=reason))
        kept = placed
        key = lambda h: float(h.instance_number)
        tolerance = 0.5
    ordered = sorted(kept, key=lambda h: (key(h), h.path))
    result: list[SliceHeader] = []
    seen_sop: set[str] = set()
    for header in ordered:
        if header.sop_uid and header.sop_uid in seen_sop:
            rejects.append(Reject(path=header.path, scan_id=scan_id, reason="duplicate SOPInstanceUID"))
            continue
        if result and abs(key(header) - key(result[-1])) < tolerance:
            rejects.append(
                Reject(
                    path=header.path,
                    scan_id=scan_id,
                    reason=f"duplicate slice position ({key(header):.3f} {'mm' if use_positions else '(InstanceNumber)'}, "
                    f"same as {os.path.basename(result[-1].path)})",
                )
            )
            continue
        seen_sop.add(header.sop_uid)
        result.append(header)
    if headers and not result:
        folder = str(Path(headers[0].path).parent)
        rejects.append(Reject(path=folder, scan_id=scan_id, reason="no usable slices left in the scan"))
    rejects.extend(geometry_notes(result, scan_id))
    return result


def _counted(counts: Counter, unit: str) -> str:
    return ", ".join(f"{value}{'' if value == 'unknown' else unit} on {n} slice{'s' if n != 1 else ''}"
                     for value, n in counts.most_common())


def geometry_notes(headers: list[SliceHeader], scan_id: str) -> list[Reject]:
    """"note:" rows for a series whose slices differ in matrix size or pixel spacing (kept: each
    slice is resized to the encoder resolutions on its own; see the module docstring)."""
    if len(headers) < 2:
        return []
    folder = os.path.dirname(headers[0].path)
    notes = []
    sizes = Counter(f"{h.rows}x{h.columns}" for h in headers)
    if len(sizes) > 1:
        notes.append(Reject(path=folder, scan_id=scan_id, reason=(
            f"note: mixed matrix sizes in the series ({_counted(sizes, ' px')}); every slice is resized to "
            "the encoder resolutions on its own (slices kept)")))
    spacings = Counter(
        "unknown" if h.pixel_spacing is None else "x".join(f"{v:g}" for v in np.round(h.pixel_spacing, 3))
        for h in headers
    )
    if len(spacings) > 1:
        notes.append(Reject(path=folder, scan_id=scan_id, reason=(
            f"note: mixed pixel spacing in the series ({_counted(spacings, ' mm')}); slices are resized on "
            "their own, not resampled to one spacing, so anatomy is not at one scale across the scan "
            "(slices kept)")))
    return notes


def slice_refs(
    headers: list[SliceHeader], label_of: Callable[[SliceHeader], list[int] | None] | None = None
) -> list[SliceRef]:
    """SliceRefs of ordered headers; z = position along the normal, or InstanceNumber as fallback;
    `label_of` gives a slice's labels (None = unknown)."""
    use_positions = all(h.position is not None for h in headers)
    refs = []
    for header in headers:
        z = header.position if use_positions else float(header.instance_number)
        refs.append(
            SliceRef(
                path=header.path,
                z=float(z),
                sop_uid=header.sop_uid,
                labels=None if label_of is None else label_of(header),
            )
        )
    return refs


SCAN_ID_COLUMNS = {
    "scan_id": "scan_id",
    "SeriesInstanceUID": "series_uid",
    "StudyInstanceUID": "study_uid",
    "name": "patient_id",
    "PatientID": "patient_id",
}


def read_scan_labels_csv(path: str | Path, label_names: list[str]) -> tuple[str, dict[str, list[float]]]:
    """A scan-level label table: an id column (the first of scan_id, SeriesInstanceUID,
    StudyInstanceUID, name, PatientID present) and one 0/1 column per label name.

    Returns (ScanRecord attribute the id matches, {id: labels in `label_names` order})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scan labels file not found: {path}")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        id_column = next((c for c in SCAN_ID_COLUMNS if c in columns), None)
        if id_column is None:
            raise ValueError(
                f"{path}: no id column (one of {', '.join(SCAN_ID_COLUMNS)}) in header {columns}"
            )
        missing = [name for name in label_names if name not in columns]
        if missing:
            raise ValueError(
                f"{path}: label columns missing: {', '.join(missing)} (expected {', '.join(label_names)})"
            )
        table = {}
        for line, row in enumerate(reader, start=2):
            try:
                table[row[id_column].strip()] = [float(row[name]) for name in label_names]
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}, line {line}: label values must be numbers ({exc})") from exc
    return SCAN_ID_COLUMNS[id_column], table


def resolve_label_file(
    root: Path, labels_csv: str | Path | None, scan_labels_csv: str | Path | None, default_name: str, what: str
) -> Path | None:
    """The label file a layout reads: the given path (which must exist), else ``root/default_name``;
    None only when a scan-level table stands in for it. A missing file is an error naming the path."""
    if labels_csv is not None:
        if not Path(labels_csv).is_file():
            raise FileNotFoundError(f"{what} file not found: {labels_csv}")
        return Path(labels_csv)
    default = root / default_name
    if default.is_file():
        return default
    if scan_labels_csv is None:
        raise FileNotFoundError(
            f"{what} not found: {default} (give the label file explicitly, "
            "or use layout 'folder' for unlabelled scans)"
        )
    return None
