"""Build the scan index of a DICOM tree: the dispatcher over the registered layouts.

`build_scan_index(root, layout)` calls the `index` of the layout registered as `layout`
(pipeline/data/layouts.py, the only list of layouts). What the readers share (header reading,
z order, label tables) lives in `pipeline.data.series`; this module reaches the readers through
the registry and nothing imports it back, so `pipeline.data` has no import circle.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data import layouts
from pipeline.data.dicom_io import ImageLimits
from pipeline.data.layout import IndexRequest
from pipeline.data.scan_index import ScanIndex
from pipeline.data.series import HEADER_BATCH, read_headers  # noqa: F401 - older import path


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

    layout: a registered layout (pipeline/data/layouts.py): ``rsna`` (labels_csv default
    root/stage_2_train.csv), ``cq500`` (default root/reads.csv), ``folder`` (one scan per
    SeriesInstanceUID, no labels). A missing label file for rsna/cq500 is an error with the path
    in the message. `scan_labels_csv` (rsna and cq500): a scan-level label table (see
    `read_scan_labels_csv`) that gives or overrides scan labels.
    `cq500_series` (all | one) and `cq500_bone`: the CQ500 cohort rule (pipeline/data/cq500.py).
    `allow_modalities`: the DICOM Modality values read (default CT only; see `check_modality`).
    `limits`: the image sizes read (``dataset.max_pixels``, ``dataset.min_size``; default
    `ImageLimits()`); others are rejected before any pixel is decoded.
    """
    root = Path(root).resolve()
    chosen = layouts.get(layout)  # ValueError naming the registered layouts
    if not root.is_dir():
        raise FileNotFoundError(f"DICOM root is not a folder: {root}")
    request = IndexRequest(labels_csv=labels_csv, scan_labels_csv=scan_labels_csv, cq500_series=cq500_series,
                           cq500_bone=cq500_bone, workers=workers, processes=processes, progress=progress,
                           allow_modalities=allow_modalities, limits=limits)
    index = chosen.index(root, request)
    index.label_names = list(chosen.label_names)
    return index
