"""Stage one: scan index -> parallel decoding (dask) -> batched frozen VGG16 -> crash-safe cache.

Why this shape: the encoder is the expensive part and wants full batches on one device; DICOM
decoding, HU conversion, windowing and resizing are per-file CPU work that parallelises across
processes (or machines). So decoding runs as one dask task per scan (`decode_scan`) on a
``dask.distributed`` cluster -- a LocalCluster of ``extract.workers`` processes by default, or an
existing scheduler given by address -- and sends back small float16 images (only the first
resolution for ``aps_source: upsampled``; the zoom-in upsampling runs on the encoder's device).
The main process keeps a bounded number of scan tasks in flight and encodes finished ones while
the workers decode the next, so decoding and I/O hide behind inference.

Results are consumed in scan order and batched within a commit unit only, so the vectors of a
unit do not depend on what ran before it: a killed-and-resumed run equals an uninterrupted one
(see cache/writer.py for the commit protocol).

``extract.workers: 0`` decodes in the main process (no dask): for tests and debugging.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cache.store import FEATURE_DIM, MB, CacheError, free_bytes
from cache.writer import PartsWriter, ScanFeatures, Unit, input_fingerprint
from pipeline.data.scan_index import Reject, ScanIndex, ScanRecord
from pipeline.features.encoder import EncoderRunner, load_encoder, resolve_device
from pipeline.features.preprocess import (
    check_settings,
    model_input,
    transferred_resolutions,
    window_and_resize,
)
from pipeline.features.provenance import config_provenance
from pipeline.pseudonym import key_check, key_path, load_or_create_key, pseudonymise_index

# Seconds to sleep after each commit: lets crash tests kill a run between and during commits.
PAUSE_ENV = "DRCT_EXTRACT_PAUSE_AFTER_COMMIT"


# -- the worker side -----------------------------------------------------------------------
def decode_scan(
    paths: Sequence[str],
    resolutions: Sequence[int],
    windows: Sequence[Sequence[float]],
    aps_source: str,
    single_thread: bool = True,
) -> dict:
    """Decode and preprocess one scan's slices (runs in a dask worker).

    Returns {"kept": [slice positions decoded], "errors": [(path, reason)],
    "images": {resolution: (n_kept, 3, r, r) float16 in [0, 1]}}. A slice that cannot be
    decoded (`SliceError`, or any other failure of the reader) is reported, never raised.
    """
    from pipeline.data.dicom_io import SliceError, read_hu

    if single_thread:
        torch.set_num_threads(1)
    sent = transferred_resolutions(resolutions, aps_source)
    images: dict[int, list[np.ndarray]] = {r: [] for r in sent}
    kept, errors = [], []
    for position, path in enumerate(paths):
        try:
            hu = read_hu(path)
            windowed = window_and_resize(hu, resolutions, windows, aps_source)
        except SliceError as exc:
            errors.append((path, f"pixels not decodable: {exc}"))
            continue
        except Exception as exc:  # noqa: BLE001 - a bad file never stops a run
            errors.append((path, f"pixels not decodable: {type(exc).__name__}: {exc}"))
            continue
        kept.append(position)
        for r in sent:
            images[r].append(windowed[r].numpy())
    stacked = {
        r: (np.stack(images[r]) if images[r] else np.zeros((0, 3, r, r), np.float16)) for r in sent
    }
    return {"kept": kept, "errors": errors, "images": stacked}


def _import_worker_modules() -> None:
    import pipeline.data.dicom_io
    import pipeline.features.preprocess  # noqa: F401


# -- executors -----------------------------------------------------------------------------
class _InlineFuture:
    def __init__(self, fn: Callable, args: tuple):
        self.fn, self.args = fn, args

    def result(self):
        return self.fn(*self.args)


class InlineExecutor:
    """workers = 0: decode in the main process when the result is asked for (no parallelism)."""

    description = "in-process decoding"

    def submit(self, fn: Callable, *args):
        return _InlineFuture(fn, args[:-1] + (False,))  # never change the main process's torch threads

    def close(self) -> None:
        pass


class DaskExecutor:
    """A dask.distributed client: a LocalCluster of `workers` processes, or the scheduler at `address`."""

    def __init__(self, address: str | None, workers: int):
        from dask.distributed import Client, LocalCluster

        self.cluster = None
        if address:
            try:
                self.client = Client(address, timeout="20s")
            except OSError as exc:
                raise CacheError(f"cannot reach the dask scheduler at {address}: {exc}") from None
            n = len(self.client.scheduler_info().get("workers", {}))
            self.description = f"dask scheduler {address} ({n} workers)"
            self.n_workers = max(1, n)
        else:
            with warnings.catch_warnings():  # "port 8787 in use" of the (disabled) dashboard's HTTP server
                warnings.simplefilter("ignore", UserWarning)
                self.cluster = LocalCluster(
                    n_workers=workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                    silence_logs=logging.ERROR,
                )
            self.client = Client(self.cluster)
            self.description = f"local dask cluster ({workers} worker processes)"
            self.n_workers = workers

    def warm_up(self) -> None:
        """Import the decoding stack on every worker before the clock starts (torch import takes seconds).

        Workers of a remote cluster need this package installed and the DICOM paths readable."""
        try:
            self.client.run(_import_worker_modules)
        except ImportError as exc:
            raise CacheError(
                f"the dask workers cannot import the pipeline ({exc}); install this package on every worker"
            ) from None

    def submit(self, fn: Callable, *args):
        return self.client.submit(fn, *args, pure=False)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def make_executor(scheduler: str | None, workers: int):
    if scheduler:
        return DaskExecutor(scheduler, workers)
    if int(workers) < 0:
        raise CacheError(f"extract.workers {workers}: give 0 (in-process decoding) or a positive number")
    return InlineExecutor() if int(workers) == 0 else DaskExecutor(None, int(workers))


# -- the main process ------------------------------------------------------------------------
@dataclass
class ExtractResult:
    out: Path
    rejects_csv: Path | None
    n_scans: int             # scans in the finished cache
    n_slices: int            # slices encoded by this run
    n_rejects: int
    skipped_scans: int       # already done before this run (resume)
    seconds: float           # wall time of the extraction loop (after startup)
    encode_seconds: float    # time inside the encoder (incl. host<->device copies)
    wait_seconds: float      # time the encoder waited for decoded slices
    up_to_date: bool = False


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Batcher:
    """Collects decoded images of one commit unit and encodes them in batches of `batch_size`."""

    def __init__(self, runner: EncoderRunner, resolutions: list[int], aps_source: str, batch_size: int):
        self.runner, self.resolutions, self.aps_source = runner, resolutions, aps_source
        self.batch_size = batch_size
        self.pending: dict[int, list[np.ndarray]] = {}
        self.n_pending = 0
        self.outputs: dict[int, list[np.ndarray]] = {r: [] for r in resolutions}
        self.encode_seconds = 0.0

    def add(self, images: dict[int, np.ndarray]) -> int:
        if not len(next(iter(images.values()))):
            return 0
        for r, array in images.items():
            self.pending.setdefault(r, []).append(array)
        self.n_pending += len(next(iter(images.values())))
        done = 0
        while self.n_pending >= self.batch_size:
            done += self._encode(self.batch_size)
        return done

    def flush(self) -> int:
        return self._encode(self.n_pending) if self.n_pending else 0

    def _encode(self, n: int) -> int:
        start = time.perf_counter()
        batch = {}
        for r, arrays in self.pending.items():
            stacked = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
            batch[r] = torch.from_numpy(stacked[:n]).to(self.runner.device, non_blocking=True)
            self.pending[r] = [stacked[n:]] if len(stacked) > n else []
        self.n_pending -= n
        for r in self.resolutions:
            x = model_input(batch, r, self.resolutions, self.aps_source)
            self.outputs[r].append(self.runner(x).numpy().astype(np.float16))
        self.encode_seconds += time.perf_counter() - start
        return n

    def take(self) -> dict[int, np.ndarray]:
        """The unit's vectors per resolution, in slice order; resets for the next unit."""
        out = {
            r: (np.concatenate(v) if v else np.zeros((0, 512), np.float16)) for r, v in self.outputs.items()
        }
        self.outputs = {r: [] for r in self.resolutions}
        return out


