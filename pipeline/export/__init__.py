"""Batch export of cached slice vectors to NumPy (.npz), Parquet or a standalone HDF5 subset.

Researchers keep the feature cache for months and want its vectors in their own tools. This
module copies chosen scans (default all) at chosen resolutions (default all) out of a finished
cache (`cache.store.FeatureCache`) without changing a value: the float16 vectors are written as
float16 in every format, so an export compares bit-for-bit equal with the cache.

Memory is bounded: scans are read in batches of at most `batch_slices` slices (a scan is never
split), and each writer streams a batch to disk before the next one is read. A batch of 8,192
slices at two resolutions is 16 MiB of vectors, so an RSNA-sized cache (~750,000 slices, 1.5 GB
of vectors) exports with the scan/slice tables plus one batch in memory.

Formats (one writer class per format, each in its module: npz.py, parquet.py, h5.py; the selection,
batches, manifest and target checks they share are common.py; same three calls: `write(batch)`,
`close()`, `abort()`):

* ``npz``: one ``.npz`` file readable by ``numpy.load`` (no pickle needed). ``np.savez`` needs
  every array in memory, so `NpzWriter` writes the zip itself: the size of each array is known
  from the scan table, so it writes each ``.npy`` header first and then appends the rows batch by
  batch into the zip member (ZIP64, stored, not compressed, as ``np.savez`` does). The feature
  arrays are ``features_<res>`` (n_slices, 512) float16; the tables are unicode/number arrays;
  ``manifest.json`` is also a member.
* ``parquet``: one row per slice (``scan_id, patient_id, slice_index, z, sop_uid``, one
  ``scan_label_<name>`` float32 column (NaN unknown) and one ``slice_label_<name>`` int8 column
  (-1 unknown) per class, ``features_<res>`` as ``fixed_size_list<halffloat>[512]``), written with
  ``pyarrow.parquet.ParquetWriter`` one row group per batch. The manifest header (without the
  per-slice lists, which are columns) is in the file's key-value metadata under ``drct_manifest``.
* ``h5``: the same schema as the cache itself (`cache.store`), so `FeatureCache` opens the subset
  and every `drct` stage can read it; datasets are created at their final size and filled batch by
  batch, and the ``complete`` attribute is set last.

Nothing that is not an export is ever replaced (`check_target`): an existing ``--out`` is refused
unless ``overwrite``, and even then only an earlier export of the same format (its manifest beside
it says so) is replaced, never a label CSV, a DICOM file, a checkpoint or a cache; nothing is
written inside the cache's data root (its DICOM tree, recorded at extraction).

Every export is written under a temporary name and renamed into place when finished (a killed
export leaves no file that looks complete), and gets a sidecar manifest ``<out>.manifest.json``:
the scan ids in export order, per scan its slice count, offset in the export, z positions, SOP
instance UIDs and labels; label names, resolutions, the cache's provenance and where it came from.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cache.store import CacheError, FeatureCache
from pipeline.export.common import (
    FORMATS,
    MANIFEST_VERSION,
    SUFFIX,
    Batch,
    ExportError,
    ManifestWriter,
    Selection,
    check_target,
    manifest_header,
    manifest_path,
    plan_batches,
    quote_token,
    read_batches,
    read_manifest,
    scan_entry,
    select,
)
from pipeline.export.h5 import H5Writer
from pipeline.export.npz import NpzWriter
from pipeline.export.parquet import ParquetWriter

__all__ = ["FORMATS", "MANIFEST_VERSION", "SUFFIX", "WRITERS", "Batch", "ExportError", "ExportSummary", "H5Writer",
           "ManifestWriter", "NpzWriter", "ParquetWriter", "Selection", "cache_error_types", "check_target",
           "export_cache", "manifest_header", "manifest_path", "plan_batches", "quote_token", "read_batches",
           "read_manifest", "scan_entry", "select"]

WRITERS = {"npz": NpzWriter, "parquet": ParquetWriter, "h5": H5Writer}


@dataclass
class ExportSummary:
    out: Path
    manifest: Path
    format: str
    n_scans: int
    n_slices: int
    resolutions: list[int]
    seconds: float
    bytes: int

    @property
    def scans_per_second(self) -> float:
        return self.n_scans / self.seconds if self.seconds > 0 else float("inf")


def export_cache(
    cache_path: str | Path,
    out: str | Path,
    fmt: str,
    *,
    scan_ids: Sequence[str] | None = None,
    resolutions: Sequence[int] | None = None,
    batch_slices: int = 8192,
    progress: bool = True,
    overwrite: bool = False,
) -> ExportSummary:
    """Export `scan_ids` (None = all) at `resolutions` (None = all) of the cache at `cache_path`
    to `out` in format `fmt` (npz | parquet | h5), plus `<out>.manifest.json`. Streams: at most
    one batch of `batch_slices` slices of vectors is in memory. Raises ExportError / CacheError
    with a message for bad requests. `out` must not exist unless `overwrite`, and then must be an
    earlier export of format `fmt`; nothing is written inside the cache's data root (`check_target`)."""
    from tqdm import tqdm

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    cache = FeatureCache(cache_path)
    try:
        if out.resolve() == cache.path.resolve():
            raise ExportError(f"refusing to export {cache.path} onto itself")
        if out.is_dir():
            raise ExportError(f"--out {out} is a directory; give a file name, e.g. {out / ('features' + SUFFIX[fmt])}")
        check_target(out, fmt, overwrite, [cache.attrs.get("data_root")])
        selection = select(cache, scan_ids, resolutions)
        out.parent.mkdir(parents=True, exist_ok=True)
        header = manifest_header(cache, selection, fmt, out)
        started = time.perf_counter()
        writer = WRITERS[fmt](out, cache, selection, header)
        manifest = ManifestWriter(manifest_path(out), header)
        n_scans = len(selection.scans)
        bar = tqdm(total=n_scans * len(writer.passes), unit="scan", desc=f"export {fmt}",
                   disable=not progress, dynamic_ncols=True)
        try:
            for pass_resolutions in writer.passes:
                for batch in read_batches(cache, selection, pass_resolutions, batch_slices):
                    writer.write(batch)
                    bar.update(len(batch.scans))
            table = cache.table
            for position in range(n_scans):
                manifest.add(scan_entry(table, selection, position))
            writer.close()
            manifest.close()
        except BaseException:
            writer.abort()
            manifest.abort()
            raise
        finally:
            bar.close()
        seconds = time.perf_counter() - started
        return ExportSummary(out=out, manifest=manifest_path(out), format=fmt, n_scans=n_scans,
                             n_slices=selection.total_slices, resolutions=selection.resolutions,
                             seconds=seconds, bytes=out.stat().st_size)
    finally:
        cache.close()


def cache_error_types() -> tuple[type[Exception], ...]:
    """Errors `export_cache` raises for bad input (the CLI turns them into messages)."""
    return (ExportError, CacheError, OSError)
