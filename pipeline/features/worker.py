"""What a stage-one task does: decode one batch of slices and, on a worker, encode it there.

A task is one planned batch (at most ``extract.batch_size`` slices of one commit unit). The
same functions run in every mode, so the batches, and therefore the vectors, are the same
whether the batch is encoded in this process (``workers: 0``, ``encode_on: client``) or on a
dask worker:

* `decode_slices`: DICOM -> HU -> windows -> resized float16 images (undecodable slices are
  reported, never raised);
* `encode_images`: images -> one forward per resolution -> float16 vectors;
* `decode_and_encode`: the worker task. Each worker process loads the encoder once
  (`worker_runner`, a per-process cache) on its own device -- its GPU (one per worker under
  dask-cuda), else the CPU -- with the usual precision rules, and returns 1 KB per slice and
  resolution instead of the images (0.3 MB per slice at 224, 1.5 MB at 512 with native APS).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.features.preprocess import model_input, transferred_resolutions, window_and_resize


@dataclass(frozen=True)
class EncoderSpec:
    """How a worker builds its encoder: weights spec, device setting (resolved on the worker) and precision."""

    weights: str
    device: str
    precision: str


def decode_slices(
    paths: Sequence[str], resolutions: Sequence[int], windows: Sequence[Sequence[float]], aps_source: str
) -> dict:
    """Decode and preprocess slices. Returns {"kept": [positions in `paths` decoded],
    "errors": [(path, reason)], "images": {resolution: (n_kept, 3, r, r) float16 in [0, 1]}}
    (only the resolutions `model_input` needs: the first alone for ``aps_source: upsampled``)."""
    from pipeline.data.dicom_io import SliceError, read_hu

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
    stacked = {r: (np.stack(images[r]) if images[r] else np.zeros((0, 3, r, r), np.float16)) for r in sent}
    return {"kept": kept, "errors": errors, "images": stacked}


def encode_images(runner, images: dict[int, np.ndarray], resolutions: Sequence[int], aps_source: str) -> dict:
    """One batch of decoded images -> {resolution: (n, 512) float16}, one forward per resolution."""
    n = len(next(iter(images.values())))
    if n == 0:
        return {r: np.zeros((0, 512), np.float16) for r in resolutions}
    batch = {r: torch.from_numpy(array).to(runner.device, non_blocking=True) for r, array in images.items()}
    return {
        r: runner(model_input(batch, r, list(resolutions), aps_source)).numpy().astype(np.float16)
        for r in resolutions
    }


# -- the per-process encoder of a worker ------------------------------------------------------
_RUNNERS: dict[EncoderSpec, tuple] = {}
_LOCK = threading.Lock()


def worker_runner(spec: EncoderSpec):
    """(EncoderRunner, info) of this process for `spec`, built on first use and kept (threads share it).

    info = {"host", "pid", "device", "precision", "digest"}: the client checks every worker
    encodes with the same weights, device type and precision."""
    with _LOCK:
        if spec not in _RUNNERS:
            from pipeline.features.encoder import EncoderRunner, load_encoder, resolve_device

            torch.set_num_threads(1)  # one core per task thread: workers x threads = cores used
            device = resolve_device(spec.device)
            encoder, digest = load_encoder(spec.weights)
            runner = EncoderRunner(encoder, device, spec.precision)
            info = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "device": str(device),
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "precision": runner.precision,
                "digest": digest,
            }
            _RUNNERS[spec] = (runner, info)
        return _RUNNERS[spec]


def setup_worker(spec: EncoderSpec, batch_size: int, resolutions: list[int], aps_source: str) -> dict:
    """Load and warm up this worker's encoder (run on every worker before the clock starts)."""
    runner, info = worker_runner(spec)
    runner.warm_up(batch_size, transferred_resolutions(resolutions, aps_source), resolutions, aps_source)
    return info


def decode_and_encode(
    paths: Sequence[str],
    resolutions: Sequence[int],
    windows: Sequence[Sequence[float]],
    aps_source: str,
    spec: EncoderSpec,
) -> dict:
    """The worker task: decode a batch and encode it with this worker's encoder.

    Returns {"kept", "errors", "vectors": {resolution: (n_kept, 512) float16}, "encoder": info}."""
    runner, info = worker_runner(spec)
    decoded = decode_slices(paths, resolutions, windows, aps_source)
    vectors = encode_images(runner, decoded.pop("images"), resolutions, aps_source)
    return {**decoded, "vectors": vectors, "encoder": info}


def decode_only(
    paths: Sequence[str], resolutions: Sequence[int], windows: Sequence[Sequence[float]], aps_source: str
) -> dict:
    """The worker task of ``encode_on: client``: decode on the worker, one torch thread per task."""
    torch.set_num_threads(1)
    return decode_slices(paths, resolutions, windows, aps_source)


def resolve_on_worker(device: str, precision: str) -> tuple[str, str]:
    """(device, precision) this worker would encode with (asked of every worker of a remote cluster)."""
    from pipeline.features.encoder import resolve_device, resolve_precision

    resolved = resolve_device(device)
    return str(resolved), resolve_precision(precision, resolved)


def import_worker_modules() -> None:
    """Import the decoding and encoding stack (torch import takes seconds) before the clock starts."""
    import pipeline.data.dicom_io
    import pipeline.features.encoder
    import pipeline.features.preprocess  # noqa: F401