def _scan_dir(scan: ScanRecord) -> str:
    return str(Path(scan.slices[0].path).parent) if scan.slices else ""


def run_extraction(index: ScanIndex, config: dict, *, progress: bool = True, log: Callable = _log) -> ExtractResult:
    """Extract every slice of every scan of `index` into the cache at config extract.out (resumable)."""
    ex = config["extract"]
    resolutions = [int(r) for r in ex["resolutions"]]
    windows = [[float(c), float(w)] for c, w in ex["windows"]]
    aps_source = str(ex["aps_source"])
    check_settings(resolutions, windows, aps_source)
    batch_size = int(ex["batch_size"])
    scans_per_commit = int(ex["scans_per_commit"])
    decode_chunk = max(1, int(ex.get("decode_chunk", 16)))
    if batch_size < 1 or scans_per_commit < 1:
        raise CacheError("extract.batch_size and extract.scans_per_commit must be at least 1")
    if not index.scans:
        raise CacheError(f"no scans found under {index.root} (layout {index.layout}); nothing to extract")
    out = Path(ex["out"])
    ids, id_key = "kept", ""
    dataset = config.get("dataset") or {}
    if not dataset.get("keep_ids", False):
        # No PatientID in the cache, and so in nothing made from it (runs, exports, reports).
        key = load_or_create_key(key_path(index.root, dataset.get("pseudonym_key")))
        index = pseudonymise_index(index, key)
        ids, id_key = "pseudonymised", key_check(key)

    device = resolve_device(ex["device"])
    encoder, digest = load_encoder(ex["weights"])
    runner = EncoderRunner(encoder, device, str(ex["precision"]))
    provenance = {**config_provenance(ex), "weights_digest": digest, "precision": runner.precision}
    manifest = {
        "provenance": provenance,
        "label_names": list(index.label_names),
        "layout": index.layout,
        "data_root": str(Path(index.root).resolve()),
        "ids": ids,
        "id_key": id_key,
        "n_scans": len(index.scans),
        "scan_ids": [s.scan_id for s in index.scans],
    }
    scan_order = [s.scan_id for s in index.scans]
    pause = float(os.environ.get(PAUSE_ENV, "0") or 0)

    # What identifies each scan's inputs (size and mtime of every slice file): a scan whose files
    # changed, appeared or disappeared since it was extracted is extracted again on resume.
    fingerprints = {s.scan_id: input_fingerprint([sl.path for sl in s.slices], index.root) for s in index.scans}

    with PartsWriter(out, manifest) as writer:
        changed = [s.scan_id for s in index.scans if s.scan_id in writer.done and writer.needs(s.scan_id, fingerprints[s.scan_id])]
        todo = [i for i, s in enumerate(index.scans) if writer.needs(s.scan_id, fingerprints[s.scan_id])]
        skipped = len(index.scans) - len(todo)
        if not todo and writer.up_to_date(scan_order):
            writer.discard_parts()
            log(f"{out} is up to date: all {len(index.scans)} scans are in it")
            return ExtractResult(out, None, len(index.scans), 0, 0, skipped, 0.0, 0.0, 0.0, up_to_date=True)
        if changed:
            log(f"{len(changed)} scans changed since they were extracted (files edited, added or removed): "
                f"extracting them again")
        if skipped:
            log(f"resuming: {skipped} of {len(index.scans)} scans already done, {len(todo)} to go")
        # Space: each slice is 1 KiB per resolution in the parts and again in the merged cache.
        all_slices = sum(len(s.slices) for s in index.scans)
        writer.job_bytes = int(all_slices * len(resolutions) * FEATURE_DIM * 2 * 2 * 1.1) + MB
        free = free_bytes(out.parent)
        if 0 <= free < writer.job_bytes:
            log(f"warning: {out.parent} has {free / MB:.0f} MB free; this extraction needs about "
                f"{writer.job_bytes / MB:.0f} MB (parts, then the merged cache); it stops cleanly, "
                "keeping what is committed, if the disk fills")
        units: dict[int, list[int]] = {}
        for i in todo:
            units.setdefault(i // scans_per_commit, []).append(i)
        total_slices = sum(len(index.scans[i].slices) for i in todo)
        log(
            f"extracting {len(todo)} scans ({total_slices} slices) at {resolutions} px on {device} "
            f"({runner.precision}), weights {ex['weights']}"
        )
        start = time.perf_counter()
        wait_seconds = 0.0
        n_encoded = 0
        executor = make_executor(ex.get("scheduler"), int(ex["workers"])) if todo else None
        if isinstance(executor, DaskExecutor):
            executor.warm_up()
        batcher = _Batcher(runner, resolutions, aps_source, batch_size)
        if executor is not None:
            log(f"decoding with {executor.description}")
        bar = tqdm(total=total_slices, unit="slice", file=sys.stderr, disable=not progress, dynamic_ncols=True)
        try:
            # Work items: chunks of at most decode_chunk slices, so that decoding pipelines within a
            # scan too and one long scan does not leave the encoder idle.
            queue: deque = deque()
            for i in todo:
                paths = [s.path for s in index.scans[i].slices]
                for first in range(0, max(1, len(paths)), decode_chunk):
                    queue.append((i, first, paths[first : first + decode_chunk]))
            in_flight: deque = deque()
            max_in_flight = max(4, 4 * getattr(executor, "n_workers", 1))

            def refill() -> None:
                while queue and len(in_flight) < max_in_flight:
                    i, first, paths = queue.popleft()
                    future = executor.submit(decode_scan, paths, resolutions, windows, aps_source, True)
                    in_flight.append((i, first, future))

            runner.warm_up(batch_size, transferred_resolutions(resolutions, aps_source), resolutions, aps_source)
            start = time.perf_counter()
            for members in units.values():
                unit = Unit(first_index=members[0])
                kept_scans: list[tuple[ScanRecord, list[int]]] = []
                for i in members:
                    scan = index.scans[i]
                    kept: list[int] = []
                    for _ in range(0, max(1, len(scan.slices)), decode_chunk):
                        refill()
                        j, first, future = in_flight.popleft()
                        assert j == i
                        t0 = time.perf_counter()
                        decoded = future.result()
                        wait_seconds += time.perf_counter() - t0
                        for path, reason in decoded["errors"]:
                            unit.rejects.append(Reject(path=path, reason=reason, scan_id=scan.scan_id))
                        bar.update(len(decoded["errors"]))
                        if decoded["kept"]:
                            kept.extend(first + k for k in decoded["kept"])
                            done = batcher.add(decoded["images"])
                            n_encoded += done
                            bar.update(done)
                    if not kept:
                        unit.rejected_scan_ids.append(scan.scan_id)
                        unit.rejected_fingerprints.append(fingerprints[scan.scan_id])
                        unit.rejects.append(
                            Reject(
                                path=_scan_dir(scan),
                                reason=f"scan rejected: none of its {len(scan.slices)} slices could be decoded",
                                scan_id=scan.scan_id,
                            )
                        )
                        continue
                    kept_scans.append((scan, kept))
                done = batcher.flush()
                n_encoded += done
                bar.update(done)
                vectors = batcher.take()
                row = 0
                for scan, kept in kept_scans:
                    rows = slice(row, row + len(kept))
                    row += len(kept)
                    slices = [scan.slices[k] for k in kept]
                    unit.scans.append(
                        ScanFeatures(
                            scan_id=scan.scan_id,
                            patient_id=scan.patient_id,
                            labels=scan.labels,
                            z=[s.z for s in slices],
                            sop_uids=[s.sop_uid for s in slices],
                            paths=[s.path for s in slices],
                            slice_labels=[s.labels for s in slices],
                            features={r: vectors[r][rows] for r in resolutions},
                            fingerprint=fingerprints[scan.scan_id],
                        )
                    )
                writer.commit(unit)
                if pause:
                    time.sleep(pause)
        finally:
            bar.close()
            if executor is not None:
                executor.close()
        seconds = time.perf_counter() - start
        out_path, csv_path, n_rejects = writer.finish(scan_order, index.rejects)
    with_rate = f" ({n_encoded / seconds:.1f} slices/s)" if seconds > 0 and n_encoded else ""
    n_final = _count_scans(out_path)
    log(
        f"done: {n_encoded} slices of {len(todo)} scans encoded in {seconds:.1f} s{with_rate}; "
        f"cache {out_path} holds {n_final} scans; {n_rejects} rejects -> {csv_path}"
    )
    return ExtractResult(
        out_path, csv_path, n_final, n_encoded, n_rejects, skipped, seconds, batcher.encode_seconds, wait_seconds
    )


def _count_scans(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["scans/scan_id"].shape[0])
