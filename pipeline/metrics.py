"""Evaluation metrics (paper VI.A.1): macro precision, recall and F1 over classes at a
threshold (0.5 by default: our choice, the paper does not state one; Macro-F1 is the paper's
headline: it weighs rare diseases like common ones), plus per-class figures with ROC AUC, and a
paired t-test across folds between two runs (how DrCT1 and DrCT2 are compared, Table 3).

This module is the one definition of every metric the pipeline reports (`drct evaluate`,
`drct interpret`, the trainer's validation figure):

* The headline of a cross-validated run is **pooled out-of-fold**: every scan is predicted once,
  by the fold that held it out, and the metrics are computed over all of them together
  (``macro_f1``). The mean and sample std of the per-fold figures sit beside it
  (``macro_f1_fold_mean``, ``macro_f1_fold_std``).
* A macro average runs over the classes with at least one positive scan in the evaluated set.
  A class without positives has no recall and an F1 of 0 whatever the model does (CQ500 EDH has
  ~13 positive patients over 10 folds: counting it as 0 in the folds that lack it costs ~0.03
  macro-F1), so it is left out of that set's macro average and named in ``classes_left_out``.
  Its per-class figures are still reported.
* A label that is NaN (unknown) leaves that scan out of that class only.

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
    """Per-class TP, FP, FN, TN for (n, C) binary labels and (n, C) probabilities; a NaN
    label is not counted for its class."""
    labels = np.asarray(labels, np.float64)
    known = ~np.isnan(labels)
    y = labels > 0.5
    p = np.asarray(prob) >= threshold
    return {
        "tp": (known & y & p).sum(0),
        "fp": (known & ~y & p).sum(0),
        "fn": (known & y & ~p).sum(0),
        "tn": (known & ~y & ~p).sum(0),
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
    labels = np.asarray(labels, np.float64).ravel()
    known = ~np.isnan(labels)
    y = labels[known] > 0.5
    s = np.asarray(scores, np.float64).ravel()[known]
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(
    labels: np.ndarray, prob: np.ndarray, names: Sequence[str], threshold: float = 0.5
) -> dict:
    """Macro and per-class metrics of one set of predictions (e.g. one fold, or all out-of-fold
    predictions pooled). The macro averages skip classes without a positive (``classes_left_out``)."""
    labels = np.asarray(labels, np.float64)
    prob = np.asarray(prob, np.float64)
    if labels.shape != prob.shape or labels.ndim != 2 or labels.shape[1] != len(names):
        raise ValueError(f"labels {labels.shape} and prob {prob.shape} must both be (n, {len(names)})")
    precision, recall, f1 = precision_recall_f1(labels, prob, threshold)
    auc = np.array([roc_auc(labels[:, j], prob[:, j]) for j in range(labels.shape[1])])
    present = (labels > 0.5).sum(0) > 0

    def macro(values: np.ndarray) -> float:
        values = values[present & np.isfinite(values)]
        return float(values.mean()) if len(values) else float("nan")

    return {
        "n": int(labels.shape[0]),
        "macro_f1": macro(f1),
        "macro_precision": macro(precision),
        "macro_recall": macro(recall),
        "macro_auc": macro(auc),
        "classes_left_out": [str(name) for j, name in enumerate(names) if not present[j]],
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
    """The metrics of a cross-validated run: the pooled out-of-fold figures as the headline
    (``macro_f1``, per-class ``f1``, ...), each with the mean and sample std over folds beside it
    (``macro_f1_fold_mean``, ``macro_f1_fold_std``; per class ``f1_fold_mean``, ``f1_fold_std``),
    and every fold's own figures in ``per_fold``. A fold's macro average leaves out the classes
    without positives in that fold (listed in its ``classes_left_out``), and a class's fold
    statistics run over the folds where it has positives."""
    labels = np.asarray(labels, np.float64)
    prob = np.asarray(prob, np.float64)
    fold = np.asarray(fold)
    per_fold = []
    for k in sorted(set(fold.tolist())):
        rows = fold == k
        entry = classification_metrics(labels[rows], prob[rows], names, threshold)
        entry["fold"] = int(k)
        per_fold.append(entry)
    pooled = classification_metrics(labels, prob, names, threshold)
    result: dict = {"threshold": float(threshold), "n_folds": len(per_fold), "n": pooled["n"]}
    for key in MACRO_KEYS:
        mean, std = _mean_std([f[key] for f in per_fold])
        result[key] = pooled[key]
        result[f"{key}_fold_mean"] = mean
        result[f"{key}_fold_std"] = std
    result["classes_left_out"] = pooled["classes_left_out"]
    result["folds_leaving_out"] = {
        name: [f["fold"] for f in per_fold if name in f["classes_left_out"]]
        for name in names
        if any(name in f["classes_left_out"] for f in per_fold)
    }
    result["per_class"] = {}
    for name in names:
        entry = dict(pooled["per_class"][name])
        present = [f for f in per_fold if name not in f["classes_left_out"]]
        for key in CLASS_KEYS:
            mean, std = _mean_std([f["per_class"][name][key] for f in present])
            entry[f"{key}_fold_mean"] = mean
            entry[f"{key}_fold_std"] = std
        result["per_class"][name] = entry
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


def binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic on average ranks (ties count one half): the value of
    scikit-learn's roc_auc_score, without its per-call validation (the bootstrap calls it 10^4 times)."""
    y = np.asarray(y) > 0.5
    positives, negatives = int(y.sum()), int((~y).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = stats.rankdata(score)
    return float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def macro_auc(labels: np.ndarray, prob: np.ndarray) -> float:
    """Mean ROC AUC over the classes whose (known) labels hold both values; NaN if none does."""
    labels = np.asarray(labels, np.float64)
    prob = np.asarray(prob)
    aucs = []
    for c in range(labels.shape[1]):
        known = ~np.isnan(labels[:, c])
        value = binary_auc(labels[known, c], prob[known, c])
        if np.isfinite(value):
            aucs.append(value)
    return float(np.mean(aucs)) if aucs else float("nan")


def patient_bootstrap_ci(
    labels: np.ndarray, prob: np.ndarray, patients: Sequence, statistic=macro_auc,
    resamples: int = 2000, level: float = 0.95, seed: int = 0,
) -> tuple[float, float, float]:
    """(estimate, low, high): `statistic(labels, prob)` and its percentile bootstrap interval,
    resampling patients with replacement (all scans of a drawn patient come along), so scans of
    one patient, which are not independent, never pass for independent evidence. Seeded."""
    labels, prob = np.asarray(labels), np.asarray(prob)
    _, patient_index = np.unique(np.asarray(patients).astype(str), return_inverse=True)
    members = [np.flatnonzero(patient_index == p) for p in range(patient_index.max() + 1)]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(resamples)):
        rows = np.concatenate([members[p] for p in rng.integers(0, len(members), len(members))])
        value = statistic(labels[rows], prob[rows])
        if np.isfinite(value):
            values.append(value)
    tail = (1.0 - level) / 2.0
    low, high = (np.quantile(values, [tail, 1.0 - tail]) if values else (float("nan"), float("nan")))
    return float(statistic(labels, prob)), float(low), float(high)
