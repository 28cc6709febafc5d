"""Reader for the CQ500 layout (qure.ai head-CT study).

Layout: ``root/"CQ500CT<n> CQ500CT<n>"/<study>/<series>/*.dcm`` (files may sit at any depth under
the patient folder; series are told apart by SeriesInstanceUID, not by folder), and
``root/reads.csv`` with ``name,Category`` and, for readers R1..R3, ``R<k>:<finding>`` columns.

Labels: for each of the nine `CQ500_LABELS` the majority of the three readers (>= 2 of 3;
with blank reads, more than half of the readers who answered). ``name`` ``CQ500-CT-<n>`` matches
the patient folder ``CQ500CT<n> CQ500CT<n>`` (or, for files outside such a folder, the
PatientID). ``scan_id`` is the patient name: one scan per patient. Optional slice-level truth
(phantom only): ``root/slice_labels.csv`` with ``SOPInstanceUID`` and the nine class columns.

**Series choice (one plain series per patient).** The reads describe the patient's study, and
CQ500 studies hold several series (thin and thick plain, post-contrast, bone reconstructions,
reformats). The rule, applied in order:

1. drop localizer images, series that are not axial (normal more than 60 deg from the z axis),
   post-contrast series (description says CONTRAST, C+ or POST, unless it says PRE/NON/NO/
   WITHOUT CONTRAST; or a ContrastBolusAgent is recorded), bone/lung reconstructions (BONE or
   LUNG in description or kernel) and reformats (MPR, MIP, SAG, COR, 3D, VOLUME);
2. among the rest prefer "5 mm-ish" series (slice thickness 2.5-6 mm: SliceThickness, else the
   median gap along the normal), which match the paper's slice counts and cost a fraction of a
   thin series to extract; among those, or among all the rest when none is 5 mm-ish (the real
   demo subset: thin series only), take the one with the most slices; ties -> the smallest
   SeriesInstanceUID, so the choice is deterministic.

Every series not chosen gets one rejects row saying why.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.labels import CQ500_LABELS
from pipeline.data.scan_index import Reject, ScanIndex, ScanRecord
from pipeline.data.series import (
    SliceHeader,
    candidate_files,
    order_series,
    read_headers,
    read_scan_labels_csv,
    resolve_label_file,
    slice_refs,
    split_headers,
)

DEFAULT_LABELS = "reads.csv"
SLICE_LABELS = "slice_labels.csv"
READERS = ("R1", "R2", "R3")
THICK_RANGE_MM = (2.5, 6.0)
MIN_AXIAL_COS = 0.5  # |normal . z| below this: not an axial series

_NAME = re.compile(r"CQ500[\s_-]*CT[\s_-]*0*(\d+)", re.IGNORECASE)
_CONTRAST = re.compile(r"CONTRAST|C\+|\bPOST\b")
_NO_CONTRAST = re.compile(r"\b(PRE|NON|NO|WITHOUT|W/O)[\s_-]*CONTRAST")
_RECON = re.compile(r"\bBONE\b|\bLUNG\b|\bMPR\b|\bMIP\b|\bSAG|\bCOR(ONAL)?\b|\b3D\b|\bVOLUME\b")
_NO_AGENT = {"", "NONE", "NO", "N/A", "NA"}


def patient_name(text: str) -> str | None:
    """Canonical ``CQ500-CT-<n>`` from a folder name, reads.csv name or PatientID; None if no match."""
    match = _NAME.search(text)
    return f"CQ500-CT-{int(match.group(1))}" if match else None


def read_cq500_reads(path: str | Path) -> dict[str, list[float]]:
    """reads.csv -> {CQ500-CT-<n>: nine majority labels in `CQ500_LABELS` order}."""
    path = Path(path)
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        needed = ["name"] + [f"{r}:{label}" for label in CQ500_LABELS for r in READERS]
        missing = [c for c in needed if c not in columns]
        if missing:
            raise ValueError(
                f"{path}: not a CQ500 reads.csv, columns missing: {', '.join(missing[:6])}"
                + (" ..." if len(missing) > 6 else "")
            )
        labels = {}
        for line, row in enumerate(reader, start=2):
            name = patient_name(row["name"] or "")
            if name is None:
                raise ValueError(f"{path}, line {line}: name {row['name']!r} is not CQ500-CT-<n>")
            vector = []
            for label in CQ500_LABELS:
                votes = []
                for r in READERS:
                    cell = (row[f"{r}:{label}"] or "").strip()
                    if cell:
                        try:
                            votes.append(float(cell))
                        except ValueError as exc:
                            raise ValueError(
                                f"{path}, line {line}: {r}:{label} = {cell!r} is not 0/1"
                            ) from exc
                vector.append(1.0 if votes and 2 * sum(v >= 0.5 for v in votes) > len(votes) else 0.0)
            labels[name] = vector
    return labels


def read_slice_labels(path: Path) -> dict[str, list[int]]:
    """Optional slice-level truth: {SOPInstanceUID: nine labels}."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ["SOPInstanceUID", *CQ500_LABELS] if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: columns missing: {', '.join(missing)}")
        return {row["SOPInstanceUID"]: [int(float(row[c])) for c in CQ500_LABELS] for row in reader}


