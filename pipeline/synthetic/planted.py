"""Planted-signal feature caches: synthetic caches in the real schema where the truth is exact,
built so that a head has to *find* the lesion slices to diagnose (issue 8's benchmark).

What makes them hard, each on purpose:

* **Anatomy varies per scan**: every channel of a scan is multiplied by its own gain
  (log-normal, ``anatomy_sd``), so a channel's level says little about the diagnosis on its
  own: a scan-level "is this channel high?" confuses anatomy with lesion.
* **A smooth z trend**: every channel follows a slow curve along the slice axis (skull base to
  vertex look different), with a per-scan phase, so lesion slices are not the only change in z.
* **Lesions are local**: a positive (scan, subtype) raises its subtype's channels on one
  contiguous run of 10-30 % of the slices (``lesion_fraction``), relative to the scan's own
  level; the remaining 70-90 % of the slices carry no trace of it.
* **Zoom-in subtypes**: at the primary resolution a "small" lesion shows only as a generic
  abnormality (channels shared by every small subtype) plus a faint trace (``faint`` x its APS
  strength) of its own channels; its own channels are clear only at the APS resolution. So the
  primary network can find *where* it is, but only the zoom tells *which* subtype it is, as a
  small bleed on a 224 px slice against a 512 px one. "Large" subtypes are clear at both.
* **'any' is the OR** of the subtypes (RSNA's convention), so slice and scan labels agree.

Slice vectors imitate max-pooled VGG16 features: non-negative, a log-normal per-channel scale.
Slice labels mark the lesion runs (Algorithm 1's key slices).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache.provenance import config_provenance
from cache.store import FEATURE_DIM, write_cache

DEFAULT_SUBTYPES = {"large1": "both", "large2": "both", "small1": "aps", "small2": "aps"}


@dataclass
class PlantedSpec:
    """How a planted cache is made; every field is a knob of the benchmark (defaults: issue 8)."""

    n_scans: int = 400
    subtypes: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SUBTYPES))  # name -> both | aps
    slices: tuple[int, int] = (28, 60)        # slices per scan (uniform)
    scans_per_patient: tuple[int, int] = (1, 2)
    prevalence: float = 0.3                   # per subtype
    lesion_fraction: tuple[float, float] = (0.10, 0.30)
    channels_per_class: int = 16
    strength: float = 5.0                     # lesion rise in units of the channel's noise sd, APS resolution
    faint: float = 0.2                        # primary-resolution strength of "aps" subtypes, relative
    anatomy_sd: float = 0.7                   # log-sd of the per-scan channel gain
    trend: float = 0.6                        # amplitude of the smooth z trend (relative to the level)
    seed: int = 0

    @property
    def label_names(self) -> list[str]:
        return ["any", *self.subtypes]


def planted_features(spec: PlantedSpec, resolutions: tuple[int, int] = (224, 512)) -> dict:
    """Arrays for `write_cache` plus ``truth`` (lesion runs, signal channels) for the benchmark."""
    rng = np.random.default_rng(spec.seed)
    names = list(spec.subtypes)
    n_sub = len(names)
    # patients with 1..k scans each
    sizes = []
    while sum(sizes) < spec.n_scans:
        sizes.append(int(rng.integers(spec.scans_per_patient[0], spec.scans_per_patient[1] + 1)))
    patient = np.repeat(np.arange(len(sizes)), sizes)[: spec.n_scans]
    n_slices = rng.integers(spec.slices[0], spec.slices[1] + 1, spec.n_scans).astype(np.int32)
    total = int(n_slices.sum())
    offset = np.concatenate([[0], np.cumsum(n_slices)[:-1]]).astype(np.int64)
    sub_labels = (rng.random((spec.n_scans, n_sub)) < spec.prevalence).astype(np.float32)
    labels = np.concatenate([sub_labels.max(axis=1, keepdims=True), sub_labels], axis=1)

    level = rng.lognormal(0.0, 0.5, FEATURE_DIM).astype(np.float32)      # channel level
    noise_sd = (0.5 * level).astype(np.float32)                           # channel noise
    order = rng.permutation(FEATURE_DIM)
    channels = order[: spec.channels_per_class * n_sub].reshape(n_sub, -1)
    shared = order[spec.channels_per_class * n_sub : spec.channels_per_class * (n_sub + 1)]  # "something is here"
    trend_freq = rng.uniform(0.5, 2.0, FEATURE_DIM).astype(np.float32)
    trend_phase = rng.uniform(0, 2 * np.pi, FEATURE_DIM).astype(np.float32)

    scan_of_row = np.repeat(np.arange(spec.n_scans), n_slices)
    rel_z = np.concatenate([(np.arange(n) + 0.5) / n for n in n_slices]).astype(np.float32)
    gain = rng.lognormal(0.0, spec.anatomy_sd, (spec.n_scans, FEATURE_DIM)).astype(np.float32)
    scan_phase = rng.uniform(-0.5, 0.5, spec.n_scans).astype(np.float32)

    slice_labels = np.zeros((total, 1 + n_sub), np.int8)
    runs = []
    rise = np.zeros((total, FEATURE_DIM), np.float32)  # lesion rise at APS strength, in noise-sd units
    faint_rise = np.zeros((total, FEATURE_DIM), np.float32)
    for s, c in zip(*np.nonzero(sub_labels)):
        n = int(n_slices[s])
        length = max(1, round(n * rng.uniform(*spec.lesion_fraction)))
        first = int(rng.integers(0, n - length + 1))
        rows = np.arange(offset[s] + first, offset[s] + first + length)
        slice_labels[rows, 1 + c] = 1
        slice_labels[rows, 0] = 1
        runs.append((int(s), names[c], first, length))
        # a bump that fades at the edges of the run, like a lesion's partial-volume slices
        profile = np.sin(np.pi * (np.arange(length) + 0.5) / length) ** 0.5
        bump = profile[:, None] * spec.strength * rng.uniform(0.7, 1.3, len(channels[c]))[None, :]
        rise[np.ix_(rows, channels[c])] += bump
        if spec.subtypes[names[c]] == "aps":
            faint_rise[np.ix_(rows, channels[c])] += bump * spec.faint
            faint_rise[np.ix_(rows, shared)] += bump
            rise[np.ix_(rows, shared)] += bump
        else:
            faint_rise[np.ix_(rows, channels[c])] += bump

    features = {}
    for number, res in enumerate(resolutions):
        lesion = rise if number == len(resolutions) - 1 else faint_rise
        array = np.empty((total, FEATURE_DIM), np.float16)
        block = 32768
        for start in range(0, total, block):
            stop = min(total, start + block)
            scans = scan_of_row[start:stop]
            z = rel_z[start:stop, None] + scan_phase[scans, None]
            base = level * gain[scans] * (1.0 + spec.trend * np.sin(2 * np.pi * trend_freq * z + trend_phase))
            noise = rng.standard_normal((stop - start, FEATURE_DIM), dtype=np.float32) * noise_sd * gain[scans]
            value = base + noise + lesion[start:stop] * noise_sd * gain[scans]
            array[start:stop] = np.maximum(0.0, value)
        features[int(res)] = array
    z_mm = np.concatenate([np.arange(n, dtype=np.float64) * 5.0 for n in n_slices]) if spec.n_scans else np.zeros(0)
    return {
        "scan_ids": [f"planted{i:05d}" for i in range(spec.n_scans)],
        "patient_ids": [f"patient{p:05d}" for p in patient],
        "scan_labels": labels,
        "n_slices": n_slices,
        "z": z_mm,
        "sop_uids": [f"2.25.{i}" for i in range(total)],
        "paths": [f"planted/{i}.dcm" for i in range(total)],
        "slice_labels": slice_labels,
        "features": features,
        "truth": {"runs": runs, "channels": {names[c]: channels[c].tolist() for c in range(n_sub)},
                  "shared_channels": shared.tolist()},
    }


def write_planted_cache(path: str | Path, config: dict, spec: PlantedSpec | None = None) -> tuple[Path, dict]:
    """A complete planted cache at `path`, provenance matching config["extract"] (weights
    digest "planted"); returns (path, truth)."""
    spec = spec or PlantedSpec()
    extract = config["extract"]
    resolutions = tuple(int(r) for r in extract["resolutions"])
    arrays = planted_features(spec, resolutions)
    truth = arrays.pop("truth")
    attrs = dict(config_provenance(extract))
    attrs["weights_digest"] = "planted"
    attrs["label_names"] = spec.label_names
    attrs["planted_spec"] = repr(spec)
    return write_cache(path, attrs=attrs, **arrays), truth
