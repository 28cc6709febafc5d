"""The scan index: what the readers produce and stage one consumes.

One `ScanRecord` per scan (a series of slices in z order with scan-level labels); slices or
scans that cannot be used become `Reject`s with a reason instead of stopping the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cache.rejects import REJECT_FIELDS, Reject, write_rejects  # noqa: F401 - re-exported for the readers


@dataclass
class SliceRef:
    """One DICOM slice of a scan. `labels` holds slice-level labels (0/1 per class) where the
    dataset has them (RSNA layout, phantom), else None."""

    path: str                      # absolute path of the DICOM file
    z: float                       # position along the slice normal (mm), or InstanceNumber as fallback
    sop_uid: str
    labels: list[int] | None = None


@dataclass
class ScanRecord:
    """One scan: slices sorted along the slice normal; `labels` is None where unknown (folder layout)."""

    scan_id: str
    patient_id: str
    slices: list[SliceRef]
    labels: list[float] | None = None
    series_uid: str = ""
    study_uid: str = ""


@dataclass
class ScanIndex:
    layout: str                    # rsna | cq500 | folder
    root: str
    label_names: list[str]
    scans: list[ScanRecord] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
