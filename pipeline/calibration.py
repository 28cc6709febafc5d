"""Calibration of out-of-fold probabilities and the per-class decision threshold.

* Reliability per class: the scans binned by predicted probability into ``BINS`` equal-width bins
  on [0, 1] (scikit-learn's ``calibration_curve(strategy="uniform")`` binning: a probability p
  goes to bin ``searchsorted(edges[1:-1], p)``, so a probability on an edge, 0.1, closes the lower
  bin); per bin the mean probability, the observed positive fraction and the count.
* Expected calibration error (Naeini et al. 2015, Guo et al. 2017):
  ECE = sum over non-empty bins of (n_b / n) * |positive fraction_b - mean probability_b|.
* Brier score: mean squared difference between probability and the 0/1 label (scikit-learn's
  ``brier_score_loss``).
* The F1-maximising threshold of a class (``--threshold-from oof``): among the class's distinct
  out-of-fold probabilities t, the one whose call ``prob >= t`` has the highest F1 (on a tie the
  highest such t); a class without a positive or a negative keeps the default (0.5). The figures
  at thresholds picked on the same predictions would flatter them, so the evaluation scores each
  fold's scans at thresholds picked on the *other* folds (``cross_fitted_thresholds``) and only
  the run's recorded threshold (for ``drct predict``) is picked on all out-of-fold predictions.

A NaN label (unknown) leaves that scan out of that class.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import brier_score_loss

BINS = 10
DEFAULT_THRESHOLD = 0.5
THRESHOLDS_FILE = "thresholds.json"


def reliability(labels: np.ndarray, prob: np.ndarray, bins: int = BINS) -> dict:
    """One class: {edges, mean_prob, frac_pos, count} per bin (NaN where a bin is empty), ECE, Brier, n."""
    labels = np.asarray(labels, np.float64).ravel()
    known = ~np.isnan(labels)
    y, p = (labels[known] > 0.5).astype(np.float64), np.asarray(prob, np.float64).ravel()[known]
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.searchsorted(edges[1:-1], p)
    count = np.bincount(which, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.bincount(which, weights=p, minlength=bins) / count
        frac_pos = np.bincount(which, weights=y, minlength=bins) / count
    filled = count > 0
    n = len(y)
    ece = float((count[filled] / n * np.abs(frac_pos[filled] - mean_prob[filled])).sum()) if n else float("nan")
    brier = float(brier_score_loss(y, p)) if n else float("nan")
    return {"edges": edges.tolist(), "mean_prob": mean_prob.tolist(), "frac_pos": frac_pos.tolist(),
            "count": count.astype(int).tolist(), "ece": ece, "brier": brier, "n": n}


def calibration_report(labels: np.ndarray, prob: np.ndarray, names: Sequence[str], bins: int = BINS) -> dict:
    """{class: reliability(...)} plus the macro (mean over classes) ECE and Brier score."""
    labels, prob = np.asarray(labels, np.float64), np.asarray(prob, np.float64)
    per_class = {str(name): reliability(labels[:, c], prob[:, c], bins) for c, name in enumerate(names)}
    eces = [v["ece"] for v in per_class.values() if np.isfinite(v["ece"])]
    briers = [v["brier"] for v in per_class.values() if np.isfinite(v["brier"])]
    return {"bins": int(bins), "macro_ece": float(np.mean(eces)) if eces else float("nan"),
            "macro_brier": float(np.mean(briers)) if briers else float("nan"), "per_class": per_class}


def f1_threshold(labels: np.ndarray, prob: np.ndarray, default: float = DEFAULT_THRESHOLD) -> float:
    """The threshold t among the class's distinct probabilities maximising the F1 of prob >= t
    (the highest t on a tie); `default` when the known labels lack a positive or a negative."""
    labels = np.asarray(labels, np.float64).ravel()
    known = ~np.isnan(labels)
    y, p = labels[known] > 0.5, np.asarray(prob, np.float64).ravel()[known]
    if not y.any() or y.all():
        return float(default)
    order = np.argsort(-p, kind="stable")
    p, y = p[order], y[order]
    last = np.flatnonzero(np.r_[p[1:] != p[:-1], True])  # the last row of each group of tied scores
    tp = np.cumsum(y)[last]
    called = last + 1
    f1 = 2 * tp / (called + y.sum())  # 2TP / (2TP + FP + FN) = 2TP / (called + positives)
    best = int(np.flatnonzero(f1 == f1.max())[0])  # scores descend: the first maximum is the highest t
    return float(p[last[best]])


def oof_thresholds(labels: np.ndarray, prob: np.ndarray, default: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """(C,) F1-maximising thresholds on all rows."""
    labels, prob = np.asarray(labels, np.float64), np.asarray(prob, np.float64)
    return np.array([f1_threshold(labels[:, c], prob[:, c], default) for c in range(labels.shape[1])])


def cross_fitted_thresholds(labels: np.ndarray, prob: np.ndarray, fold: np.ndarray,
                            default: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """(n, C): each row's thresholds picked on the rows of the other folds (a single fold: its own)."""
    labels, prob, fold = np.asarray(labels, np.float64), np.asarray(prob, np.float64), np.asarray(fold)
    out = np.empty_like(prob)
    folds = sorted(set(fold.tolist()))
    for k in folds:
        rows = fold == k
        other = ~rows if len(folds) > 1 else rows
        out[rows] = oof_thresholds(labels[other], prob[other], default)
    return out


