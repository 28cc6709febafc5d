"""Reader for the RSNA 2019 Intracranial Hemorrhage layout.

Layout: a flat folder of ``ID_<hex>.dcm`` files, either ``root/stage_2_train/`` or ``root/``
itself, and ``stage_2_train.csv`` (``ID,Label``; ID = ``ID_<hex>_<subtype>``; six rows per image).

Rules (documented decisions):

* A scan is one (PatientID, StudyInstanceUID, SeriesInstanceUID) group. ``scan_id`` is the
  SeriesInstanceUID (RSNA writes it as an ``ID_...`` string); in the unlikely case that one
  SeriesInstanceUID appears under two patients/studies, the second gets ``<uid>~2`` and so on,
  so ids stay unique and stable for a given file set.
* A slice's labels are looked up by file-name stem (the RSNA image id), then by SOPInstanceUID
  (the same string in the real data); order `RSNA_LABELS`. Slices without all six rows have
  ``labels=None`` (unknown).
* Scan labels = OR (max) of the known slice labels (paper: scan labels from slice labels).
  If some slices are unknown the scan is kept with the OR of the labelled ones and a "note:"
  row in the rejects file says how many were unknown; a scan with no labelled slice is rejected,
  unless a scan-level table (`scan_labels_csv`) labels it. That table, where given, overrides
  the OR (a disagreement is noted).
* Duplicated CSV rows: identical duplicates are dropped silently; conflicting ones keep the
  maximum and are noted in the rejects file (path = the CSV).
* Pixels (and so the corrupt image ``ID_6431af929``) are only read later, by `read_hu`.
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from pathlib import Path

from pipeline.data.dicom_io import ImageLimits
from pipeline.data.labels import RSNA_LABELS
from pipeline.data.layout import IndexRequest, Layout, top_names
from pipeline.data.scan_index import Reject, ScanIndex, ScanRecord
from pipeline.data.series import (
    SIDECAR_SUFFIXES,
    SliceHeader,
    order_series,
    read_headers,
    read_scan_labels_csv,
    resolve_label_file,
    slice_refs,
    split_headers,
)

log = logging.getLogger(__name__)

DEFAULT_LABELS = "stage_2_train.csv"
IMAGE_FOLDER = "stage_2_train"


def image_folder(root: Path) -> Path:
    """root/stage_2_train where it exists, else root itself (both layouts are accepted)."""
    sub = root / IMAGE_FOLDER
    return sub if sub.is_dir() else root


def image_files(root: Path) -> list[str]:
    """The candidate slice files of the flat image folder (non-recursive, sidecars skipped)."""
    folder = image_folder(root)
    return sorted(
        str(p.resolve())
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in SIDECAR_SUFFIXES
    )


def read_rsna_labels(path: str | Path) -> tuple[dict[str, list[int]], list[Reject]]:
    """Slice labels from a stage_2_train.csv-format file: {image id: 6 labels in RSNA_LABELS order}.

    Images that lack some of the six subtype rows are left out (unknown) with a note; identical
    duplicated rows are dropped; conflicting duplicates keep the max and are noted."""
    path = Path(path)
    values: dict[str, dict[str, int]] = defaultdict(dict)
    notes: list[Reject] = []
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [c.strip() for c in header[:2]] != ["ID", "Label"]:
            raise ValueError(f"{path}: expected header 'ID,Label' (stage_2_train.csv format), got {header}")
        for line, row in enumerate(reader, start=2):
            if not row or not row[0].strip():
                continue
            if len(row) < 2:
                raise ValueError(f"{path}, line {line}: expected 'ID,Label', got {row}")
            image_id, _, subtype = row[0].strip().rpartition("_")
            if subtype not in RSNA_LABELS or not image_id:
                raise ValueError(
                    f"{path}, line {line}: ID {row[0]!r} is not ID_<hex>_<subtype> with a subtype in {RSNA_LABELS}"
                )
            try:
                value = int(float(row[1]))
            except ValueError as exc:
                raise ValueError(f"{path}, line {line}: label {row[1]!r} is not a number") from exc
            seen = values[image_id]
            if subtype in seen and seen[subtype] != value:
                notes.append(
                    Reject(
                        path=str(path),
                        scan_id="",
                        reason=f"note: conflicting duplicate label rows for {image_id}_{subtype} "
                        f"({seen[subtype]} and {value}); kept the maximum",
                    )
                )
                log.warning(
                    "conflicting duplicate rows for %s_%s in %s; kept the maximum", image_id, subtype, path
                )
                value = max(value, seen[subtype])
            seen[subtype] = value
    labels = {}
    for image_id, seen in values.items():
        if len(seen) == len(RSNA_LABELS):
            labels[image_id] = [seen[name] for name in RSNA_LABELS]
        else:
            missing = [name for name in RSNA_LABELS if name not in seen]
            notes.append(
                Reject(
                    path=str(path),
                    reason=f"note: {image_id} lacks label rows for {', '.join(missing)}; "
                    "its slice labels are unknown",
                )
            )
    return labels, notes


def build_rsna_index(
    root: Path,
    labels_csv: str | Path | None = None,
    *,
    scan_labels_csv: str | Path | None = None,
    workers: int | None = None,
    processes: bool = False,
    progress: bool | None = None,
    allow_modalities: list[str] | None = None,
    limits: ImageLimits | None = None,
) -> ScanIndex:
    """Index an RSNA-layout folder (see module docstring for the rules)."""
    root = Path(root).resolve()
    labels_csv = resolve_label_file(root, labels_csv, scan_labels_csv, DEFAULT_LABELS, "RSNA labels")
    index = ScanIndex(layout="rsna", root=str(root), label_names=list(RSNA_LABELS))
    slice_labels: dict[str, list[int]] = {}
    if labels_csv is not None:
        slice_labels, notes = read_rsna_labels(labels_csv)
        index.rejects.extend(notes)
    scan_table: tuple[str, dict[str, list[float]]] | None = None
    if scan_labels_csv is not None:
        scan_table = read_scan_labels_csv(scan_labels_csv, RSNA_LABELS)

    def label_of(header: SliceHeader) -> list[int] | None:
        return slice_labels.get(Path(header.path).stem) or slice_labels.get(header.sop_uid)

    headers = split_headers(
        read_headers(image_files(root), workers, processes, progress),
        index.rejects,
        allow_modalities=allow_modalities,
        limits=limits,
    )
    groups: dict[tuple[str, str, str], list[SliceHeader]] = defaultdict(list)
    for header in headers:
        groups[(header.patient_id, header.study_uid, header.series_uid)].append(header)
    used: dict[str, int] = defaultdict(int)
    for (patient, study, series), members in sorted(groups.items()):
        used[series] += 1
        scan_id = series if used[series] == 1 else f"{series}~{used[series]}"
        ordered = order_series(members, scan_id, index.rejects)
        if not ordered:  # order_series has recorded why
            continue
        slices = slice_refs(ordered, label_of)
        record = ScanRecord(
            scan_id=scan_id, patient_id=patient, slices=slices, series_uid=series, study_uid=study
        )
        known = [s.labels for s in slices if s.labels is not None]
        or_labels = [float(max(column)) for column in zip(*known)] if known else None
        table_labels = None
        if scan_table is not None:
            table_labels = scan_table[1].get(str(getattr(record, scan_table[0])))
        if table_labels is not None:
            record.labels = list(table_labels)
            if or_labels is not None and any(a < b for a, b in zip(table_labels, or_labels)):
                index.rejects.append(
                    Reject(
                        path=str(scan_labels_csv),
                        scan_id=scan_id,
                        reason="note: scan labels table says negative where a labelled slice is positive; "
                        "table kept",
                    )
                )
        elif or_labels is not None:
            record.labels = or_labels
            if len(known) < len(slices):
                index.rejects.append(
                    Reject(
                        path=str(Path(slices[0].path).parent),
                        scan_id=scan_id,
                        reason=f"note: {len(slices) - len(known)} of {len(slices)} slices have no label rows; "
                        "scan label = OR of the labelled slices",
                    )
                )
        else:
            index.rejects.append(
                Reject(
                    path=str(Path(slices[0].path).parent),
                    scan_id=scan_id,
                    reason=f"no labels: none of its {len(slices)} slices has rows in {labels_csv}"
                    + (" and the scan is not in the scan labels table" if scan_table else ""),
                )
            )
            continue
        index.scans.append(record)
    return index


def detect(root: Path) -> bool:
    """An RSNA tree: stage_2_train*.csv, flat ID_*.dcm files or a stage_2_train/ folder at the top."""
    names = top_names(root)
    return any(n.endswith(".csv") and IMAGE_FOLDER in n for n in names) or any(
        n.startswith("ID_") and n.endswith(".dcm") for n in names
    ) or (Path(root) / IMAGE_FOLDER).is_dir()


def _index(root: Path, request: IndexRequest) -> ScanIndex:
    return build_rsna_index(root, request.labels_csv, scan_labels_csv=request.scan_labels_csv, **request.reading())


LAYOUT = Layout(
    name="rsna",
    help="RSNA 2019, flat ID_*.dcm (in root or root/stage_2_train/) + stage_2_train.csv slice labels",
    detect=detect,
    looks_like="this looks like RSNA 2019 (stage_2_train.csv or flat ID_*.dcm files)",
    index=_index,
    label_names=tuple(RSNA_LABELS),
)
