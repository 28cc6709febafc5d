"""Export rate and peak memory of `drct export` on an RSNA-sized synthetic cache.

    .venv/bin/python bench/export.py [--scans 21540] [--work DIR] [--formats npz,parquet,h5]

Builds a cache in the `cache.store` schema with RSNA's size (21,540 scans of 21-60 slices,
about 870,000 slices, two resolutions of float16 vectors: ~1.7 GB) written chunk by chunk, then
exports all of it once per format in a fresh child process and reports wall time, scans/s,
output size and the child's peak resident memory (ru_maxrss). The interesting figure is peak
memory against the size of the vectors: a streaming export holds the scan/slice tables plus one
batch, not the cache. A baseline child that only opens the cache and loads its tables shows how
much of the peak is the tables themselves.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cache.store import FEATURE_DIM, SCHEMA_VERSION, STR, encode_attr

LABELS = ["epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"]


def build_cache(path: Path, n_scans: int, resolutions=(224, 512), seed: int = 0, chunk: int = 65536) -> int:
    """Write a synthetic complete cache of `n_scans` RSNA-like scans; returns the slice count."""
    rng = np.random.default_rng(seed)
    n_slices = rng.integers(21, 61, size=n_scans).astype(np.int32)  # RSNA: 21-60 slices per scan
    total = int(n_slices.sum())
    offset = np.concatenate([[0], np.cumsum(n_slices)[:-1]]).astype(np.int64)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        attrs = {
            "schema_version": SCHEMA_VERSION, "encoder": "vgg16", "weights": "random:0", "weights_digest": "bench",
            "resolutions": list(resolutions), "windows": [[40, 80], [80, 200], [600, 2800]],
            "aps_source": "upsampled", "preprocess_version": 1, "software_version": "bench",
            "label_names": LABELS, "layout": "rsna", "data_root": "/synthetic",
        }
        for key, value in attrs.items():
            f.attrs[key] = encode_attr(value)
        f.create_dataset("scans/scan_id", data=np.array([f"ID_{i:08x}" for i in range(n_scans)], dtype=object), dtype=STR)
        f.create_dataset("scans/patient_id", data=np.array([f"P_{i // 2:08x}" for i in range(n_scans)], dtype=object),
                         dtype=STR)
        f.create_dataset("scans/labels", data=rng.integers(0, 2, (n_scans, len(LABELS))).astype(np.float32))
        f.create_dataset("scans/offset", data=offset)
        f.create_dataset("scans/n_slices", data=n_slices)
        f.create_dataset("slices/z", data=np.arange(total, dtype=np.float64) * 5.0)
        uid = np.array([f"1.2.826.0.1.3680043.8.498.{i}" for i in range(total)], dtype=object)
        f.create_dataset("slices/sop_uid", data=uid, dtype=STR)
        f.create_dataset("slices/path", data=np.array([f"ID_{i:09x}.dcm" for i in range(total)], dtype=object),
                         dtype=STR)
        del uid
        f.create_dataset("slices/labels", data=rng.integers(0, 2, (total, len(LABELS))).astype(np.int8))
        for res in resolutions:
            ds = f.create_dataset(f"features/{res}", shape=(total, FEATURE_DIM), dtype=np.float16,
                                  chunks=(min(total, 4096), FEATURE_DIM))
            for start in range(0, total, chunk):
                stop = min(total, start + chunk)
                ds[start:stop] = rng.standard_normal((stop - start, FEATURE_DIM), dtype=np.float32).astype(np.float16)
        f.attrs["complete"] = True
    os.replace(tmp, path)
    return total


def child(args: list[str]) -> tuple[float, float]:
    """Run a child python; return (wall seconds, peak RSS MiB) from wait4's rusage."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"child failed ({status}): {args}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=int, default=21540)
    parser.add_argument("--work", type=Path, default=Path("/tmp/drct-bench-export"))
    parser.add_argument("--formats", default="npz,parquet,h5")
    parser.add_argument("--batch-slices", type=int, default=8192)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic cache and exports")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.work / f"synthetic-{args.scans}.h5"
    if not cache.is_file():
        started = time.perf_counter()
        total = build_cache(cache, args.scans)
        print(f"built {cache} ({total} slices, {cache.stat().st_size / 2**30:.2f} GiB) "
              f"in {time.perf_counter() - started:.0f} s", flush=True)
    with h5py.File(cache, "r") as f:
        total = int(f["scans/n_slices"][:].sum())
        vectors_mib = sum(f[f"features/{r}"].size * 2 for r in f["features"]) / 2**20
    tables = f"from cache.store import FeatureCache; c = FeatureCache({str(cache)!r}); c.table"
    base_s, base_mib = child(["-c", tables])
    rows = [f"| tables only (open + load scan/slice tables) | {base_s:.1f} | - | - | {base_mib:.0f} |"]
    for fmt in args.formats.split(","):
        out = args.work / f"export.{fmt}"
        seconds, peak = child(["-m", "stages.cli", "export", str(cache), "--format", fmt, "--out", str(out),
                               "--batch-slices", str(args.batch_slices), "--quiet"])
        size = out.stat().st_size / 2**20
        rows.append(f"| {fmt} | {seconds:.1f} | {args.scans / seconds:.0f} | {size:.0f} | {peak:.0f} |")
        if not args.keep:
            out.unlink()
            Path(str(out) + ".manifest.json").unlink()
    print(f"\nsynthetic cache: {args.scans} scans, {total} slices, vectors {vectors_mib:.0f} MiB "
          f"(2 resolutions, float16), batch {args.batch_slices} slices")
    print("| export | wall s | scans/s | output MiB | peak RSS MiB |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    if not args.keep:
        shutil.rmtree(args.work)


if __name__ == "__main__":
    main()
