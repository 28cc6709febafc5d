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
F1 = 2 TP / (2 TP + FP + FN); a class is predicted when prob >= threshold (one number, or one per
class, or one per scan and class: it broadcasts against the (n, C) probabilities); the AUC of a class
whose labels are all equal is undefined (NaN, skipped by the macro AUC).
"""

from __future__ import annotations

import math
import warnings
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
    labels: np.ndarray, prob: np.ndarray, fold: np.ndarray, names: Sequence[str], threshold=0.5
) -> dict:
    """The metrics of a cross-validated run (`threshold`: a number, one per class (C,) or one per
    scan and class (n, C)): the pooled out-of-fold figures as the headline
    (``macro_f1``, per-class ``f1``, ...), each with the mean and sample std over folds beside it
    (``macro_f1_fold_mean``, ``macro_f1_fold_std``; per class ``f1_fold_mean``, ``f1_fold_std``),
    and every fold's own figures in ``per_fold``. A fold's macro average leaves out the classes
    without positives in that fold (listed in its ``classes_left_out``), and a class's fold
    statistics run over the folds where it has positives."""
    labels = np.asarray(labels, np.float64)
    prob = np.asarray(prob, np.float64)
    fold = np.asarray(fold)
    per_fold = []
    threshold = np.asarray(threshold, np.float64)
    for k in sorted(set(fold.tolist())):
        rows = fold == k
        entry = classification_metrics(labels[rows], prob[rows], names, threshold[rows] if threshold.ndim == 2 else threshold)
        entry["fold"] = int(k)
        per_fold.append(entry)
    pooled = classification_metrics(labels, prob, names, threshold)
    result: dict = {"threshold": float(threshold) if threshold.ndim == 0 else threshold.tolist(),
                    "n_folds": len(per_fold), "n": pooled["n"]}
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
    patient_index, draws = patient_draws(patients, resamples, seed)
    members = [np.flatnonzero(patient_index == p) for p in range(patient_index.max() + 1)]
    values = []
    for drawn in draws:
        rows = np.concatenate([members[p] for p in drawn])
        value = statistic(labels[rows], prob[rows])
        if np.isfinite(value):
            values.append(value)
    low, high = percentile_interval(values, level)
    return float(statistic(labels, prob)), low, high


# -- the patient bootstrap of every figure at once --------------------------------------------------
#
# One resample draws len(patients) patients with replacement (`patient_draws`, the same draws as
# `patient_bootstrap_ci`); a scan enters the resample as many times as its patient was drawn. The
# figures of a resample are those of `classification_metrics` (and `average_precision`) on the
# resampled rows, computed from each scan's multiplicity instead of copying rows: counts are weighted
# sums, and the rank AUC and the AP of repeated rows are sums over groups of tied scores.

BOOT_MACRO = ("macro_f1", "macro_precision", "macro_recall", "macro_auc", "macro_ap")
BOOT_CLASS = ("precision", "recall", "f1", "auc", "ap")
RESAMPLES = 2000


def patient_draws(patients: Sequence, resamples: int = RESAMPLES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(patient_index (n,), draws (resamples, P)): each scan's patient number (patients sorted as
    text) and, per resample, the P patients drawn with replacement. Seeded; one stream for every
    bootstrap here, so two runs resampled with the same seed and patients see the same draws."""
    _, patient_index = np.unique(np.asarray(patients).astype(str), return_inverse=True)
    n_patients = int(patient_index.max()) + 1 if len(patient_index) else 0
    rng = np.random.default_rng(seed)
    return patient_index, rng.integers(0, n_patients, (int(resamples), n_patients))


def percentile_interval(values, level: float = 0.95) -> tuple[float, float]:
    """(low, high): the percentile interval of the finite `values` (NaN, NaN if none)."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of one class, scikit-learn's definition (sum over the distinct scores,
    from the highest, of the recall gained times the precision there); NaN without a positive."""
    return float(_weighted_rank_figures(np.asarray(labels, np.float64), np.asarray(scores, np.float64),
                                        np.ones((1, len(np.ravel(labels)))))[1][0])


