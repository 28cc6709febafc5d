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
    # the macro average runs over the classes with positives (f has none): sklearn on a..e
    p, r, f, _ = precision_recall_fscore_support(labels, pred, labels=range(5), average="macro", zero_division=0)
    assert (m["macro_precision"], m["macro_recall"], m["macro_f1"]) == pytest.approx((p, r, f))
    assert m["classes_left_out"] == ["f"]
    p, r, f, _ = precision_recall_fscore_support(labels, pred, average=None, zero_division=0)
    for j, name in enumerate("abcdef"):
        assert m["per_class"][name]["f1"] == pytest.approx(f[j])
        if 0 < labels[:, j].sum() < len(labels):
            assert roc_auc(labels[:, j], prob[:, j]) == pytest.approx(roc_auc_score(labels[:, j], prob[:, j]))
    assert math.isnan(m["per_class"]["f"]["auc"])  # no positives: undefined
    aucs = [m["per_class"][n]["auc"] for n in "abcde"]
    assert m["macro_auc"] == pytest.approx(np.mean(aucs))


def test_pooled_headline_with_fold_mean_and_std_beside_it():
    labels = np.array([[1], [0], [1], [0], [1], [0]])
    prob = np.array([[0.9], [0.1], [0.2], [0.1], [0.8], [0.9]])
    fold = np.array([0, 0, 1, 1, 2, 2])
    m = cross_validation_metrics(labels, prob, fold, ["x"])
    f1s = [1.0, 0.0, 2 / 3]
    assert [f["macro_f1"] for f in m["per_fold"]] == pytest.approx(f1s)
    # pooled: TP=2 (0.9, 0.8), FN=1 (0.2), FP=1 (0.9) -> F1 = 4 / 6
    assert m["macro_f1"] == pytest.approx(2 / 3)
    assert m["macro_precision"] == pytest.approx(2 / 3) and m["macro_recall"] == pytest.approx(2 / 3)
    assert m["macro_f1_fold_mean"] == pytest.approx(np.mean(f1s))
    assert m["macro_f1_fold_std"] == pytest.approx(np.std(f1s, ddof=1))
    assert m["per_class"]["x"]["f1"] == pytest.approx(2 / 3)
    assert m["per_class"]["x"]["f1_fold_mean"] == pytest.approx(np.mean(f1s))
    assert m["n"] == 6 and "pooled" not in m and "macro_f1_std" not in m


def test_fold_without_positives_is_left_out_of_that_folds_macro_average():
    # class b has no positive in fold 1: its F1 there would be 0 whatever the model does
    labels = np.array([[1, 1], [0, 0], [1, 0], [0, 0]])
    prob = np.array([[0.9, 0.8], [0.1, 0.1], [0.8, 0.1], [0.2, 0.3]])
    fold = np.array([0, 0, 1, 1])
    m = cross_validation_metrics(labels, prob, fold, ["a", "b"])
    f0, f1 = m["per_fold"]
    assert f0["macro_f1"] == 1.0 and f0["classes_left_out"] == []
    assert f1["macro_f1"] == 1.0 and f1["classes_left_out"] == ["b"]  # not (1 + 0) / 2
    assert f1["per_class"]["b"]["f1"] == 0.0  # still reported per class
    assert m["folds_leaving_out"] == {"b": [1]}
    assert m["macro_f1_fold_mean"] == 1.0
    assert m["per_class"]["b"]["f1_fold_mean"] == 1.0  # over the folds where b has positives
    assert m["macro_f1"] == 1.0 and m["classes_left_out"] == []


def test_unknown_labels_leave_the_scan_out_of_that_class_only():
    labels = np.array([[1, np.nan], [0, 1], [np.nan, 0]])
    prob = np.array([[0.9, 0.9], [0.9, 0.9], [0.9, 0.1]])
    m = classification_metrics(labels, prob, ["a", "b"])
    assert m["per_class"]["a"]["precision"] == 0.5 and m["per_class"]["a"]["recall"] == 1.0
    assert m["per_class"]["b"]["f1"] == 1.0 and m["per_class"]["b"]["auc"] == 1.0


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