@dataclass
class SeriesCandidate:
    series_uid: str
    slices: list[SliceHeader]
    rejects: list[Reject]
    description: str
    thickness: float | None
    excluded: str | None = None


def _describe(members: list[SliceHeader]) -> str:
    first = members[0]
    return f"{first.series_description} {Path(first.path).parent.name}".upper()


def _thickness(slices: list[SliceHeader]) -> float | None:
    tags = [h.slice_thickness for h in slices if h.slice_thickness]
    if tags:
        return float(np.median(tags))
    positions = [h.position for h in slices if h.position is not None]
    if len(positions) >= 2:
        gaps = np.diff(sorted(positions))
        gaps = gaps[gaps > 0]
        return float(np.median(gaps)) if gaps.size else None
    return None


def exclusion_reason(candidate: SeriesCandidate) -> str | None:
    """Why a series can never be the plain scan (step 1 of the rule), or None."""
    if not candidate.slices:
        return "no usable slices"
    text = candidate.description
    agent = candidate.slices[0].contrast_agent.strip().upper()
    if (_CONTRAST.search(text) and not _NO_CONTRAST.search(text)) or agent not in _NO_AGENT:
        return "post-contrast series"
    kernel = candidate.slices[0].convolution_kernel.upper()
    if _RECON.search(text) or "BONE" in kernel or "LUNG" in kernel:
        return "bone/lung reconstruction or reformat"
    normal = candidate.slices[0].normal
    if normal is not None and abs(normal[2]) < MIN_AXIAL_COS:
        return "not an axial series"
    return None


def choose_series(candidates: list[SeriesCandidate]) -> SeriesCandidate | None:
    """Step 2 of the rule: 5 mm-ish first, then most slices, then smallest UID."""
    usable = [c for c in candidates if c.excluded is None]
    if not usable:
        return None
    low, high = THICK_RANGE_MM
    thick = [c for c in usable if c.thickness is not None and low <= c.thickness <= high]
    pool = thick or usable
    return min(pool, key=lambda c: (-len(c.slices), c.series_uid))


def _patient_order(name: str) -> tuple[int, str]:
    """CQ500-CT-2 before CQ500-CT-10; other names after, alphabetically."""
    match = _NAME.search(name)
    return (int(match.group(1)), "") if match else (1 << 30, name)


