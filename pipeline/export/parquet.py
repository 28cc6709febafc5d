"""The ``parquet`` export: one row per slice, one row group per batch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cache.store import FEATURE_DIM, FeatureCache
from pipeline.export.common import Batch, Selection, _Temporary


class ParquetWriter(_Temporary):
    """One row per slice, one row group per batch (`pyarrow.parquet.ParquetWriter`).

    Columns: ``scan_id, patient_id`` (string), ``slice_index`` int32 (position in the scan, z
    order), ``z`` float64, ``sop_uid`` string, ``scan_label_<name>`` float32 (NaN unknown),
    ``slice_label_<name>`` int8 (-1 unknown), ``features_<res>`` fixed_size_list<halffloat>[512].
    The manifest header is in the schema metadata under ``drct_manifest``."""

    def __init__(self, out: Path, cache: FeatureCache, selection: Selection, header: dict):
        import pyarrow as pa
        import pyarrow.parquet as pq

        super().__init__(out)
        self.pa = pa
        self.table, self.selection = cache.table, selection
        self.label_names = list(cache.label_names)
        self.passes = [list(selection.resolutions)]
        fields = [
            pa.field("scan_id", pa.string()),
            pa.field("patient_id", pa.string()),
            pa.field("slice_index", pa.int32()),
            pa.field("z", pa.float64()),
            pa.field("sop_uid", pa.string()),
            *[pa.field(f"scan_label_{name}", pa.float32()) for name in self.label_names],
            *[pa.field(f"slice_label_{name}", pa.int8()) for name in self.label_names],
            *[pa.field(f"features_{res}", pa.list_(pa.float16(), FEATURE_DIM)) for res in selection.resolutions],
        ]
        self.schema = pa.schema(fields, metadata={"drct_manifest": json.dumps(header)})
        self.writer = pq.ParquetWriter(self.tmp, self.schema)

    def write(self, batch: Batch) -> None:
        pa, table = self.pa, self.table
        counts = table.n_slices[batch.scans].astype(np.int64)
        per_slice_scan = np.repeat(batch.scans, counts)
        columns = {
            "scan_id": pa.array(table.scan_id[per_slice_scan].tolist(), pa.string()),
            "patient_id": pa.array(table.patient_id[per_slice_scan].tolist(), pa.string()),
            "slice_index": pa.array(np.concatenate([np.arange(k, dtype=np.int32) for k in counts])),
            "z": pa.array(table.z[batch.rows]),
            "sop_uid": pa.array(table.sop_uid[batch.rows].tolist(), pa.string()),
        }
        scan_labels = table.labels[per_slice_scan]
        slice_labels = table.slice_labels[batch.rows]
        for k, name in enumerate(self.label_names):
            columns[f"scan_label_{name}"] = pa.array(scan_labels[:, k].astype(np.float32))
        for k, name in enumerate(self.label_names):
            columns[f"slice_label_{name}"] = pa.array(slice_labels[:, k].astype(np.int8))
        for res, vectors in batch.features.items():
            flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float16).reshape(-1))
            columns[f"features_{res}"] = pa.FixedSizeListArray.from_arrays(flat, FEATURE_DIM)
        self.writer.write_table(pa.table(columns, schema=self.schema))

    def close(self) -> None:
        self.writer.close()
        self._commit()

    def abort(self) -> None:
        self.writer.close()
        super().abort()