def _flatten(value, prefix=""):
    """{"a": {"b": 1}} -> {"a.b": 1}: the names `dvc metrics show` displays."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def test_interpret_and_evaluate_agree_on_every_shared_metric(tmp_path):
    """One name, one number: interpret.json and metrics.json share keys (macro_f1, model, ...),
    and every shared key has the same value; interpret's macro-F1 is the pooled one."""
    import json
    import sys
    from pathlib import Path

    from click.testing import CliRunner

    sys.path.insert(0, str(Path(__file__).parent))
    from report_fixtures import cache_from_index, run_from_cache, tiny_provenance

    from pipeline.data.index import build_scan_index
    from pipeline.synthetic.phantom import make_phantom
    from stages.cli import main

    make_phantom(tmp_path / "dicom", layout="rsna", scans=6, seed=2, size=32)
    index = build_scan_index(tmp_path / "dicom", "rsna", workers=1, progress=False)
    provenance = tiny_provenance()
    cache = cache_from_index(index, tmp_path / "f.h5", provenance)
    run = run_from_cache(tmp_path / "run", cache, index, provenance, m=8)
    oof = dict(np.load(run / "oof.npz"))
    oof["fold"] = np.arange(len(oof["fold"])) % 2  # two folds: pooled != fold mean in general
    np.savez(run / "oof.npz", **oof)
    runner = CliRunner()
    assert (result := runner.invoke(main, ["evaluate", str(run)])).exit_code == 0, result.output
    assert (result := runner.invoke(main, ["interpret", str(run)])).exit_code == 0, result.output
    metrics = _flatten(json.loads((run / "metrics.json").read_text()))
    interpretation = _flatten(json.loads((run / "interpret.json").read_text()))
    shared = set(metrics) & set(interpretation)
    assert "macro_f1" in shared
    for key in shared:
        assert metrics[key] == pytest.approx(interpretation[key]), key
    expected = classification_metrics(oof["labels"], oof["prob"], index.label_names)["macro_f1"]
    assert interpretation["macro_f1"] == pytest.approx(expected)


def test_interpret_macro_f1_is_the_metrics_module_one():
    # the case: interpret counted a class with no positives and no predictions as F1 = 1
    labels = np.array([[1, 0], [0, 0], [1, 0]], float)
    prob = np.array([[0.9, 0.1], [0.1, 0.1], [0.1, 0.1]])
    from stages.interpret import macro_f1

    m = classification_metrics(labels, prob, ["a", "b"])
    assert m["classes_left_out"] == ["b"] and m["macro_f1"] == pytest.approx(2 / 3)
    assert macro_f1(labels, prob, 0.5) == m["macro_f1"]


# -- the patient bootstrap ------------------------------------------------------------------------

from pipeline.metrics import (
    average_precision,
    bootstrap_intervals,
    bootstrap_replicates,
    paired_bootstrap,
    patient_bootstrap_ci,
    patient_draws,
)


def test_bootstrap_of_two_patients_by_hand():
    # one class; patient A: a TP, patient B: a FN. Resamples AA (p 1/4): F1 1; AB (1/2): 2/3; BB (1/4): 0
    labels, prob = np.array([[1.0], [1.0]]), np.array([[0.9], [0.1]])
    reps = bootstrap_replicates(labels, prob, ["A", "B"], resamples=2000, seed=0)["macro_f1"]
    values, counts = np.unique(reps.round(12), return_counts=True)
    assert values.tolist() == pytest.approx([0.0, 2 / 3, 1.0])
    assert (counts / 2000).tolist() == pytest.approx([0.25, 0.5, 0.25], abs=0.04)
    ci = bootstrap_intervals(labels, prob, ["A", "B"], ["x"])
    assert (ci["macro_f1"]["value"], ci["macro_f1"]["ci_low"], ci["macro_f1"]["ci_high"]) == pytest.approx((2 / 3, 0.0, 1.0))
    assert ci["n_patients"] == 2 and ci["resamples"] == 2000


def test_bootstrap_resamples_patients_not_scans():
    # patient A: scans (y1, .9) and (y0, .8); patient B: (y1, .2). Patient resamples give only
    # AA: TP2 FP2 -> F1 2/3; AB: TP1 FP1 FN1 -> 1/2; BB: FN2 -> 0. Scan resampling would also give
    # e.g. {a1, a1, b1}: TP2 FN1 -> 4/5.
    labels, prob = np.array([[1.0], [0.0], [1.0]]), np.array([[0.9], [0.8], [0.2]])
    reps = bootstrap_replicates(labels, prob, ["A", "A", "B"], resamples=500, seed=1)["macro_f1"]
    assert set(reps.round(12).tolist()) == {round(2 / 3, 12), 0.5, 0.0}


