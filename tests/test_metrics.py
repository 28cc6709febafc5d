"""Metrics against hand-computed cases and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

from pipeline.metrics import (
    classification_metrics,
    cross_validation_metrics,
    json_safe,
    paired_ttest,
    roc_auc,
)


def test_hand_computed_case():
    # class a: TP=2 FP=1 FN=0 -> P=2/3 R=1 F1=0.8 ; class b: TP=1 FP=0 FN=1 -> P=1 R=0.5 F1=2/3
    labels = np.array([[1, 1], [1, 0], [0, 1], [0, 0]])
    prob = np.array([[0.9, 0.8], [0.5, 0.2], [0.7, 0.4], [0.1, 0.3]])
    m = classification_metrics(labels, prob, ["a", "b"])
    assert m["per_class"]["a"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["a"]["recall"] == 1.0
    assert m["per_class"]["a"]["f1"] == pytest.approx(0.8)
    assert m["per_class"]["b"]["f1"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert m["macro_precision"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["macro_recall"] == pytest.approx(0.75)
    # class a AUC: positives 0.9, 0.5 vs negatives 0.7, 0.1 -> 3 of 4 pairs ordered
    assert m["per_class"]["a"]["auc"] == pytest.approx(0.75)


def test_against_sklearn_random():
    rng = np.random.default_rng(0)
    labels = (rng.random((300, 6)) < [0.5, 0.3, 0.1, 0.05, 0.02, 0.0]).astype(float)
    prob = np.clip(labels * 0.3 + rng.random((300, 6)) * 0.7, 0, 1).round(2)  # ties included
    m = classification_metrics(labels, prob, list("abcdef"))
    pred = (prob >= 0.5).astype(int)
    p, r, f, _ = precision_recall_fscore_support(labels, pred, average="macro", zero_division=0)
    assert (m["macro_precision"], m["macro_recall"], m["macro_f1"]) == pytest.approx((p, r, f))
    p, r, f, _ = precision_recall_fscore_support(labels, pred, average=None, zero_division=0)
    for j, name in enumerate("abcdef"):
        assert m["per_class"][name]["f1"] == pytest.approx(f[j])
        if 0 < labels[:, j].sum() < len(labels):
            assert roc_auc(labels[:, j], prob[:, j]) == pytest.approx(roc_auc_score(labels[:, j], prob[:, j]))
    assert math.isnan(m["per_class"]["f"]["auc"])  # no positives: undefined
    aucs = [m["per_class"][n]["auc"] for n in "abcde"]
    assert m["macro_auc"] == pytest.approx(np.mean(aucs))


def test_fold_mean_and_std():
    labels = np.array([[1], [0], [1], [0], [1], [0]])
    prob = np.array([[0.9], [0.1], [0.2], [0.1], [0.8], [0.9]])
    fold = np.array([0, 0, 1, 1, 2, 2])
    m = cross_validation_metrics(labels, prob, fold, ["x"])
    f1s = [1.0, 0.0, 2 / 3]
    assert [f["macro_f1"] for f in m["per_fold"]] == pytest.approx(f1s)
    assert m["macro_f1"] == pytest.approx(np.mean(f1s))
    assert m["macro_f1_std"] == pytest.approx(np.std(f1s, ddof=1))
    assert m["per_class"]["x"]["f1"] == pytest.approx(np.mean(f1s))
    assert m["pooled"]["n"] == 6


def test_paired_ttest_matches_scipy_and_needs_two_folds():
    a = {"per_fold": [{"fold": k, "macro_f1": v} for k, v in enumerate([0.90, 0.92, 0.91, 0.95])]}
    b = {"per_fold": [{"fold": k, "macro_f1": v} for k, v in enumerate([0.88, 0.91, 0.87, 0.93])]}
    result = paired_ttest(a, b)
    expected = stats.ttest_rel([0.90, 0.92, 0.91, 0.95], [0.88, 0.91, 0.87, 0.93])
    assert result["statistic"] == pytest.approx(expected.statistic)
    assert result["pvalue"] == pytest.approx(expected.pvalue)
    assert result["mean_difference"] == pytest.approx(0.0225)
    with pytest.raises(ValueError, match="at least 2 common folds"):
        paired_ttest(a, {"per_fold": [{"fold": 0, "macro_f1": 0.5}]})


def test_json_safe_replaces_nan():
    assert json_safe({"a": float("nan"), "b": [np.float32(1.5), np.int64(2)]}) == {"a": None, "b": [1.5, 2]}
