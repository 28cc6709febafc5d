"""Linear probes: how much class information do the cached VGG16 vectors carry, next to plain HU statistics?

Why: DrCT2's heads can only be as good as the frozen encoder's 512-d vectors. With random weights
(`extract.weights: random:SEED`, used where ImageNet weights cannot be downloaded) the vectors are
random max-pooled projections; this script measures what a logistic-regression probe reads from them,
against the same probe on a 54-value HU histogram of each slice (no learning of features at all).

Two levels, both patient-grouped k-fold (pipeline.training.folds.assign_folds), standardised inputs,
sklearn LogisticRegression (C=0.1):
* slice: one sample per labelled slice (the phantom's slice labels), per-class AUC and F1 at 0.5;
* scan: one sample per scan, inputs = max and mean over the scan's slices, macro-F1 at 0.5 (the
  paper's headline metric) and AUC.

Run:  .venv/bin/python bench/phantom_probe.py CACHE [--json FILE]   (markdown table on stdout)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

# HU bin edges: air/fat, CSF, white/grey matter, acute blood (50-90), calcification, bone.
HU_EDGES = [-2000, -100, 0, 15, 25, 32, 38, 45, 50, 55, 60, 70, 80, 90, 100, 200, 500, 1000, 5000]
RING_EDGES = [0.0, 0.45, 0.75, 10.0]  # radial zones (fraction of half-width): central, middle, peripheral


def hu_features(hu: np.ndarray) -> np.ndarray:
    """Fraction of the slice's pixels in each of 18 HU bins, per radial zone (3 x 18 = 54 values).

    The zones give the probe a coarse "where" (epidural/subdural blood is peripheral,
    intraventricular central) so it is a fair, still feature-learning-free, baseline.
    """
    h, w = hu.shape
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot((yy - (h - 1) / 2) / (h / 2), (xx - (w - 1) / 2) / (w / 2))
    out = []
    for lo, hi in itertools.pairwise(RING_EDGES):
        zone = hu[(r >= lo) & (r < hi)]
        counts, _ = np.histogram(zone, bins=HU_EDGES)
        out.append(counts / max(zone.size, 1))
    return np.concatenate(out).astype(np.float32)


def probe(x: np.ndarray, y: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Out-of-fold probabilities (n, n_classes) of one logistic regression per class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    prob = np.zeros(y.shape, dtype=np.float64)
    for k in np.unique(folds):
        tr, te = folds != k, folds == k
        scaler = StandardScaler().fit(x[tr])
        xtr, xte = scaler.transform(x[tr]), scaler.transform(x[te])
        for c in range(y.shape[1]):
            if len(np.unique(y[tr, c])) < 2:
                prob[te, c] = y[tr, c].mean()
                continue
            clf = LogisticRegression(C=0.1, max_iter=3000).fit(xtr, y[tr, c])
            prob[te, c] = clf.predict_proba(xte)[:, 1]
    return prob


def scores(y: np.ndarray, prob: np.ndarray, names: list[str]) -> dict:
    from sklearn.metrics import f1_score, roc_auc_score

    per = {}
    for c, name in enumerate(names):
        auc = float(roc_auc_score(y[:, c], prob[:, c])) if len(np.unique(y[:, c])) == 2 else float("nan")
        per[name] = {"f1": float(f1_score(y[:, c], prob[:, c] >= 0.5, zero_division=0)), "auc": auc}
    return {
        "macro_f1": float(np.mean([v["f1"] for v in per.values()])),
        "macro_auc": float(np.nanmean([v["auc"] for v in per.values()])),
        "per_class": per,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from cache.store import FeatureCache
    from pipeline.data.dicom_io import read_hu
    from pipeline.training.folds import assign_folds

    start = time.perf_counter()
    cache = FeatureCache(args.cache)
    t = cache.table
    names = list(cache.label_names)
    root = Path(str(cache.attrs.get("data_root", ".")))
    feats = {r: cache.load_all(r, np.float32) for r in cache.resolutions}

    hu = []
    for p in t.path:
        path = Path(p) if Path(p).is_absolute() else root / p
        hu.append(hu_features(read_hu(path)))
    hu = np.stack(hu)

    scan_folds = assign_folds(t.patient_id, np.nan_to_num(t.labels), args.folds, seed=0)
    slice_scan = np.repeat(np.arange(len(t.scan_id)), t.n_slices)
    slice_folds = scan_folds[slice_scan]

    inputs = {"HU histogram (54)": hu}
    for r in cache.resolutions:
        inputs[f"VGG16 random {r} px (512)"] = np.log1p(np.maximum(feats[r], 0))
    inputs["VGG16 random " + "+".join(map(str, cache.resolutions)) + " (1024)"] = np.concatenate(
        [np.log1p(np.maximum(feats[r], 0)) for r in cache.resolutions], axis=1)

    result = {"n_scans": len(t.scan_id), "n_slices": len(t.path), "labels": names, "probes": {}}
    labelled = (t.slice_labels >= 0).all(axis=1)
    ys = t.slice_labels[labelled].astype(np.float64)
    yscan = np.nan_to_num(t.labels).astype(np.float64)
    for name, x in inputs.items():
        s = scores(ys, probe(x[labelled], ys, slice_folds[labelled]), names)
        pooled = np.concatenate([
            np.stack([x[t.rows(i)].max(0) for i in range(len(t.scan_id))]),
            np.stack([x[t.rows(i)].mean(0) for i in range(len(t.scan_id))]),
        ], axis=1)
        sc = scores(yscan, probe(pooled, yscan, scan_folds), names)
        result["probes"][name] = {"slice": s, "scan": sc}
    result["wall_s"] = round(time.perf_counter() - start, 1)

    print(f"{result['n_scans']} scans, {result['n_slices']} slices ({int(labelled.sum())} labelled), "
          f"{args.folds} patient-grouped folds, wall {result['wall_s']} s\n")
    print("| probe input | slice macro-AUC | slice macro-F1 | scan macro-AUC | scan macro-F1 | "
          + " | ".join(f"scan F1 {n}" for n in names) + " |")
    print("| --- " * (5 + len(names)) + "|")
    for name, r in result["probes"].items():
        print(f"| {name} | {r['slice']['macro_auc']:.3f} | {r['slice']['macro_f1']:.3f} | "
              f"{r['scan']['macro_auc']:.3f} | {r['scan']['macro_f1']:.3f} | "
              + " | ".join(f"{r['scan']['per_class'][n]['f1']:.2f}" for n in names) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
