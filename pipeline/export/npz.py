"""The ``npz`` export: one ``.npz`` readable by ``numpy.load`` (no pickle), written member by member."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from cache.store import FEATURE_DIM, FeatureCache
from pipeline.export.common import Batch, Selection, _Temporary, plan_batches


def _ascii(values) -> np.ndarray:
    """Strings -> a fixed-width bytes array (np.load reads it without pickle; DICOM UIDs and our
    ids are ASCII, and 'S' takes a quarter of the memory of numpy's UCS-4 unicode)."""
    encoded = [str(v).encode() for v in values]
    width = max([len(v) for v in encoded] + [1])
    return np.array(encoded, dtype=f"S{width}")


def _unicode(values) -> np.ndarray:
    values = [str(v) for v in values]
    width = max([len(v) for v in values] + [1])
    return np.array(values, dtype=f"<U{width}")


class NpzWriter(_Temporary):
    """One ``.npz`` written member by member (``numpy.load(out)`` reads it, no pickle).

    ``np.savez`` needs every array in memory at once, so the zip is written here: each ``.npy``
    header is written first (the shape is known from the scan table) and the rows follow batch by
    batch. A zip holds one open member at a time, so each feature array is its own pass over the
    cache. Members: ``features_<res>`` (n_slices, 512) float16; per scan ``scan_id, patient_id``
    (bytes), ``scan_offset`` i8, ``scan_n_slices`` i4, ``scan_labels`` (n_scans, C) f4 (NaN
    unknown); per slice ``slice_scan`` i4 (export index of its scan), ``slice_index`` i4,
    ``slice_z`` f8, ``slice_sop_uid`` (bytes), ``slice_labels`` (n_slices, C) i1 (-1 unknown);
    ``label_names`` (unicode), ``resolutions`` i4 and ``manifest.json`` (the manifest header)."""

    def __init__(self, out: Path, cache: FeatureCache, selection: Selection, header: dict,
                 chunk_rows: int = 65536):
        super().__init__(out)
        self.selection = selection
        self.passes = [[res] for res in selection.resolutions]
        self.archive = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self.stream = None
        self.stream_name = None
        table, scans = cache.table, selection.scans
        self._whole("scan_id", _ascii(table.scan_id[scans]))
        self._whole("patient_id", _ascii(table.patient_id[scans]))
        self._whole("scan_offset", selection.offset)
        self._whole("scan_n_slices", selection.n_slices)
        self._whole("scan_labels", table.labels[scans].astype(np.float32))
        self._whole("label_names", _unicode(cache.label_names))
        self._whole("resolutions", np.array(selection.resolutions, dtype=np.int32))
        self.archive.writestr("manifest.json", json.dumps(header, indent=1))
        # per-slice tables, streamed in row blocks (an RSNA export has ~750,000 rows)
        self.features_written: set[int] = set()
        n = selection.total_slices
        uid_width = max([len(str(u)) for u in table.sop_uid] + [1])
        blocks = list(plan_batches(selection, chunk_rows)) if n else []
        self._streamed("slice_scan", (n,), np.int32,
                       (np.repeat(p, selection.n_slices[p]) for p in blocks))
        self._streamed("slice_index", (n,), np.int32,
                       (np.concatenate([np.arange(k) for k in selection.n_slices[p]]) for p in blocks))
        self._streamed("slice_z", (n,), np.float64, (table.z[selection.slice_rows(p)] for p in blocks))
        self._streamed("slice_sop_uid", (n,), np.dtype(f"S{uid_width}"),
                       (np.array([str(u).encode() for u in table.sop_uid[selection.slice_rows(p)]],
                                 dtype=f"S{uid_width}") for p in blocks))
        self._streamed("slice_labels", (n, len(cache.label_names)), np.int8,
                       (table.slice_labels[selection.slice_rows(p)] for p in blocks))

    def _whole(self, name: str, array: np.ndarray) -> None:
        with self.archive.open(name + ".npy", "w", force_zip64=True) as stream:
            np.lib.format.write_array(stream, np.asarray(array), allow_pickle=False)

    def _open(self, name: str, shape: tuple[int, ...], dtype) -> None:
        self._close_stream()
        self.stream = self.archive.open(name + ".npy", "w", force_zip64=True)
        self.stream_name = name
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                  "shape": shape}
        np.lib.format.write_array_header_2_0(self.stream, header)

    def _close_stream(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
            self.stream_name = None

    def _streamed(self, name: str, shape: tuple[int, ...], dtype, blocks) -> None:
        self._open(name, shape, dtype)
        for block in blocks:
            self.stream.write(np.ascontiguousarray(block, dtype=dtype).tobytes())
        self._close_stream()

    def write(self, batch: Batch) -> None:
        (resolution, vectors), = batch.features.items()
        name = f"features_{resolution}"
        if self.stream_name != name:
            self._open(name, (self.selection.total_slices, FEATURE_DIM), np.float16)
            self.features_written.add(resolution)
        self.stream.write(np.ascontiguousarray(vectors, dtype=np.float16).tobytes())

    def close(self) -> None:
        self._close_stream()
        # a resolution whose pass had no batches (empty selection) still gets its empty array
        for resolution in self.selection.resolutions:
            if resolution not in self.features_written:
                self._whole(f"features_{resolution}", np.zeros((0, FEATURE_DIM), np.float16))
        self.archive.close()
        self._commit()

    def abort(self) -> None:
        self._close_stream()
        self.archive.close()
        super().abort()
