"""Reader for the CQ500 layout (qure.ai head-CT study).

Layout: ``root/"CQ500CT<n> CQ500CT<n>"/<study>/<series>/*.dcm`` (files may sit at any depth under
the patient folder; series are told apart by SeriesInstanceUID, not by folder), and
``root/reads.csv`` with ``name,Category`` and, for readers R1..R3, ``R<k>:<finding>`` columns.

Labels: for each of the nine `CQ500_LABELS` the majority of the three readers (>= 2 of 3;
with blank reads, more than half of the readers who answered). ``name`` ``CQ500-CT-<n>`` matches
the patient folder ``CQ500CT<n> CQ500CT<n>`` (or, for files outside such a folder, the
PatientID). Optional slice-level truth (phantom only): ``root/slice_labels.csv`` with
``SOPInstanceUID`` and the nine class columns.

**Cohort (paper Table 1: 1181 scans of 490 patients, 32-396 slices each).** The reads describe
the patient's study, and CQ500 studies hold several series (thin and thick plain, post-contrast,
bone reconstructions, reformats). Step 1 drops, for every patient: localizer images, series that
are not axial (normal more than 60 deg from the z axis), post-contrast series (description says
CONTRAST, C+ or POST, unless it says PRE/NON/NO/WITHOUT CONTRAST; or a ContrastBolusAgent is
recorded), bone-kernel reconstructions (BONE in description or kernel), lung reconstructions and
reformats (LUNG, MPR, MIP, SAG, COR, 3D, VOLUME). Then, by ``series``:

* ``all`` (default, the paper's cohort): every remaining series is a scan, thin and thick. All
  scans of a patient carry the patient's reads and its ``patient_id``, so the folds keep them
  together. Scan ids: the series the ``one`` rule would choose is ``CQ500-CT-<n>`` (so a
  ``one`` index is a subset of an ``all`` index with the same ids); the patient's other series
  follow in the same preference order as ``CQ500-CT-<n>_s2``, ``_s3``, ...
* ``one``: one series per patient: prefer "5 mm-ish" series (slice thickness 2.5-6 mm:
  SliceThickness, else the median gap along the normal), which cost a fraction of a thin series
  to extract; among those, or among all the rest when none is 5 mm-ish (the real demo subset:
  thin series only), the one with the most slices; ties -> the smallest SeriesInstanceUID, so
  the choice is deterministic. ``scan_id`` is the patient name.

Bone-kernel series are left out by default (``bone=True`` keeps them): a bone reconstruction is
the same acquisition as a plain series of the study, re-filtered with a sharp kernel, so it is
not an independent scan; its reads are the study's, and it would enter the folds as a near
duplicate of a plain scan. The bone window (one of the three input channels) already shows
fractures on the plain series. A plain series is the one a brain-window reader (and the
paper's Fig. 2) looks at.

Every series left out gets one rejects row saying why. ``python -m pipeline.data.cq500 ROOT``
prints the cohort's counts (scans, patients, slice range) without extracting anything.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.dicom_io import ImageLimits
from pipeline.data.labels import CQ500_LABELS
from pipeline.data.layout import IndexRequest, Layout, top_names
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
_RECON = re.compile(r"\bLUNG\b|\bMPR\b|\bMIP\b|\bSAG|\bCOR(ONAL)?\b|\b3D\b|\bVOLUME\b")
_BONE = re.compile(r"\bBONE\b")
SERIES_RULES = ("all", "one")
_NO_AGENT = {"", "NONE", "NO", "N/A", "NA"}


def patient_name(text: str) -> str | None:
    """Canonical ``CQ500-CT-<n>`` from a folder name, reads.csv name or PatientID; None if no match."""
    match = _NAME.search(text)
    return f"CQ500-CT-{int(match.group(1))}" if match else None


def read_reader_votes(path: str | Path) -> tuple[list[str], np.ndarray]:
    """reads.csv -> (names CQ500-CT-<n> in file order, (n, len(READERS), 9) reads in `CQ500_LABELS`
    order: 1.0/0.0, NaN for a blank cell). The one parser of reads.csv (labels and reader evaluation)."""
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
        names, rows = [], []
        for line, row in enumerate(reader, start=2):
            name = patient_name(row["name"] or "")
            if name is None:
                raise ValueError(f"{path}, line {line}: name {row['name']!r} is not CQ500-CT-<n>")
            values = []
            for r in READERS:
                for label in CQ500_LABELS:
                    cell = (row[f"{r}:{label}"] or "").strip()
                    try:
                        values.append(float(float(cell) >= 0.5) if cell else np.nan)
                    except ValueError:
                        raise ValueError(f"{path}, line {line}: {r}:{label} = {cell!r} is not 0/1") from None
            names.append(name)
            rows.append(values)
    return names, np.asarray(rows, np.float64).reshape(len(rows), len(READERS), len(CQ500_LABELS))


def majority_vote(votes: np.ndarray) -> np.ndarray:
    """(n, R, C) reads -> (n, C): 1 when more than half of the readers who answered say 1 (0 if none did)."""
    answered = (~np.isnan(votes)).sum(axis=1)
    return (2 * np.nansum(votes, axis=1) > answered).astype(np.float64)


def read_cq500_reads(path: str | Path) -> dict[str, list[float]]:
    """reads.csv -> {CQ500-CT-<n>: nine majority labels in `CQ500_LABELS` order}."""
    names, votes = read_reader_votes(path)
    return {name: [float(v) for v in row] for name, row in zip(names, majority_vote(votes))}


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


def exclusion_reason(candidate: SeriesCandidate, bone: bool = False) -> str | None:
    """Why a series is never a scan of the cohort (step 1 of the rule), or None."""
    if not candidate.slices:
        return "no usable slices"
    text = candidate.description
    agent = candidate.slices[0].contrast_agent.strip().upper()
    if (_CONTRAST.search(text) and not _NO_CONTRAST.search(text)) or agent not in _NO_AGENT:
        return "post-contrast series"
    kernel = candidate.slices[0].convolution_kernel.upper()
    if not bone and (_BONE.search(text) or "BONE" in kernel):
        return "bone/lung reconstruction or reformat"
    if _RECON.search(text) or "LUNG" in kernel:
        return "bone/lung reconstruction or reformat"
    normal = candidate.slices[0].normal
    if normal is not None and abs(normal[2]) < MIN_AXIAL_COS:
        return "not an axial series"
    return None


def _preference(candidate: SeriesCandidate) -> tuple:
    low, high = THICK_RANGE_MM
    thick = candidate.thickness is not None and low <= candidate.thickness <= high
    return (not thick, -len(candidate.slices), candidate.series_uid)


def choose_series(candidates: list[SeriesCandidate]) -> SeriesCandidate | None:
    """The ``one`` rule: 5 mm-ish first, then most slices, then smallest UID."""
    ranked = rank_series(candidates)
    return ranked[0] if ranked else None


def rank_series(candidates: list[SeriesCandidate]) -> list[SeriesCandidate]:
    """The usable series (step 1) in preference order: the first is the ``one`` rule's choice."""
    return sorted((c for c in candidates if c.excluded is None), key=_preference)


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
    series: str = "all",
    bone: bool = False,
    allow_modalities: list[str] | None = None,
    limits: ImageLimits | None = None,
) -> ScanIndex:
    """Index a CQ500-layout folder (see module docstring for the labels and the series rule:
    `series` "all" or "one", `bone` keeps bone-kernel series)."""
    if series not in SERIES_RULES:
        raise ValueError(f"CQ500 series rule {series!r}: expected one of {', '.join(SERIES_RULES)}")
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
        read_headers(candidate_files(root, index.rejects), workers, processes, progress),
        index.rejects,
        scan_id_of=lambda h: "",
        allow_modalities=allow_modalities,
        limits=limits,
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
            candidate.excluded = exclusion_reason(candidate, bone)
            candidates.append(candidate)
        ranked = rank_series(candidates)
        kept = ranked if series == "all" else ranked[:1]
        for candidate in candidates:
            if not any(candidate is k for k in kept):
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
        if not kept:
            index.rejects.append(
                Reject(path=str(root), scan_id=name, reason="no usable plain series for this patient")
            )
            continue
        for number, chosen in enumerate(kept, start=1):
            scan_id = name if number == 1 else f"{name}_s{number}"
            first = chosen.slices[0]
            labels = table.get(name) if table_key == "patient_id" else None
            if labels is None and table:
                if table_key == "scan_id":
                    labels = table.get(scan_id, table.get(name))
                else:
                    labels = table.get(first.series_uid if table_key == "series_uid" else first.study_uid)
            if labels is None:
                labels = reads.get(name)
            if labels is None:
                index.rejects.append(
                    Reject(
                        path=str(root),
                        scan_id=scan_id,
                        reason=f"no row for {name} in {labels_csv or scan_labels_csv}",
                    )
                )
                continue
            index.rejects.extend(chosen.rejects)
            index.scans.append(
                ScanRecord(
                    scan_id=scan_id,
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


def cohort_summary(index: ScanIndex) -> dict:
    """Counts to compare with the paper's Table 1 (1181 scans, 490 patients, 32-396 slices)."""
    lengths = [len(scan.slices) for scan in index.scans]
    return {
        "scans": len(index.scans),
        "patients": len({scan.patient_id for scan in index.scans}),
        "min_slices": min(lengths, default=0),
        "max_slices": max(lengths, default=0),
        "slices": sum(lengths),
        "series_left_out": sum(1 for r in index.rejects if "left out" in r.reason),
    }


def detect(root: Path) -> bool:
    """A CQ500 tree: reads.csv or CQ500CT<n> patient folders at the top."""
    names = top_names(root)
    return DEFAULT_LABELS in names or any(n.upper().startswith("CQ500") for n in names)


def _index(root: Path, request: IndexRequest) -> ScanIndex:
    return build_cq500_index(root, request.labels_csv, scan_labels_csv=request.scan_labels_csv,
                             series=request.cq500_series, bone=request.cq500_bone, **request.reading())


LAYOUT = Layout(
    name="cq500",
    help="CQ500, CQ500CT<n> patient folders of series + reads.csv (three readers' study labels)",
    detect=detect,
    looks_like="this looks like CQ500 (reads.csv or CQ500CT<n> folders)",
    index=_index,
    label_names=tuple(CQ500_LABELS),
)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.data.cq500 ROOT [--series all|one] [--bone]``: the cohort's counts."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m pipeline.data.cq500", description=main.__doc__)
    parser.add_argument("root", type=Path, help="the unzipped CQ500 tree (with reads.csv)")
    parser.add_argument("--labels", default=None, help="reads.csv (default: ROOT/reads.csv)")
    parser.add_argument("--series", choices=SERIES_RULES, default="all")
    parser.add_argument("--bone", action="store_true", help="keep bone-kernel series")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"{args.root} is not a folder")
    try:
        index = build_cq500_index(args.root, args.labels, series=args.series, bone=args.bone, progress=False)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    print(json.dumps(cohort_summary(index)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