def _weighted_rank_figures(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(auc, ap), each (R,), of one class for R rows of scan multiplicities `weights` (R, n):
    the Mann-Whitney AUC (ties one half) and the average precision of the sample in which scan i
    appears weights[r, i] times. NaN labels are left out; NaN where a figure is undefined."""
    labels = np.ravel(labels)
    known = ~np.isnan(labels)
    y, s, w = labels[known] > 0.5, np.ravel(scores)[known], weights[:, known]
    order = np.argsort(s, kind="stable")
    s, y, w = s[order], y[order], w[:, order]
    if not len(s):
        nan = np.full(len(weights), np.nan)
        return nan, nan
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores, ascending
    pos = np.add.reduceat(w * y, starts, axis=1)
    neg = np.add.reduceat(w * ~y, starts, axis=1)
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    below = np.cumsum(neg, 1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos * (below + 0.5 * neg)).sum(1) / (n_pos * n_neg)
        tp_at = n_pos[:, None] - np.cumsum(pos, 1) + pos  # called positive at threshold = this score
        fp_at = n_neg[:, None] - np.cumsum(neg, 1) + neg
        precision = np.where(tp_at + fp_at > 0, tp_at / np.maximum(tp_at + fp_at, 1e-300), 0.0)
        ap = (pos * precision).sum(1) / n_pos
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    ap[n_pos == 0] = np.nan
    return auc, ap


def _replicate_figures(labels: np.ndarray, prob: np.ndarray, weights: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Every figure of BOOT_CLASS (R, C) and BOOT_MACRO (R,) for R rows of scan multiplicities."""
    known = ~np.isnan(labels)
    y, p = (labels > 0.5) & known, (prob >= threshold) & known
    neg = known & ~(labels > 0.5)
    tp, fp, fn = weights @ (y & p), weights @ (neg & p), weights @ (y & ~p)
    out = {
        "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }
    ranked = [_weighted_rank_figures(labels[:, c], prob[:, c], weights) for c in range(labels.shape[1])]
    out["auc"] = np.stack([r[0] for r in ranked], 1)
    out["ap"] = np.stack([r[1] for r in ranked], 1)
    present = (weights @ y) > 0  # the classes with a positive in the resample: classification_metrics' rule
    for key in BOOT_CLASS:
        values = np.where(present & np.isfinite(out[key]), out[key], np.nan)
        with warnings.catch_warnings():  # a row without any usable class is NaN, as intended
            warnings.simplefilter("ignore", RuntimeWarning)
            out[f"macro_{key}"] = np.nanmean(values, 1)
    return out


def bootstrap_replicates(labels: np.ndarray, prob: np.ndarray, patients: Sequence, threshold: float = 0.5,
                         resamples: int = RESAMPLES, seed: int = 0, chunk: int = 250) -> dict[str, np.ndarray]:
    """The figures of every patient-bootstrap resample: BOOT_MACRO keys (R,), BOOT_CLASS keys (R, C).
    Resample r equals `classification_metrics` (and `average_precision`) on the rows of the patients
    of draws[r] (`patient_draws(patients, resamples, seed)`), tested against that loop."""
    labels, prob = np.asarray(labels, np.float64), np.asarray(prob, np.float64)
    patient_index, draws = patient_draws(patients, resamples, seed)
    n_patients = draws.shape[1]
    parts = []
    for start in range(0, len(draws), chunk):
        block = draws[start:start + chunk]
        counts = np.zeros((len(block), n_patients))
        np.add.at(counts, (np.repeat(np.arange(len(block)), n_patients), block.ravel()), 1.0)
        parts.append(_replicate_figures(labels, prob, counts[:, patient_index], threshold))
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def bootstrap_intervals(labels: np.ndarray, prob: np.ndarray, patients: Sequence, names: Sequence[str],
                        threshold: float = 0.5, resamples: int = RESAMPLES, level: float = 0.95, seed: int = 0) -> dict:
    """Point figures and patient-bootstrap percentile intervals: ``{macro_f1: {value, ci_low,
    ci_high}, ..., per_class: {name: {f1: {...}, ...}}, resamples, level, seed, n_patients}``.
    The values are `classification_metrics`' (plus AP, macro AP over the same classes)."""
    labels, prob = np.asarray(labels, np.float64), np.asarray(prob, np.float64)
    point = _replicate_figures(labels, prob, np.ones((1, len(labels))), threshold)
    reps = bootstrap_replicates(labels, prob, patients, threshold, resamples, seed)

    def entry(value, replicates) -> dict:
        low, high = percentile_interval(replicates, level)
        return {"value": float(value), "ci_low": low, "ci_high": high}

    result = {key: entry(point[key][0], reps[key]) for key in BOOT_MACRO}
    result["per_class"] = {
        name: {key: entry(point[key][0, c], reps[key][:, c]) for key in BOOT_CLASS} for c, name in enumerate(names)
    }
    result.update(resamples=int(resamples), level=float(level), seed=int(seed),
                  n_patients=len(np.unique(np.asarray(patients).astype(str))))
    return result


def paired_bootstrap(run_a: tuple[np.ndarray, np.ndarray], run_b: tuple[np.ndarray, np.ndarray], patients: Sequence,
                     threshold=0.5, resamples: int = RESAMPLES, level: float = 0.95, seed: int = 0,
                     keys: Sequence[str] = BOOT_MACRO, threshold_b=None) -> dict:
    """The difference A - B of each macro figure on the same scans (rows aligned; (labels, prob) each),
    with its paired patient-bootstrap interval (both runs resampled with the same draws) and a
    two-sided p-value: p = min(1, 2 (min(#{d <= 0}, #{d >= 0}) + 1) / (R + 1)), the add-one bootstrap
    p of "no difference" (Davison & Hinkley 1997, eq. 4.11), so never 0 from a finite R.
    `threshold_b`: B's own threshold(s) if they differ from A's (`threshold`)."""
    threshold_b = threshold if threshold_b is None else threshold_b
    labels_a, prob_a = (np.asarray(x, np.float64) for x in run_a)
    labels_b, prob_b = (np.asarray(x, np.float64) for x in run_b)
    if labels_a.shape != labels_b.shape or prob_a.shape != prob_b.shape:
        raise ValueError(f"the runs do not cover the same scans: {prob_a.shape} vs {prob_b.shape}")
    point_a = _replicate_figures(labels_a, prob_a, np.ones((1, len(labels_a))), threshold)
    point_b = _replicate_figures(labels_b, prob_b, np.ones((1, len(labels_b))), threshold_b)
    reps_a = bootstrap_replicates(labels_a, prob_a, patients, threshold, resamples, seed)
    reps_b = bootstrap_replicates(labels_b, prob_b, patients, threshold_b, resamples, seed)
    out = {}
    for key in keys:
        d = reps_a[key] - reps_b[key]
        d = d[np.isfinite(d)]
        low, high = percentile_interval(d, level)
        p = min(1.0, 2.0 * (min(int((d <= 0).sum()), int((d >= 0).sum())) + 1) / (len(d) + 1)) if len(d) else float("nan")
        out[key] = {"a": float(point_a[key][0]), "b": float(point_b[key][0]),
                    "difference": float(point_a[key][0] - point_b[key][0]), "ci_low": low, "ci_high": high, "pvalue": p}
    return {"metrics": out, "resamples": int(resamples), "level": float(level), "seed": int(seed)}
