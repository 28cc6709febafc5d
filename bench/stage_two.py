"""Benchmark of stage two: one DrCT2 training epoch on an RSNA-sized in-memory cache, against
the estimated epoch of an end-to-end pipeline that reruns VGG16 every epoch.

    .venv/bin/python bench/stage_two.py                 # RSNA size: 21,540 scans, m=28, m_key=16
    .venv/bin/python bench/stage_two.py --scans 2000    # a quick look

Synthetic slice vectors (pipeline.synthetic.synthetic: post-ReLU, log-normal channel scales, a
planted lesion signal) with 21-60 slices per scan (RSNA, paper Table 1), float16 in memory at
224 and 512 like a loaded cache. Reports: epoch seconds, the share spent assembling batches
(sampling + gathers), peak resident memory, VGG16 images/s at 224 and 512 (bf16 autocast +
channels_last where the CPU is fast at it, as stage one runs), the estimated end-to-end epoch
time (every epoch: m slices at 224 and m_key at 512 per scan through VGG16, plus the heads)
and the speed-up ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import load_config
from pipeline.features.encoder import EncoderRunner, load_encoder
from pipeline.heads.build import build_model
from pipeline.synthetic.synthetic import synthetic_features
from pipeline.training.dataset import CachedFeatures
from pipeline.training.losses import head_loss
from pipeline.training.trainer import optimizer_for, train_epoch


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def vgg_rate(resolution: int, batch: int, repeats: int) -> float:
    """Images per second of the frozen VGG16 at one resolution (random weights: same FLOPs)."""
    encoder, _ = load_encoder("random:0")
    runner = EncoderRunner(encoder, torch.device("cpu"), "auto")
    x = torch.randn(batch, 3, resolution, resolution)
    runner(x)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        runner(x)
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=int, default=21540)
    parser.add_argument("--batch-size", type=int, default=256, help="RSNA batch size of the paper")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vgg-repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    config = load_config(None, {"sampler.m": 28, "model.m_key": 16, "model.name": "drct2", "train.batch_size": args.batch_size})
    names = ["any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"]

    t0 = time.perf_counter()
    arrays = synthetic_features(args.scans, len(names), slices=(21, 60), resolutions=(224, 512), seed=0)
    n_slices = arrays["n_slices"]
    offset = np.concatenate([[0], np.cumsum(n_slices)[:-1]])
    data = CachedFeatures(
        torch.from_numpy(arrays["features"][224]), torch.from_numpy(arrays["features"][512]), offset, n_slices,
        arrays["scan_labels"], np.array(arrays["scan_ids"], dtype=object), np.array(arrays["patient_ids"], dtype=object),
    )
    del arrays
    print(f"synthetic cache: {args.scans} scans, {int(n_slices.sum())} slices x 2 resolutions, "
          f"{(data.primary_features.numel() + data.aps_features.numel()) * 2 / 1e9:.2f} GB float16 "
          f"(made in {time.perf_counter() - t0:.0f} s)", flush=True)

    torch.manual_seed(0)
    model = build_model(config, len(names))
    optimizer = optimizer_for(model, config)
    loss_fn = head_loss(config)
    rng = np.random.default_rng(0)
    scans = np.arange(args.scans)
    train_epoch(model, data, scans[: 2 * args.batch_size], 28, args.batch_size, optimizer, loss_fn, rng)  # warm-up
    cpu0 = time.process_time()
    stats = train_epoch(model, data, scans, 28, args.batch_size, optimizer, loss_fn, rng)
    epoch_cpu = time.process_time() - cpu0
    epoch_s, data_s = stats["seconds"], stats["data_seconds"]
    print(f"DrCT2 epoch: {epoch_s:.1f} s wall, {epoch_cpu:.1f} s CPU ({args.scans / epoch_s:.0f} scans/s), "
          f"batch assembly {data_s:.2f} s = {100 * data_s / epoch_s:.1f}%, loss {stats['loss']:.4f}", flush=True)

    cpu0 = time.process_time()
    rate224 = vgg_rate(224, 8, args.vgg_repeats)
    rate512 = vgg_rate(512, 2, args.vgg_repeats)
    vgg_cpu = time.process_time() - cpu0
    per_epoch_cnn = args.scans * (28 / rate224 + 16 / rate512)
    e2e = per_epoch_cnn + epoch_s
    figures = {
        "scans": args.scans,
        "slices": int(n_slices.sum()),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "epoch_seconds": round(epoch_s, 2),
        "epoch_cpu_seconds": round(epoch_cpu, 2),
        "data_seconds": round(data_s, 2),
        "data_share": round(data_s / epoch_s, 4),
        "peak_rss_gb": round(peak_rss_gb(), 2),
        "vgg16_images_per_s_224": round(rate224, 2),
        "vgg16_images_per_s_512": round(rate512, 2),
        "vgg16_cpu_seconds": round(vgg_cpu, 2),
        "end_to_end_epoch_seconds_estimate": round(e2e, 0),
        "speedup": round(e2e / epoch_s, 0),
        "load_average": os.getloadavg(),
    }
    print(f"VGG16: {rate224:.1f} images/s at 224, {rate512:.2f} images/s at 512")
    print(f"end-to-end epoch estimate (CNN rerun each epoch): {e2e:.0f} s = {e2e / 3600:.1f} h; "
          f"speed-up {e2e / epoch_s:.0f}x; peak RSS {peak_rss_gb():.2f} GB")
    print(json.dumps(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
