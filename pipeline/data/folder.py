"""Reader for any folder of DICOM series (new scans to predict): one scan per SeriesInstanceUID.

Every non-sidecar file under the root is a candidate, at any depth; files are grouped by
SeriesInstanceUID wherever they lie. ``scan_id`` = SeriesInstanceUID, ``patient_id`` =
PatientID (the most common one within the series), labels None. Slice order, localizers and
duplicates follow `pipeline.data.series.order_series`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from pipeline.data.dicom_io import ImageLimits
from pipeline.data.layout import IndexRequest, Layout
from pipeline.data.scan_index import ScanIndex, ScanRecord
from pipeline.data.series import (
    SliceHeader,
    candidate_files,
    order_series,
    read_headers,
    slice_refs,
    split_headers,
)


def build_folder_index(
    root: Path,
    *,
    workers: int | None = None,
    processes: bool = False,
    progress: bool | None = None,
    allow_modalities: list[str] | None = None,
    limits: ImageLimits | None = None,
) -> ScanIndex:
    """Index every DICOM series under root (unlabelled)."""
    root = Path(root).resolve()
    index = ScanIndex(layout="folder", root=str(root), label_names=[])
    headers = split_headers(
        read_headers(candidate_files(root, index.rejects), workers, processes, progress),
        index.rejects,
        allow_modalities=allow_modalities,
        limits=limits,
    )
    groups: dict[str, list[SliceHeader]] = defaultdict(list)
    for header in headers:
        groups[header.series_uid].append(header)
    for series_uid, members in sorted(groups.items()):
        ordered = order_series(members, series_uid, index.rejects)
        if not ordered:  # order_series has recorded why
            continue
        patient = Counter(h.patient_id for h in ordered).most_common(1)[0][0]
        study = Counter(h.study_uid for h in ordered).most_common(1)[0][0]
        index.scans.append(
            ScanRecord(
                scan_id=series_uid,
                patient_id=patient,
                slices=slice_refs(ordered),
                labels=None,
                series_uid=series_uid,
                study_uid=study,
            )
        )
    return index


def _index(root: Path, request: IndexRequest) -> ScanIndex:
    return build_folder_index(root, **request.reading())


LAYOUT = Layout(
    name="folder",
    help="any folder of DICOM series, one scan per SeriesInstanceUID, no labels",
    detect=lambda root: True,  # the catch-all: last in the registry
    looks_like="no CQ500 or RSNA markers: one scan per DICOM series, no labels",
    index=_index,
)