def test_vectorised_bootstrap_equals_the_loop_over_resampled_rows():
    """Resample r of bootstrap_replicates is classification_metrics / sklearn's AP on the rows of
    the patients patient_draws drew (NaN labels, ties, a rare class)."""
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(1)
    labels = (rng.random((40, 3)) < [0.3, 0.08, 0.5]).astype(float)
    labels[3, 1] = np.nan
    prob = (rng.random((40, 3)) * 0.6 + np.nan_to_num(labels) * 0.3).round(1)
    patients = rng.integers(0, 15, 40).astype(str)
    reps = bootstrap_replicates(labels, prob, patients, resamples=60, seed=3, chunk=7)
    index, draws = patient_draws(patients, 60, 3)
    members = [np.flatnonzero(index == p) for p in range(index.max() + 1)]
    for r in range(60):
        rows = np.concatenate([members[p] for p in draws[r]])
        m = classification_metrics(labels[rows], prob[rows], list("abc"))
        for key in ("macro_f1", "macro_precision", "macro_recall", "macro_auc"):
            assert reps[key][r] == pytest.approx(m[key], nan_ok=True), (r, key)
        for c, name in enumerate("abc"):
            assert reps["auc"][r, c] == pytest.approx(m["per_class"][name]["auc"], nan_ok=True)
            known = ~np.isnan(labels[rows, c])
            y = labels[rows, c][known]
            expected = average_precision_score(y, prob[rows, c][known]) if y.any() else np.nan
            assert reps["ap"][r, c] == pytest.approx(expected, nan_ok=True), (r, name)
    # the generic per-statistic bootstrap draws the same resamples
    _, low, high = patient_bootstrap_ci(labels, prob, patients, resamples=60, seed=3)
    assert (low, high) == pytest.approx(tuple(np.quantile(reps["macro_auc"][np.isfinite(reps["macro_auc"])], [0.025, 0.975])))


def test_average_precision_by_hand():
    # descending: .9 (pos) P=1 R=1/2; .8 (neg); .7 (pos) P=2/3 R=1 -> AP = 1/2 + 1/2 * 2/3
    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(0.5 + 1 / 3)
    # a tie of a positive and a negative at the top counts as one threshold: P = 1/2 there
    assert average_precision([1, 0, 1], [0.9, 0.9, 0.1]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert math.isnan(average_precision([0, 0], [0.1, 0.2]))


def test_paired_bootstrap_by_hand():
    labels = np.array([[1.0], [0.0], [1.0], [0.0]])
    good, bad = np.array([[0.9], [0.1], [0.8], [0.2]]), np.array([[0.1], [0.9], [0.2], [0.8]])
    patients = ["A", "B", "C", "D"]
    same = paired_bootstrap((labels, good), (labels, good), patients, resamples=500)["metrics"]["macro_f1"]
    assert (same["difference"], same["ci_low"], same["ci_high"], same["pvalue"]) == (0.0, 0.0, 0.0, 1.0)
    # A right and B wrong on every patient: every resample with a positive has d = 1, the rest are
    # NaN (no positive: no macro F1) and dropped; p = 2 (0 + 1) / (R' + 1) with R' finite differences
    result = paired_bootstrap((labels, good), (labels, bad), patients, resamples=500)["metrics"]["macro_f1"]
    reps = bootstrap_replicates(labels, good, patients, resamples=500)["macro_f1"]
    finite = int(np.isfinite(reps).sum())
    assert result["difference"] == 1.0 and result["ci_low"] == result["ci_high"] == 1.0
    assert result["pvalue"] == pytest.approx(2 / (finite + 1))


def test_paired_bootstrap_shares_the_draws():
    """Two runs that differ on one scan: the paired interval of the difference is far narrower
    than either run's own interval (it would not be if each run drew its own patients)."""
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 2)) < 0.4).astype(float)
    prob_a = np.clip(labels * 0.4 + rng.random((200, 2)) * 0.6, 0, 1)
    prob_b = prob_a.copy()
    prob_b[0] = 1 - prob_b[0]
    patients = np.arange(200).astype(str)
    d = paired_bootstrap((labels, prob_a), (labels, prob_b), patients, resamples=400)["metrics"]["macro_f1"]
    own = bootstrap_intervals(labels, prob_a, patients, ["a", "b"], resamples=400)["macro_f1"]
    assert (d["ci_high"] - d["ci_low"]) < 0.25 * (own["ci_high"] - own["ci_low"])
    assert d["ci_low"] <= d["difference"] <= d["ci_high"]
