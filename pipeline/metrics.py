"""Evaluation metrics (paper VI.A.1): macro precision, recall and F1 over classes at a 0.5
threshold (Macro-F1 is the paper's headline: it weighs rare diseases like common ones), plus
per-class figures with ROC AUC, mean +- std across cross-validation folds, and a paired t-test
across folds between two runs (how DrCT1 and DrCT2 are compared, Table 3).

Pure functions on numpy arrays, checked against hand-computed cases and scikit-learn:
precision/recall/F1 use sklearn's ``zero_division=0`` convention (an undefined ratio is 0) and
F1 = 2 TP / (2 TP + FP + FN); a class is predicted when prob >= threshold; the AUC of a class
whose labels are all equal is undefined (NaN, skipped by the macro AUC).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

MACRO_KEYS = ("macro_f1", "macro_precision", "macro_recall", "macro_auc")
CLASS_KEYS = ("precision", "recall", "f1", "auc")


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, np.float64)
    den = np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def confusion_counts(labels: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """Per-class TP, FP, FN, TN for (n, C) binary labels and (n, C) probabilities."""
    y = np.asarray(labels) > 0.5
    p = np.asarray(prob) >= threshold
    return {
        "tp": (y & p).sum(0),
        "fp": (~y & p).sum(0),
        "fn": (y & ~p).sum(0),
        "tn": (~y & ~p).sum(0),
    }


def precision_recall_f1(labels: np.ndarray, prob: np.ndarray, threshold: float = 0.5):
    """Per-class (precision, recall, f1), each (C,), at `threshold`."""
    c = confusion_counts(labels, prob, threshold)
    precision = _ratio(c["tp"], c["tp"] + c["fp"])
    recall = _ratio(c["tp"], c["tp"] + c["fn"])
    f1 = _ratio(2 * c["tp"], 2 * c["tp"] + c["fp"] + c["fn"])
    return precision, recall, f1


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of one class (Mann-Whitney U with mid-ranks for ties);
    NaN when only one class is present."""
    y = np.asarray(labels).ravel() > 0.5
    s = np.asarray(scores, np.float64).ravel()
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(
    labels: np.ndarray, prob: np.ndarray, names: Sequence[str], threshold: float = 0.5
) -> dict:
    """Macro and per-class metrics of one set of predictions (e.g. one fold)."""
    labels = np.asarray(labels, np.float64)
    prob = np.asarray(prob, np.float64)
    if labels.shape != prob.shape or labels.ndim != 2 or labels.shape[1] != len(names):
        raise ValueError(f"labels {labels.shape} and prob {prob.shape} must both be (n, {len(names)})")
    precision, recall, f1 = precision_recall_f1(labels, prob, threshold)
    auc = np.array([roc_auc(labels[:, j], prob[:, j]) for j in range(labels.shape[1])])
    return {
        "n": int(labels.shape[0]),
        "macro_f1": float(f1.mean()),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_auc": float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan"),
        "per_class": {
            name: {
                "precision": float(precision[j]),
                "recall": float(recall[j]),
                "f1": float(f1[j]),
                "auc": float(auc[j]),
                "support": int((labels[:, j] > 0.5).sum()),
            }
            for j, name in enumerate(names)
        },
    }


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN with one value), ignoring NaNs."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def cross_validation_metrics(
    labels: np.ndarray, prob: np.ndarray, fold: np.ndarray, names: Sequence[str], threshold: float = 0.5
) -> dict:
    """Metrics per fold, then mean and std over folds (``macro_f1``, ``macro_f1_std``, ...),
    per-class means over folds, and the metrics of all out-of-fold predictions pooled."""
    fold = np.asarray(fold)
    per_fold = []
    for k in sorted(set(fold.tolist())):
        rows = fold == k
        entry = classification_metrics(labels[rows], prob[rows], names, threshold)
        entry["fold"] = int(k)
        per_fold.append(entry)
    result: dict = {"threshold": float(threshold), "n_folds": len(per_fold)}
    for key in MACRO_KEYS:
        mean, std = _mean_std([f[key] for f in per_fold])
        result[key] = mean
        result[f"{key}_std"] = std
    result["per_class"] = {}
    for name in names:
        entry = {}
        for key in CLASS_KEYS:
            mean, std = _mean_std([f["per_class"][name][key] for f in per_fold])
            entry[key] = mean
            entry[f"{key}_std"] = std
        result["per_class"][name] = entry
    result["pooled"] = classification_metrics(labels, prob, names, threshold)
    result["per_fold"] = per_fold
    return result


def paired_ttest(run_a: dict, run_b: dict, key: str = "macro_f1") -> dict:
    """Paired t-test (scipy.stats.ttest_rel) of `key` between two runs' per-fold metrics,
    matched by fold number (the folds must be the same split: same seed, folds and cache)."""
    a = {f["fold"]: f[key] for f in run_a["per_fold"]}
    b = {f["fold"]: f[key] for f in run_b["per_fold"]}
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        raise ValueError(f"a paired t-test needs at least 2 common folds; the runs share {len(common)}")
    va = np.array([a[k] for k in common])
    vb = np.array([b[k] for k in common])
    test = stats.ttest_rel(va, vb)
    return {
        "metric": key,
        "folds": common,
        "mean_a": float(va.mean()),
        "mean_b": float(vb.mean()),
        "mean_difference": float((va - vb).mean()),
        "statistic": float(test.statistic),
        "pvalue": float(test.pvalue),
    }


def json_safe(value):
    """NaN/inf -> None recursively, so the JSON is strict (dvc metrics show, browsers)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
