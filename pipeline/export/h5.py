"""The ``h5`` export: a standalone feature cache of the selected scans, in the cache's own schema."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from cache.store import FEATURE_DIM, STR, FeatureCache, encode_attr, strings_digest
from pipeline.export.common import Batch, Selection, _Temporary


class H5Writer(_Temporary):
    """A standalone cache holding the selected scans, in the cache's own schema (`cache.store`),
    so `FeatureCache` and every `drct` stage open it. Datasets are created at their final size
    and filled batch by batch; the cache's attributes (provenance, label names, layout) are
    copied, ``export_of`` names the source, and ``complete`` is set last."""

    def __init__(self, out: Path, cache: FeatureCache, selection: Selection, header: dict):
        super().__init__(out)
        self.table, self.selection = cache.table, selection
        self.passes = [list(selection.resolutions)]
        table, scans = cache.table, selection.scans
        n, c = selection.total_slices, len(cache.label_names)
        self.file = h5py.File(self.tmp, "w")
        f = self.file
        for key, value in cache.attrs.items():
            if key not in ("complete", "resolutions"):
                f.attrs[key] = encode_attr(value)
        f.attrs["resolutions"] = encode_attr(list(selection.resolutions))
        f.attrs["export_of"] = str(cache.path.resolve())
        f.create_dataset("scans/scan_id", data=np.array(list(table.scan_id[scans]), dtype=object), dtype=STR)
        f.create_dataset("scans/patient_id", data=np.array(list(table.patient_id[scans]), dtype=object), dtype=STR)
        # Checksums as in the cache (cache/store.py): Fletcher32 on numbers, sha256 on strings (at close).
        f.create_dataset("scans/labels", data=table.labels[scans].astype(np.float32).reshape(len(scans), c),
                         fletcher32=True)
        f.create_dataset("scans/offset", data=selection.offset, fletcher32=True)
        f.create_dataset("scans/n_slices", data=selection.n_slices, fletcher32=True)
        f.create_dataset("slices/z", shape=(n,), dtype=np.float64, fletcher32=True)
        f.create_dataset("slices/sop_uid", shape=(n,), dtype=STR)
        f.create_dataset("slices/path", shape=(n,), dtype=STR)
        f.create_dataset("slices/labels", shape=(n, c), dtype=np.int8, fletcher32=True)
        chunks = (max(1, min(n, 4096)), FEATURE_DIM) if n else None
        for res in selection.resolutions:
            f.create_dataset(f"features/{res}", shape=(n, FEATURE_DIM), dtype=np.float16, chunks=chunks,
                             fletcher32=True)

    def write(self, batch: Batch) -> None:
        f, table, dest = self.file, self.table, batch.dest
        f["slices/z"][dest] = table.z[batch.rows]
        f["slices/sop_uid"][dest] = np.array(list(table.sop_uid[batch.rows]), dtype=object)
        f["slices/path"][dest] = np.array(list(table.path[batch.rows]), dtype=object)
        f["slices/labels"][dest] = table.slice_labels[batch.rows]
        for res, vectors in batch.features.items():
            f[f"features/{res}"][dest] = vectors

    def close(self) -> None:
        for name in ("scans/scan_id", "scans/patient_id", "slices/sop_uid", "slices/path"):
            self.file[name].attrs["sha256"] = strings_digest(self.file[name][()])
        self.file.attrs["complete"] = True
        self.file.flush()
        self.file.close()
        self._commit()

    def abort(self) -> None:
        try:
            self.file.close()
        finally:
            super().abort()
