"""Stage-one benchmark: is `drct extract` bound by the encoder (as it should be) or by decoding and I/O?

In one run, on a synthetic DICOM dataset (the phantom, real 16-bit DICOM at --size px):

* stage one: `run_extraction` (dask decoding, batched encoder, crash-safe writer) at each
  resolution alone and at all of them together (the product configuration), slices/s;
* the bare VGG16 forward at the same sizes, batch size, device and precision on tensors already
  in memory: the limit on this machine;
* their ratio (goal >= 0.8: decoding and I/O hidden behind inference);
* a naive loop: per file pydicom read -> HU -> preprocess -> fp32 batch-1 forward at the same
  resolutions (goal: stage one >= 3x this).

Run:  .venv/bin/python bench/stage_one.py [--scans 3 --size 512 --resolutions 224,512 --workers 2]
Figures go to stdout as a markdown table (paste into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch


def bare_forward_rate(runner, resolutions: list[int], batch_size: int, seconds: float = 8.0) -> float:
    """Slices/s of the encoder alone (every resolution per slice), inputs already on the device."""
    inputs = {r: torch.randn(batch_size, 3, r, r) for r in resolutions}
    for r in resolutions:
        runner(inputs[r])  # warm-up (oneDNN/cuDNN kernel choice)
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done == 0:
        for r in resolutions:
            runner(inputs[r])
        done += batch_size
    return done / (time.perf_counter() - start)


def naive_rate(paths: list[str], encoder, resolutions: list[int], windows, aps_source: str, seconds: float) -> float:
    """Per-file pydicom read, preprocessing, fp32 batch-1 forward, one slice at a time."""
    import pydicom

    from pipeline.features.preprocess import preprocess_slice

    encoder = encoder.to("cpu").to(memory_format=torch.contiguous_format).float()
    done, start = 0, time.perf_counter()
    with torch.inference_mode():
        for path in paths:
            ds = pydicom.dcmread(path)
            hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            for x in preprocess_slice(hu, resolutions, windows, aps_source).values():
                encoder(x[None])
            done += 1
            if time.perf_counter() - start > seconds:
                break
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="an existing DICOM tree (default: a fresh phantom in a temp folder)")
    parser.add_argument("--layout", default="rsna")
    parser.add_argument("--scans", type=int, default=3, help="phantom scans")
    parser.add_argument("--size", type=int, default=512, help="phantom image size (real CT: 512)")
    parser.add_argument("--resolutions", default="224,512")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--weights", default="random:0", help="same compute as imagenet; no download needed")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--naive-seconds", type=float, default=30.0, help="time box of the naive loop")
    parser.add_argument("--bare-seconds", type=float, default=8.0, help="time box of each bare-forward measurement")
    args = parser.parse_args()

    from pipeline.config import load_config
    from pipeline.data.index import build_scan_index
    from pipeline.features.encoder import EncoderRunner, load_encoder, resolve_device
    from pipeline.features.extraction import run_extraction

    resolutions = [int(r) for r in args.resolutions.split(",")]
    work = Path(tempfile.mkdtemp(prefix="drct-bench-"))
    try:
        if args.data:
            data = Path(args.data)
        else:
            from pipeline.synthetic.phantom import make_phantom

            data = work / "phantom"
            t = time.perf_counter()
            make_phantom(data, layout=args.layout, scans=args.scans, seed=0, size=args.size)
            print(f"# phantom: {args.scans} scans at {args.size} px in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        index = build_scan_index(data, args.layout, progress=False)
        n_slices = sum(len(s.slices) for s in index.scans)
        paths = [s.path for scan in index.scans for s in scan.slices]

        device = resolve_device(args.device)
        encoder, _ = load_encoder(args.weights)
        runner = EncoderRunner(encoder, device, args.precision)
        configs = [[r] for r in resolutions] + ([resolutions] if len(resolutions) > 1 else [])
        rows = []
        for config_resolutions in configs:
            overrides = {
                "extract.out": str(work / f"f{'_'.join(map(str, config_resolutions))}.h5"),
                "extract.resolutions": config_resolutions, "extract.weights": args.weights,
                "extract.workers": args.workers, "extract.batch_size": args.batch_size,
                "extract.device": args.device, "extract.precision": args.precision,
                # This benchmark compares the encoder in this process with its bare forward: the workers
                # only decode (bench/cluster.py measures encoding on the workers).
                "extract.encode_on": "client",
            }
            config = load_config(None, overrides)
            # The bare rate brackets the stage-one run (before and after, averaged): on a shared machine
            # the load drifts, and a ratio of figures taken minutes apart would measure the drift.
            bare_before = bare_forward_rate(runner, config_resolutions, args.batch_size, args.bare_seconds)
            t = time.perf_counter()
            result = run_extraction(index, config, progress=False, log=lambda m: print("#", m, file=sys.stderr))
            wall = time.perf_counter() - t
            stage = result.n_slices / result.seconds
            bare_after = bare_forward_rate(runner, config_resolutions, args.batch_size, args.bare_seconds)
            bare = (bare_before + bare_after) / 2
            print(f"# {config_resolutions}: bare {bare_before:.2f} / {bare_after:.2f} slices/s before/after, "
                  f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
            rows.append((config_resolutions, stage, result.n_slices / wall, bare, result.wait_seconds / result.seconds))
        naive = naive_rate(paths, encoder, resolutions, load_config()["extract"]["windows"], "upsampled",
                           args.naive_seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cpu = platform.processor() or platform.machine()
    load = os.getloadavg()
    print(f"device {device} ({runner.precision}), torch {torch.__version__}, {os.cpu_count()} CPUs ({cpu}), "
          f"{args.workers} decoding workers, batch {args.batch_size}, {n_slices} slices of {len(index.scans)} scans "
          f"at {args.size} px; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)")
    print()
    print("| resolutions | stage one (slices/s) | incl. startup | bare VGG16 forward | ratio | encoder idle |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for res, stage, with_startup, bare, idle in rows:
        print(f"| {'+'.join(map(str, res))} | {stage:.2f} | {with_startup:.2f} | {bare:.2f} | {stage / bare:.2f} | "
              f"{idle:.0%} |")
    full = rows[-1][1]
    print()
    print(f"naive loop (pydicom per file, fp32, batch 1, {'+'.join(map(str, resolutions))}): {naive:.2f} slices/s; "
          f"stage one / naive = {full / naive:.1f}x")


if __name__ == "__main__":
    main()
