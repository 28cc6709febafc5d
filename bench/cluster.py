"""Stage one on dask: does adding encoding workers add throughput, and what crosses the network?

In one run, on a small phantom (real 16-bit DICOM), random:0 weights (ImageNet FLOPs, no download):

* slices/s of `run_extraction` with in-process encoding (workers: 0), with the workers only
  decoding and this process encoding (``encode_on: client``, the behaviour before workers could
  encode), and with 1 and 2 encoding workers (x threads) on a local cluster;
* bytes between client and workers per slice, before (a decode task's result: float16 images)
  and after (an encode task's result: float16 vectors) at the product resolutions 224+512 for both
  aps sources, measured as dask's own serialisation of one task's arguments and result.

Rates are taken without startup (cluster, model load, warm-up); each setup runs --repeats times,
interleaved with the others, and the median is reported. Run:
    .venv/bin/python bench/cluster.py [--scans 1 --size 128 --resolutions 64,128 --repeats 3]
Markdown tables go to stdout (paste into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch


def wire_bytes(obj) -> int:
    """Bytes dask sends for `obj` (its serialisation frames, as on the wire)."""
    from distributed.protocol import serialize_bytelist

    return sum(len(memoryview(frame).cast("B")) for frame in serialize_bytelist(obj))


def bytes_per_slice(paths: list[str], windows, weights: str) -> list[tuple[str, float, float, float]]:
    """(aps source, arguments, decode result, encode result) in bytes per slice at 224+512."""
    from pipeline.features.worker import EncoderSpec, decode_and_encode, decode_only

    rows = []
    resolutions = [224, 512]
    spec = EncoderSpec(weights, "cpu", "fp32")
    for aps_source in ("upsampled", "native"):
        n = len(paths)
        args = wire_bytes((paths, resolutions, windows, aps_source, spec)) / n
        before = wire_bytes(decode_only(paths, resolutions, windows, aps_source)) / n
        after = wire_bytes(decode_and_encode(paths, resolutions, windows, aps_source, spec)) / n
        rows.append((aps_source, args, before, after))
    return rows


def cpu_seconds_per_slice(paths: list[str], windows, weights: str, resolutions: list[int]) -> float:
    """CPU seconds one worker task spends per slice (decode + encode, one torch thread): the
    per-core cost, which CPU time measures even on a loaded machine where wall-clock rates drift."""
    from pipeline.features.worker import EncoderSpec, decode_and_encode

    spec = EncoderSpec(weights, "cpu", "fp32")
    decode_and_encode(paths[:2], resolutions, windows, "upsampled", spec)  # load + kernel choice
    start = time.process_time()
    decode_and_encode(paths, resolutions, windows, "upsampled", spec)
    return (time.process_time() - start) / len(paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=int, default=1, help="phantom scans")
    parser.add_argument("--size", type=int, default=128, help="phantom image size")
    parser.add_argument("--resolutions", default="64,128", help="small, so the run takes minutes on a CPU")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--weights", default="random:0")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of every setup (median reported)")
    parser.add_argument("--setups", default="inproc,client2,w1,w2,w1t2",
                        help="inproc | client2 (2 decoding workers, encode here) | wN (N encoding workers) | wNtK")
    args = parser.parse_args()

    from pipeline.config import load_config
    from pipeline.data.index import build_scan_index
    from pipeline.features.extraction import run_extraction
    from pipeline.synthetic.phantom import make_phantom

    resolutions = [int(r) for r in args.resolutions.split(",")]
    work = Path(tempfile.mkdtemp(prefix="drct-bench-cluster-"))
    rows = []
    try:
        data = work / "phantom"
        make_phantom(data, layout="rsna", scans=args.scans, seed=0, size=args.size)
        index = build_scan_index(data, "rsna", progress=False)
        n_slices = sum(len(s.slices) for s in index.scans)
        windows = load_config()["extract"]["windows"]
        in_process_threads = torch.get_num_threads()
        setups = args.setups.split(",")
        rates: dict[str, list[tuple[float, float, float]]] = {setup: [] for setup in setups}
        where: dict[str, str] = {}
        # Repeats interleave the setups (A B C A B C ...): on a shared machine the load drifts, and
        # medians of interleaved runs compare like with like better than one run of each.
        for repeat in range(args.repeats):
            for setup in setups:
                settings = {"workers": 0}
                if setup == "client2":  # as before this change: 2 decoding processes of 1 thread
                    settings = {"workers": 2, "threads_per_worker": 1, "encode_on": "client"}
                elif setup.startswith("w"):
                    workers, _, threads = setup[1:].partition("t")
                    settings = {"workers": int(workers), "threads_per_worker": int(threads or 1)}
                overrides = {
                    "extract.out": str(work / f"{setup}-{repeat}.h5"), "extract.resolutions": resolutions,
                    "extract.weights": args.weights, "extract.batch_size": args.batch_size,
                    "extract.device": "cpu", "extract.precision": "fp32",
                    **{f"extract.{k}": v for k, v in settings.items()},
                }
                t = time.perf_counter()
                result = run_extraction(index, load_config(None, overrides), progress=False,
                                        log=lambda m: print("#", m, file=sys.stderr))
                wall = time.perf_counter() - t
                where[setup] = result.where
                rates[setup].append((result.n_slices / result.seconds, result.n_slices / wall, os.getloadavg()[0]))
                print(f"# {setup} (repeat {repeat}): {rates[setup][-1][0]:.2f} slices/s, "
                      f"load average {rates[setup][-1][2]:.1f}", file=sys.stderr)
        for setup in setups:
            runs = rates[setup]
            rows.append((setup, where[setup], statistics.median(r[0] for r in runs), min(r[0] for r in runs),
                         max(r[0] for r in runs), statistics.median(r[1] for r in runs),
                         statistics.mean(r[2] for r in runs)))
        # Last: the worker functions set this process's torch threads to 1.
        traffic = bytes_per_slice([s.path for s in index.scans[0].slices[:4]], windows, args.weights)
        batch = [s.path for s in index.scans[0].slices[:args.batch_size]]
        cpu_costs = {tuple(r): cpu_seconds_per_slice(batch, windows, args.weights, r)
                     for r in (resolutions, [224, 512])}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    flags = sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f in ("avx2", "avx512f", "amx_bf16")})
    print(f"CPU: {os.cpu_count()} cores ({platform.processor() or platform.machine()}, flags {' '.join(flags)}), "
          f"torch {torch.__version__}, in-process torch threads {in_process_threads}; fp32, batch "
          f"{args.batch_size}, {n_slices} slices of {args.scans} phantom scans at {args.size} px, resolutions "
          f"{'+'.join(map(str, resolutions))}, weights {args.weights}")
    print()
    print(f"| setup | where | slices/s (median of {args.repeats}) | min - max | incl. startup | x in-process "
          "| load average |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    base = next((r[2] for r in rows if r[0] == "inproc"), None)
    for setup, place, rate, low, high, with_startup, load in rows:
        ratio = f"{rate / base:.2f}" if base else "-"
        print(f"| {setup} | {place} | {rate:.2f} | {low:.2f} - {high:.2f} | {with_startup:.2f} | {ratio} | {load:.1f} |")
    print()
    print("| aps source (224+512) | task arguments (B/slice) | decode result, before (B/slice) | "
          "encode result, after (B/slice) | before / after |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for aps_source, arguments, before, after in traffic:
        print(f"| {aps_source} | {arguments:,.0f} | {before:,.0f} | {after:,.0f} | {before / after:.0f}x |")
    print()
    print("| resolutions | CPU s per slice, one task (decode + encode, 1 torch thread) | slices/s per dedicated core |")
    print("| --- | ---: | ---: |")
    for res, cost in cpu_costs.items():
        print(f"| {'+'.join(map(str, res))} | {cost:.3f} | {1 / cost:.2f} |")


if __name__ == "__main__":
    main()
