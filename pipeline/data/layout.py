"""The dataset layout protocol (issue 18): what one module of pipeline/data/ defines so that a
DICOM tree can be read as `dataset.layout: NAME` / `drct extract --layout NAME`.

A layout module defines ``LAYOUT = Layout(...)``; its line in pipeline/data/layouts.py (the
registry, the only list of layouts) makes it selectable (CONTRIBUTING.md, "Add a dataset").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.data.dicom_io import ImageLimits
    from pipeline.data.scan_index import ScanIndex


@dataclass(frozen=True)
class IndexRequest:
    """What `build_scan_index` was asked, handed to a layout's `index(root, request)`; a layout
    uses what applies to it (the folder layout has no label file)."""

    labels_csv: str | Path | None = None        # the layout's label file; None: its default
    scan_labels_csv: str | Path | None = None   # scan-level label table (read_scan_labels_csv)
    cq500_series: str = "all"                   # CQ500 cohort rule (pipeline/data/cq500.py)
    cq500_bone: bool = False
    workers: int | None = None
    processes: bool = False
    progress: bool | None = None
    allow_modalities: list[str] | None = None
    limits: ImageLimits | None = None

    def reading(self) -> dict:
        """The header-reading keywords every reader takes (workers ... limits)."""
        return {"workers": self.workers, "processes": self.processes, "progress": self.progress,
                "allow_modalities": self.allow_modalities, "limits": self.limits}


@dataclass(frozen=True)
class Layout:
    """One dataset layout.

    * `detect(root) -> bool`: whether the tree at root looks like this layout (cheap: file names,
      no DICOM read); the guesser asks the layouts in registry order and takes the first yes,
      saying `looks_like` as its reason.
    * `index(root, request) -> ScanIndex`: one ScanRecord per scan (slices in z order), rejects
      with reasons; root is resolved and is a folder.
    * `label_names`: the class names of its labels, in column order (() for unlabelled data).
    * `help`: one line for ``--layout``'s --help: what such a tree holds.
    """

    name: str
    help: str
    detect: Callable[[Path], bool]
    looks_like: str
    index: Callable[[Path, IndexRequest], ScanIndex]
    label_names: Sequence[str] = ()


def top_names(root: str | Path) -> list[str]:
    """The names directly under root ([] where root is no folder): what a `detect` looks at."""
    root = Path(root)
    return [p.name for p in root.iterdir()] if root.is_dir() else []
