"""Synthetic feature caches for tests and benchmarks (no DICOM, no CNN).

Slice vectors imitate max-pooled VGG16 features: non-negative (post-ReLU), a per-channel scale
drawn log-normally, many values near zero. A planted signal marks the labelled slices: every
class owns a few channels that rise on a contiguous run of "lesion" slices of its positive
scans, more strongly at the APS resolution (the zoom-in sees the detail better). Slice labels
mark those runs, so interpretability code can be checked against them too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cache.provenance import config_provenance
from cache.store import FEATURE_DIM, write_cache


def synthetic_features(
    n_scans: int,
    n_classes: int,
    slices: tuple[int, int] = (20, 40),
    resolutions: tuple[int, ...] = (224, 512),
    scans_per_patient: int = 1,
    signal: float = 3.0,
    prevalence: float = 0.4,
    seed: int = 0,
) -> dict:
    """Arrays for write_cache (features float16 per resolution, labels, tables)."""
    rng = np.random.default_rng(seed)
    n_slices = rng.integers(slices[0], slices[1] + 1, n_scans).astype(np.int32)
    total = int(n_slices.sum())
    offset = np.concatenate([[0], np.cumsum(n_slices)[:-1]]).astype(np.int64)
    labels = (rng.random((n_scans, n_classes)) < prevalence).astype(np.float32)
    slice_labels = np.zeros((total, n_classes), np.int8)
    scale = rng.lognormal(0.3, 0.5, FEATURE_DIM).astype(np.float32)
    channels = rng.permutation(FEATURE_DIM)[: 8 * n_classes].reshape(n_classes, 8)
    features = {}
    for number, res in enumerate(resolutions):
        array = np.empty((total, FEATURE_DIM), np.float16)
        block = 65536
        for start in range(0, total, block):
            stop = min(total, start + block)
            noise = rng.standard_normal((stop - start, FEATURE_DIM), dtype=np.float32)
            array[start:stop] = np.maximum(0.0, (noise + 0.3) * scale)
        features[int(res)] = array
    # lesion runs: a contiguous 20-40% of the scan, per positive (scan, class)
    scans, classes = np.nonzero(labels)
    for s, c in zip(scans, classes):
        n = int(n_slices[s])
        length = max(1, int(n * rng.uniform(0.2, 0.4)))
        first = int(rng.integers(0, n - length + 1))
        rows = slice(int(offset[s]) + first, int(offset[s]) + first + length)
        slice_labels[rows, c] = 1
        for number, res in enumerate(resolutions):
            boost = signal * (1.0 + 0.5 * number)  # stronger at the higher (APS) resolution
            block = features[int(res)][rows][:, channels[c]].astype(np.float32) + boost * scale[channels[c]]
            features[int(res)][rows, channels[c][:, None].T.ravel()] = block.astype(np.float16)
    patient = np.arange(n_scans) // max(1, scans_per_patient)
    z = np.concatenate([np.arange(n, dtype=np.float64) * 5.0 for n in n_slices]) if n_scans else np.zeros(0)
    return {
        "scan_ids": [f"scan{i:06d}" for i in range(n_scans)],
        "patient_ids": [f"patient{p:06d}" for p in patient],
        "scan_labels": labels,
        "n_slices": n_slices,
        "z": z,
        "sop_uids": [f"1.2.3.{i}" for i in range(total)],
        "paths": [f"s{i}.dcm" for i in range(total)],
        "slice_labels": slice_labels,
        "features": features,
    }


def write_synthetic_cache(path: str | Path, config: dict, label_names: list[str], provenance: dict | None = None, **kwargs) -> Path:
    """A complete cache at `path` whose provenance matches config["extract"] (unless given)."""
    extract = config["extract"]
    arrays = synthetic_features(n_classes=len(label_names), resolutions=tuple(extract["resolutions"]), **kwargs)
    attrs = dict(config_provenance(extract))
    attrs["weights_digest"] = "synthetic"
    attrs.update(provenance or {})
    attrs["label_names"] = list(label_names)
    return write_cache(path, attrs=attrs, **arrays)
