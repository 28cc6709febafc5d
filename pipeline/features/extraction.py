"""Stage one: scan index -> batches decoded and encoded on dask workers -> one crash-safe writer.

Why this shape: the encoder is the expensive part, so it must scale with the machines. Each
task is one planned batch (at most ``extract.batch_size`` slices of one commit unit): a dask
worker decodes it (DICOM -> HU -> windows -> resize), encodes it with the encoder it loaded once
on its own device (`pipeline.features.worker`), and sends back float16 vectors, 1 KB per slice
and resolution. Adding workers adds inference, not only decoding. This process is the single
writer: it keeps a bounded number of tasks in flight, consumes results in scan order and commits
units (see cache/writer.py for the commit protocol, resume and ordering).

Batches are planned from the scan index alone and never cross a commit unit, and each batch is
encoded as one forward per resolution wherever it runs; so the vectors of a unit do not depend
on what ran before it (a killed-and-resumed run equals an uninterrupted one) nor on where they
were computed (a cluster run equals an in-process run on the same device type and precision).

Modes: ``extract.workers: 0`` decodes and encodes in this process (no dask: tests, debugging);
``extract.encode_on: client`` lets the workers only decode and encodes here (one GPU in this
process fed by CPU workers; the behaviour before workers could encode).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cache.provenance import config_provenance
from cache.store import FEATURE_DIM, MB, CacheError, free_bytes
from cache.writer import PartsWriter, ScanFeatures, Unit, input_fingerprint
from pipeline.data.scan_index import Reject, ScanIndex, ScanRecord
from pipeline.features.adapt import adaptation_record
from pipeline.features.cluster import ClusterError, DaskExecutor, InlineExecutor, make_security
from pipeline.features.encoder import EncoderRunner, load_encoder, resolve_device, resolve_precision
from pipeline.features.preprocess import check_settings, transferred_resolutions
from pipeline.features.worker import (
    EncoderSpec,
    decode_and_encode,
    decode_only,
    decode_slices,
    encode_images,
    import_worker_modules,
    resolve_on_worker,
    setup_worker,
)
from pipeline.pseudonym import key_check, key_path, load_or_create_key, pseudonymise_index

# Seconds to sleep after each commit: lets crash tests kill a run between and during commits.
PAUSE_ENV = "DRCT_EXTRACT_PAUSE_AFTER_COMMIT"
ENCODE_ON = ("workers", "client")


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
    encode_seconds: float    # time inside this process's encoder (0 when the workers encode)
    wait_seconds: float      # time this process waited for task results
    up_to_date: bool = False
    where: str = ""          # where the tasks ran (this process, a local cluster, a scheduler)
    done_scans: int = 0      # scans this run encoded into the cache
    rejected_scans: int = 0  # scans of this run none of whose slices could be decoded


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def plan_tasks(index: ScanIndex, members: list[int], batch_size: int) -> list[list[tuple[int, int]]]:
    """The batches of one commit unit: its slices in index order, as (scan position, slice position),
    cut every `batch_size` slices. Depends on the index alone, so every mode encodes the same batches."""
    flat = [(i, k) for i in members for k in range(len(index.scans[i].slices))]
    return [flat[j : j + batch_size] for j in range(0, len(flat), batch_size)]


def _scan_dir(scan: ScanRecord) -> str:
    return str(Path(scan.slices[0].path).parent) if scan.slices else ""


def _setting(ex: dict, key: str, cast, minimum, default):
    value = ex.get(key, default)
    try:
        value = cast(value)
    except (TypeError, ValueError):
        raise CacheError(f"extract.{key} {value!r}: give a number") from None
    if value < minimum:
        raise CacheError(f"extract.{key} {value!r}: must be at least {minimum}")
    return value


def _check_workers(infos: dict, digest: str, precision: str) -> str:
    """Every worker's encoder must have this run's weights and precision, on one device type;
    returns a summary such as "2 workers: cpu fp32"."""
    if not infos:
        raise ClusterError("the dask cluster has no workers to encode on")
    for address, info in infos.items():
        if info["digest"] != digest:
            raise ClusterError(
                f"dask worker {address} ({info['host']}) loaded other weights (digest {info['digest'][:12]}, "
                f"this run {digest[:12]}): every worker must read the same weights file"
            )
    kinds = {(info["device"].split(":")[0], info["precision"]) for info in infos.values()}
    if len(kinds) > 1 or next(iter(kinds))[1] != precision:
        found = ", ".join(f"{a}: {i['device']} {i['precision']}" for a, i in sorted(infos.items()))
        raise ClusterError(
            f"the dask workers would not all encode alike (wanted {precision}; {found}); one cache holds "
            "vectors of one device type and precision: set --device and --precision explicitly"
        )
    names = sorted({f"{i['device_name']} {i['precision']}" for i in infos.values()})
    return f"{len(infos)} workers encode on {', '.join(names)}"


def run_extraction(index: ScanIndex, config: dict, *, progress: bool = True, log: Callable = _log) -> ExtractResult:
    """Extract every slice of every scan of `index` into the cache at config extract.out (resumable)."""
    ex = config["extract"]
    resolutions = [int(r) for r in ex["resolutions"]]
    windows = [[float(c), float(w)] for c, w in ex["windows"]]
    aps_source = str(ex["aps_source"])
    check_settings(resolutions, windows, aps_source)
    batch_size = _setting(ex, "batch_size", int, 1, 32)
    scans_per_commit = _setting(ex, "scans_per_commit", int, 1, 8)
    workers = _setting(ex, "workers", int, 0, 2)
    threads = _setting(ex, "threads_per_worker", int, 1, 1)
    worker_timeout = _setting(ex, "worker_timeout", float, 0.0, 120.0)
    encode_on = str(ex.get("encode_on", "workers"))
    if encode_on not in ENCODE_ON:
        raise CacheError(f"extract.encode_on {encode_on!r}: choose one of {', '.join(ENCODE_ON)}")
    scheduler = ex.get("scheduler") or None
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
    # What identifies each scan's inputs (size and mtime of every slice file): a scan whose files
    # changed, appeared or disappeared since it was extracted is extracted again on resume.
    fingerprints = {s.scan_id: input_fingerprint([sl.path for sl in s.slices], index.root) for s in index.scans}
    scan_order = [s.scan_id for s in index.scans]
    use_dask = scheduler is not None or workers > 0
    on_workers = use_dask and encode_on == "workers"
    spec = EncoderSpec(str(ex["weights"]), str(ex["device"]), str(ex["precision"]))
    security = make_security(ex.get("tls_ca"), ex.get("tls_cert"), ex.get("tls_key")) if scheduler else None

    encoder, digest = load_encoder(spec.weights)  # here too: the digest, and a bad spec fails before any cluster
    executor = None
    runner = None
    try:
        if scheduler:
            executor = DaskExecutor(scheduler, workers, threads=threads, worker_timeout=worker_timeout,
                                    security=security, log=log)
            executor.wait_for_workers()
        if on_workers and executor is not None:
            resolved = executor.run_on_workers(resolve_on_worker, spec.device, spec.precision)
            kinds = {(d.split(":")[0], p) for d, p in resolved.values()}
            if len(kinds) != 1:
                raise ClusterError(
                    f"the dask workers would not all encode alike ({', '.join(f'{d} {p}' for d, p in sorted(kinds))}); "
                    "one cache holds vectors of one device type and precision: set --device and --precision"
                )
            precision = next(iter(kinds))[1]
            device_text = "the workers' devices"
        elif on_workers:  # a local cluster: its workers see this machine's devices
            device = resolve_device(spec.device)
            precision = resolve_precision(spec.precision, device)
            device_text = f"{device} workers"
        else:
            device = resolve_device(spec.device)
            runner = EncoderRunner(encoder, device, spec.precision)
            precision = runner.precision
            device_text = str(device)
        provenance = {**config_provenance(ex), "weights_digest": digest, "precision": precision}
        adaptation = adaptation_record(spec.weights)
        if adaptation is not None:  # a `drct adapt` encoder: what it was tuned from and on (no scan list)
            provenance["adaptation"] = json.dumps({k: v for k, v in adaptation.items()
                                                   if k not in ("scan_ids", "sop_digests")}
                                                  | {"sidecar": str(Path(spec.weights + ".json").resolve())})
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
        with PartsWriter(out, manifest) as writer:
            todo = [i for i, s in enumerate(index.scans) if writer.needs(s.scan_id, fingerprints[s.scan_id])]
            changed = [index.scans[i].scan_id for i in todo if index.scans[i].scan_id in writer.done]
            skipped = len(index.scans) - len(todo)
            if not todo and writer.up_to_date(scan_order):
                writer.discard_parts()
                log(f"{out} is up to date: all {len(index.scans)} scans are in it")
                return ExtractResult(out, None, len(index.scans), 0, 0, skipped, 0.0, 0.0, 0.0, up_to_date=True)
            if changed:
                log(f"{len(changed)} scans changed since they were extracted (files edited, added or removed): "
                    "extracting them again")
            # Space: each slice is 1 KiB per resolution in the parts and again in the merged cache.
            all_slices = sum(len(s.slices) for s in index.scans)
            writer.job_bytes = int(all_slices * len(resolutions) * FEATURE_DIM * 2 * 2 * 1.1) + MB
            free = free_bytes(out.parent)
            if 0 <= free < writer.job_bytes:
                log(f"warning: {out.parent} has {free / MB:.0f} MB free; this extraction needs about "
                    f"{writer.job_bytes / MB:.0f} MB (parts, then the merged cache); it stops cleanly, "
                    "keeping what is committed, if the disk fills")
            if skipped:
                log(f"resuming: {skipped} of {len(index.scans)} scans already done, {len(todo)} to go")
            if executor is None and todo and use_dask:
                gpu = on_workers and resolve_device(spec.device).type == "cuda"
                executor = DaskExecutor(None, workers, threads=threads, gpu=gpu,
                                        worker_timeout=worker_timeout, log=log)
            elif executor is None:  # no dask, or nothing left but the merge
                executor = InlineExecutor()
            return _extract(index, todo, skipped, scan_order=scan_order, fingerprints=fingerprints, writer=writer,
                            executor=executor, runner=runner, spec=spec if on_workers else None, digest=digest,
                            precision=precision, device_text=device_text, resolutions=resolutions,
                            windows=windows, aps_source=aps_source, batch_size=batch_size,
                            scans_per_commit=scans_per_commit, progress=progress, log=log, weights=spec.weights)
    finally:
        if executor is not None:
            executor.close()


def _extract(index, todo, skipped, *, scan_order, fingerprints, writer, executor, runner, spec, digest, precision, device_text,
             resolutions, windows, aps_source, batch_size, scans_per_commit, progress, log, weights) -> ExtractResult:
    """The loop of `run_extraction`: tasks in flight, results in order, one commit per unit."""
    units: dict[int, list[int]] = {}
    for i in todo:
        units.setdefault(i // scans_per_commit, []).append(i)
    plans = {u: plan_tasks(index, members, batch_size) for u, members in units.items()}
    total_slices = sum(len(index.scans[i].slices) for i in todo)
    log(f"extracting {len(todo)} scans ({total_slices} slices) at {resolutions} px on {device_text} "
        f"({precision}), weights {weights}")
    pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
    if isinstance(executor, DaskExecutor):
        executor.run_on_workers(import_worker_modules)
        if spec is not None:
            log(_check_workers(executor.run_on_workers(setup_worker, spec, batch_size, resolutions, aps_source),
                               digest, precision))
    if runner is not None:
        runner.warm_up(batch_size, transferred_resolutions(resolutions, aps_source), resolutions, aps_source)
    log(f"tasks run on {executor.description}")
    wait_seconds = encode_seconds = 0.0
    n_encoded = n_rejected_scans = 0
    bar = tqdm(total=total_slices, unit="slice", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    queue: deque = deque(batch for u in plans for batch in plans[u])
    in_flight: deque = deque()

    def submit(slices: list[tuple[int, int]]):
        paths = [index.scans[i].slices[k].path for i, k in slices]
        if spec is not None:
            return executor.submit(decode_and_encode, paths, resolutions, windows, aps_source, spec)
        if isinstance(executor, DaskExecutor):
            return executor.submit(decode_only, paths, resolutions, windows, aps_source)
        return executor.submit(decode_slices, paths, resolutions, windows, aps_source)

    def vectors_of(result: dict) -> dict[int, np.ndarray]:
        nonlocal encode_seconds
        if "vectors" in result:
            _check_workers({f"pid {result['encoder']['pid']}": result["encoder"]}, digest, precision)
            return result["vectors"]
        t0 = time.perf_counter()
        vectors = encode_images(runner, result["images"], resolutions, aps_source)
        encode_seconds += time.perf_counter() - t0
        return vectors

    start = time.perf_counter()
    try:
        for u, members in units.items():
            max_in_flight = max(4, 2 * executor.n_slots)
            unit = Unit(first_index=members[0])
            kept: dict[int, list[int]] = {i: [] for i in members}
            features: dict[int, dict[int, list[np.ndarray]]] = {i: {r: [] for r in resolutions} for i in members}
            for _ in plans[u]:
                while queue and len(in_flight) < max_in_flight:
                    slices = queue.popleft()
                    in_flight.append((slices, submit(slices)))
                slices, future = in_flight.popleft()
                t0 = time.perf_counter()
                result = executor.result(future)
                wait_seconds += time.perf_counter() - t0
                scan_of = {index.scans[i].slices[k].path: i for i, k in slices}
                for path, reason in result["errors"]:
                    unit.rejects.append(Reject(path=path, reason=reason, scan_id=index.scans[scan_of[path]].scan_id))
                vectors = vectors_of(result)
                owners = np.array([slices[p][0] for p in result["kept"]], dtype=np.int64)
                for p in result["kept"]:
                    kept[slices[p][0]].append(slices[p][1])
                for i in dict.fromkeys(owners.tolist()):
                    for r in resolutions:
                        features[i][r].append(vectors[r][owners == i])
                n_encoded += len(result["kept"])
                bar.update(len(slices))
            for i in members:
                scan = index.scans[i]
                if not kept[i]:
                    n_rejected_scans += 1
                    unit.rejected_scan_ids.append(scan.scan_id)
                    unit.rejected_fingerprints.append(fingerprints[scan.scan_id])
                    unit.rejects.append(Reject(
                        path=_scan_dir(scan),
                        reason=f"scan rejected: none of its {len(scan.slices)} slices could be decoded",
                        scan_id=scan.scan_id,
                    ))
                    continue
                slices = [scan.slices[k] for k in kept[i]]
                unit.scans.append(ScanFeatures(
                    scan_id=scan.scan_id,
                    patient_id=scan.patient_id,
                    labels=scan.labels,
                    z=[s.z for s in slices],
                    sop_uids=[s.sop_uid for s in slices],
                    paths=[s.path for s in slices],
                    slice_labels=[s.labels for s in slices],
                    features={r: np.concatenate(features[i][r]) for r in resolutions},
                    fingerprint=fingerprints[scan.scan_id],
                ))
            writer.commit(unit)
            if pause:
                time.sleep(pause)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    executor.close()  # before the merge: a cluster's processes are not needed for it
    out_path, csv_path, n_rejects = writer.finish(scan_order, index.rejects)
    with_rate = f" ({n_encoded / seconds:.1f} slices/s)" if seconds > 0 and n_encoded else ""
    n_final = _count_scans(out_path)
    log(
        f"done: {n_encoded} slices of {len(todo)} scans encoded in {seconds:.1f} s{with_rate}; "
        f"cache {out_path} holds {n_final} scans; {n_rejects} rejects -> {csv_path}"
    )
    return ExtractResult(
        out_path, csv_path, n_final, n_encoded, n_rejects, skipped, seconds, encode_seconds, wait_seconds,
        where=executor.description, done_scans=len(todo) - n_rejected_scans, rejected_scans=n_rejected_scans,
    )


def _count_scans(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["scans/scan_id"].shape[0])