def build_cq500_index(
    root: Path,
    labels_csv: str | Path | None = None,
    *,
    scan_labels_csv: str | Path | None = None,
    workers: int | None = None,
    processes: bool = False,
    progress: bool | None = None,
    allow_modalities: list[str] | None = None,
) -> ScanIndex:
    """Index a CQ500-layout folder (see module docstring for the labels and the series rule)."""
    root = Path(root).resolve()
    labels_csv = resolve_label_file(root, labels_csv, scan_labels_csv, DEFAULT_LABELS, "CQ500 reads")
    index = ScanIndex(layout="cq500", root=str(root), label_names=list(CQ500_LABELS))
    reads = read_cq500_reads(labels_csv) if labels_csv is not None else {}
    table_key, table = read_scan_labels_csv(scan_labels_csv, CQ500_LABELS) if scan_labels_csv else ("", {})
    slice_truth = read_slice_labels(root / SLICE_LABELS) if (root / SLICE_LABELS).is_file() else None

    def name_of(header: SliceHeader) -> str | None:
        top = Path(header.path).relative_to(root).parts
        from_folder = patient_name(top[0]) if len(top) > 1 else None
        return from_folder or patient_name(header.patient_id) or (header.patient_id or None)

    headers = split_headers(
        read_headers(candidate_files(root), workers, processes, progress),
        index.rejects,
        scan_id_of=lambda h: "",
        allow_modalities=allow_modalities,
    )
    by_patient: dict[str, dict[str, list[SliceHeader]]] = defaultdict(lambda: defaultdict(list))
    for header in headers:
        name = name_of(header)
        if name is None:
            index.rejects.append(
                Reject(
                    path=header.path,
                    reason="cannot tell the patient: not under a CQ500CT<n> folder and no PatientID",
                )
            )
            continue
        by_patient[name][header.series_uid].append(header)

    def label_of(header: SliceHeader) -> list[int] | None:
        return None if slice_truth is None else slice_truth.get(header.sop_uid)

    for name in sorted(by_patient, key=_patient_order):
        candidates = []
        for series_uid, members in sorted(by_patient[name].items()):
            local: list[Reject] = []
            ordered = order_series(members, name, local)
            candidate = SeriesCandidate(series_uid, ordered, local, _describe(members), _thickness(ordered))
            candidate.excluded = exclusion_reason(candidate)
            candidates.append(candidate)
        chosen = choose_series(candidates)
        for candidate in candidates:
            if candidate is not chosen:
                reason = candidate.excluded or (
                    f"series not chosen: another plain series is preferred "
                    f"({len(candidate.slices)} slices, thickness {candidate.thickness})"
                )
                folder = str(Path(by_patient[name][candidate.series_uid][0].path).parent)
                index.rejects.append(
                    Reject(
                        path=folder, scan_id=name, reason=f"series {candidate.series_uid} left out: {reason}"
                    )
                )
        if chosen is None:
            index.rejects.append(
                Reject(path=str(root), scan_id=name, reason="no usable plain series for this patient")
            )
            continue
        index.rejects.extend(chosen.rejects)
        labels = table.get(name) if table_key == "patient_id" else None
        if labels is None and table:
            first = chosen.slices[0]
            labels = table.get(
                name
                if table_key == "scan_id"
                else first.series_uid
                if table_key == "series_uid"
                else first.study_uid
            )
        if labels is None:
            labels = reads.get(name)
        if labels is None:
            index.rejects.append(
                Reject(
                    path=str(root),
                    scan_id=name,
                    reason=f"no row for {name} in {labels_csv or scan_labels_csv}",
                )
            )
            continue
        first = chosen.slices[0]
        index.scans.append(
            ScanRecord(
                scan_id=name,
                patient_id=name,
                slices=slice_refs(chosen.slices, label_of),
                labels=list(labels),
                series_uid=chosen.series_uid,
                study_uid=first.study_uid,
            )
        )
    indexed = {scan.scan_id for scan in index.scans}
    for name in sorted(set(reads) - set(by_patient)):
        if name not in indexed:
            index.rejects.append(
                Reject(path=str(labels_csv), scan_id=name, reason="in reads.csv but no DICOM series found")
            )
    return index
