"""Tiny run directories for the report/interpret tests: a feature cache made from a scan index
(random vectors: the reports only read the cache's slice table and provenance) and an oof.npz
in the run-directory format of `drct train`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cache.provenance import config_provenance
from cache.store import write_cache
from pipeline.features.encoder import load_encoder
from pipeline.training.sampler import eval_positions

RESOLUTIONS = [32, 64]
WEIGHTS = "random:0"


def tiny_provenance() -> dict:
    extract = {"weights": WEIGHTS, "resolutions": RESOLUTIONS, "windows": [[40, 80], [80, 200], [600, 2800]],
               "aps_source": "upsampled"}
    provenance = config_provenance(extract)
    provenance["weights_digest"] = load_encoder(WEIGHTS)[1]
    return provenance


def cache_from_index(index, path: Path, provenance: dict) -> Path:
    scans = index.scans
    n_slices = [len(s.slices) for s in scans]
    total = sum(n_slices)
    c = len(index.label_names)
    rng = np.random.default_rng(0)
    slice_labels = np.array(
        [sl.labels if sl.labels is not None else [-1] * c for s in scans for sl in s.slices], np.int8
    ).reshape(total, c)
    return write_cache(
        path,
        scan_ids=[s.scan_id for s in scans],
        patient_ids=[s.patient_id for s in scans],
        scan_labels=np.array([s.labels if s.labels is not None else [np.nan] * c for s in scans], np.float32),
        n_slices=n_slices,
        z=[sl.z for s in scans for sl in s.slices],
        sop_uids=[sl.sop_uid for s in scans for sl in s.slices],
        paths=[sl.path for s in scans for sl in s.slices],
        slice_labels=slice_labels,
        features={r: rng.standard_normal((total, 512)).astype(np.float16) for r in RESOLUTIONS},
        attrs={**provenance, "label_names": index.label_names, "layout": index.layout, "data_root": index.root},
    )


def run_from_cache(run_dir: Path, cache_path: Path, index, provenance: dict, m: int = 8, seed: int = 0,
                   attention: np.ndarray | None = None) -> Path:
    """run.json + config.yaml + oof.npz with random (or given) attention over the eval sample."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = len(index.scans)
    c = len(index.label_names)
    sample = eval_positions(np.array([len(s.slices) for s in index.scans]), m)
    if attention is None:
        attention = rng.dirichlet(np.ones(m), size=n)
    feature_attention = rng.dirichlet(np.ones(512), size=(n, m)).astype(np.float16)
    labels = np.array([s.labels if s.labels is not None else [np.nan] * c for s in index.scans], np.float32)
    np.savez(
        run_dir / "oof.npz",
        scan_id=np.array([s.scan_id for s in index.scans]),
        patient_id=np.array([s.patient_id for s in index.scans]),
        fold=np.zeros(n, np.int64),
        labels=labels,
        prob=rng.uniform(size=(n, c)),
        prob_primary=rng.uniform(size=(n, c)),
        prob_aps=rng.uniform(size=(n, c)),
        sample_idx=sample,
        slice_attention=attention,
        feature_attention=feature_attention,
        aps_idx=np.argsort(-attention, axis=1)[:, :4],
    )
    meta = {"cache": str(cache_path), "provenance": provenance, "weights_digest": provenance["weights_digest"],
            "label_names": index.label_names, "model": "drct2", "folds": 2, "folds_run": [0, 1],
            "resolutions": {"primary": RESOLUTIONS[0], "aps": RESOLUTIONS[-1]}, "m_key": 4, "aps_selection": "attention"}
    (run_dir / "run.json").write_text(json.dumps(meta))
    (run_dir / "config.yaml").write_text("evaluate:\n  threshold: 0.5\nmodel:\n  m_key: 4\n  aps_selection: attention\n")
    return run_dir