def write_thresholds(run_dir: str | Path, names: Sequence[str], thresholds: np.ndarray, source: str = "oof") -> Path:
    """RUN_DIR/thresholds.json: {class: threshold}, read by `drct predict` (and `run_thresholds`)."""
    path = Path(run_dir) / THRESHOLDS_FILE
    path.write_text(json.dumps({
        "source": source,
        "rule": "per class, the out-of-fold probability t maximising the F1 of prob >= t (pipeline/calibration.py)",
        "thresholds": {str(n): float(t) for n, t in zip(names, thresholds)},
    }, indent=1))
    return path


def run_thresholds(run_dir: str | Path, names: Sequence[str]) -> np.ndarray | None:
    """The (C,) thresholds recorded in RUN_DIR/thresholds.json, in `names` order; None if the run has none.
    A file that does not name every class is refused (ValueError), never half used."""
    path = Path(run_dir) / THRESHOLDS_FILE
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text())["thresholds"]
        values = np.array([float(recorded[str(n)]) for n in names])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a thresholds file for the classes {', '.join(map(str, names))} "
                         f"({type(exc).__name__}: {exc}); rerun `drct evaluate {Path(run_dir)} --threshold-from oof` "
                         "or delete it to use 0.5") from None
    if not ((values >= 0) & (values <= 1)).all():
        raise ValueError(f"{path}: thresholds must lie in [0, 1]")
    return values


def write_reliability_png(report: dict, path: str | Path) -> Path:
    """One panel per class: observed positive fraction against mean probability per bin (marker
    size ~ count), the diagonal of perfect calibration, ECE and Brier in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = list(report["per_class"])
    cols = min(3, max(1, len(classes)))
    rows = -(-len(classes) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.1 * rows), squeeze=False)
    for ax, name in zip(axes.ravel(), classes):
        r = report["per_class"][name]
        mean_prob, frac, count = (np.asarray(r[k], np.float64) for k in ("mean_prob", "frac_pos", "count"))
        filled = count > 0
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--")
        ax.plot(mean_prob[filled], frac[filled], "-", color="C0", lw=1)
        ax.scatter(mean_prob[filled], frac[filled], s=12 + 60 * count[filled] / max(count.max(), 1), color="C0", zorder=3)
        ece = "n/a" if r["ece"] is None or not np.isfinite(r["ece"]) else f"{r['ece']:.3f}"
        brier = "n/a" if r["brier"] is None or not np.isfinite(r["brier"]) else f"{r['brier']:.3f}"
        ax.set_title(f"{name}\nECE {ece}  Brier {brier}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean predicted probability", fontsize=8)
        ax.set_ylabel("observed positive fraction", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(classes):]:
        ax.axis("off")
    fig.suptitle(f"Reliability of the out-of-fold probabilities ({report['bins']} equal-width bins)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
