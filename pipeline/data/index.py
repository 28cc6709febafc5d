"""Build the scan index of a DICOM tree: the dispatcher over the three readers.

`build_scan_index(root, layout)` calls the RSNA, CQ500 or folder reader. What the readers
share (header reading, z order, label tables) lives in `pipeline.data.series`; this module
imports the readers and nothing imports it back, so `pipeline.data` has no import circle.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data.cq500 import build_cq500_index
from pipeline.data.dicom_io import ImageLimits
from pipeline.data.folder import build_folder_index
from pipeline.data.labels import LABELS_BY_LAYOUT
from pipeline.data.rsna import build_rsna_index
from pipeline.data.scan_index import ScanIndex
from pipeline.data.series import HEADER_BATCH, read_headers  # noqa: F401 - older import path

LAYOUTS = ("rsna", "cq500", "folder")


def build_scan_index(
    root: str | Path,
    layout: str,
    labels_csv: str | Path | None = None,
    *,
    scan_labels_csv: str | Path | None = None,
    workers: int | None = None,
    processes: bool = False,
    progress: bool | None = None,
    cq500_series: str = "all",
    cq500_bone: bool = False,
    allow_modalities: list[str] | None = None,
    limits: ImageLimits | None = None,
) -> ScanIndex:
    """Index a DICOM tree: one `ScanRecord` per scan (slices in z order, labels), plus rejects.

    layout: ``rsna`` (labels_csv default root/stage_2_train.csv), ``cq500`` (default
    root/reads.csv) or ``folder`` (one scan per SeriesInstanceUID, no labels). A missing label
    file for rsna/cq500 is an error with the path in the message. `scan_labels_csv` (rsna and
    cq500): a scan-level label table (see `read_scan_labels_csv`) that gives or overrides scan labels.
    `cq500_series` (all | one) and `cq500_bone`: the CQ500 cohort rule (pipeline/data/cq500.py).
    `allow_modalities`: the DICOM Modality values read (default CT only; see `check_modality`).
    `limits`: the image sizes read (``dataset.max_pixels``, ``dataset.min_size``; default
    `ImageLimits()`); others are rejected before any pixel is decoded.
    """
    root = Path(root).resolve()
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if not root.is_dir():
        raise FileNotFoundError(f"DICOM root is not a folder: {root}")
    options = {"workers": workers, "processes": processes, "progress": progress, "allow_modalities": allow_modalities,
               "limits": limits}
    if layout == "rsna":
        index = build_rsna_index(root, labels_csv, scan_labels_csv=scan_labels_csv, **options)
    elif layout == "cq500":
        index = build_cq500_index(root, labels_csv, scan_labels_csv=scan_labels_csv, series=cq500_series,
                                  bone=cq500_bone, **options)
    else:
        index = build_folder_index(root, **options)
    index.label_names = list(LABELS_BY_LAYOUT[layout])
    return index
