"""Calibration (reliability bins, ECE, Brier) and the F1-maximising threshold against hand computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.calibration import calibration_curve

from pipeline.calibration import (
    calibration_report,
    cross_fitted_thresholds,
    f1_threshold,
    oof_thresholds,
    reliability,
    run_thresholds,
    write_reliability_png,
    write_thresholds,
)


def test_reliability_ece_and_brier_by_hand():
    labels = np.array([0, 1, 1, 0, 1], float)
    prob = np.array([0.05, 0.15, 0.1, 0.95, 0.85])
    r = reliability(labels, prob)
    # bins of width 0.1, an edge closes the lower bin (sklearn): 0.05, 0.1 -> bin 0; 0.15 -> 1; 0.85 -> 8; 0.95 -> 9
    assert r["count"] == [2, 1, 0, 0, 0, 0, 0, 0, 1, 1]
    # ECE = 2/5 |1/2 - .075| + 1/5 |1 - .15| + 1/5 |1 - .85| + 1/5 |0 - .95|
    assert r["ece"] == pytest.approx(0.4 * 0.425 + 0.2 * 0.85 + 0.2 * 0.15 + 0.2 * 0.95)
    # Brier = mean of (.05)^2, (.85)^2, (.9)^2, (.95)^2, (.15)^2
    assert r["brier"] == pytest.approx((0.0025 + 0.7225 + 0.81 + 0.9025 + 0.0225) / 5)
    filled = np.array(r["count"]) > 0
    frac, mean = calibration_curve(labels, prob, n_bins=10, strategy="uniform")
    np.testing.assert_allclose(np.array(r["frac_pos"])[filled], frac)
    np.testing.assert_allclose(np.array(r["mean_prob"])[filled], mean)


def test_calibration_report_skips_unknown_labels_and_averages_classes():
    labels = np.array([[1, np.nan], [0, 1], [1, 0]])
    prob = np.array([[1.0, 0.3], [0.0, 1.0], [1.0, 0.0]])
    report = calibration_report(labels, prob, ["a", "b"])
    assert report["per_class"]["a"]["ece"] == 0.0 and report["per_class"]["a"]["brier"] == 0.0
    assert report["per_class"]["b"]["n"] == 2 and report["per_class"]["b"]["brier"] == 0.0  # the NaN row is out
    labels[0, 1] = 0  # the unknown read becomes a negative scored 0.3
    report = calibration_report(labels, prob, ["a", "b"])
    assert report["per_class"]["b"]["brier"] == pytest.approx(0.09 / 3)
    assert report["macro_brier"] == pytest.approx(np.mean([0.0, 0.03]))


def test_f1_threshold_by_hand():
    # t=.9: F1 2/4; .8: 4/5; .7: 4/6; .4: 6/7; .2: 6/8 -> 0.4
    assert f1_threshold([1, 1, 0, 1, 0], [0.9, 0.8, 0.7, 0.4, 0.2]) == 0.4
    # a tie (t=.9 and t=.6 both 2/3): the higher threshold
    assert f1_threshold([1, 0, 0, 1], [0.9, 0.8, 0.7, 0.6]) == 0.9
    # tied scores are one threshold: .5 calls both of its scans
    assert f1_threshold([1, 0, 1, 0], [0.5, 0.5, 0.3, 0.1]) == 0.3
    assert f1_threshold([0, 0], [0.2, 0.9]) == 0.5 and f1_threshold([1, np.nan], [0.2, 0.9], default=0.4) == 0.4


def test_cross_fitted_thresholds_come_from_the_other_folds():
    labels = np.array([[1], [0], [1], [0]], float)
    prob = np.array([[0.9], [0.2], [0.6], [0.7]])
    fold = np.array([0, 0, 1, 1])
    t = cross_fitted_thresholds(labels, prob, fold)
    assert t[:2, 0].tolist() == [0.6, 0.6]  # fold 1's rows: t=.7 calls only the FP (F1 0); .6 -> 2/3
    assert t[2:, 0].tolist() == [0.9, 0.9]  # fold 0's rows: t = .9 is perfect
    assert oof_thresholds(labels, prob).tolist() == [0.6]  # all rows: .6 calls 3 (2 TP) -> 4/5; .9 -> 2/3


def test_thresholds_file_round_trip_and_refusals(tmp_path):
    assert run_thresholds(tmp_path, ["a", "b"]) is None
    write_thresholds(tmp_path, ["a", "b"], np.array([0.3, 0.7]))
    assert run_thresholds(tmp_path, ["a", "b"]).tolist() == [0.3, 0.7]
    assert run_thresholds(tmp_path, ["b", "a"]).tolist() == [0.7, 0.3]
    with pytest.raises(ValueError, match="not a thresholds file"):
        run_thresholds(tmp_path, ["a", "c"])
    (tmp_path / "thresholds.json").write_text(json.dumps({"thresholds": {"a": 2.0}}))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        run_thresholds(tmp_path, ["a"])


def test_reliability_png(tmp_path):
    rng = np.random.default_rng(0)
    report = calibration_report((rng.random((50, 4)) < 0.3).astype(float), rng.random((50, 4)), list("abcd"))
    path = write_reliability_png(report, tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _fake_run(path, labels, prob, fold):
    path.mkdir(parents=True)
    n = len(labels)
    (path / "run.json").write_text(json.dumps({"label_names": ["a"], "model": "drct1", "folds": 2}))
    np.savez(path / "oof.npz", scan_id=np.array([f"s{i}" for i in range(n)]), patient_id=np.array([f"p{i}" for i in range(n)]),
             fold=fold, labels=labels, prob=prob, prob_primary=prob, prob_aps=np.full_like(prob, np.nan))
    return path


def test_evaluate_threshold_from_oof_records_and_cross_fits(tmp_path):
    from click.testing import CliRunner

    from stages.cli import main

    labels = np.array([[1], [0], [1], [0]], float)
    prob = np.array([[0.9], [0.2], [0.6], [0.7]])
    run = _fake_run(tmp_path / "run", labels, prob, np.array([0, 0, 1, 1]))
    result = CliRunner().invoke(main, ["evaluate", str(run), "--threshold-from", "oof", "--resamples", "200"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "thresholds.json").read_text())["thresholds"] == {"a": 0.6}  # picked on all rows
    details = json.loads((run / "metrics_details.json").read_text())
    # cross-fitted: fold 0 at 0.6 (from fold 1): TP .9, TN .2; fold 1 at 0.9 (from fold 0): FN .6, TN .7 -> F1 2/3
    assert details["macro_f1"]["value"] == pytest.approx(2 / 3)
    assert details["per_class"]["a"]["threshold"] == 0.6 and details["threshold"]["source"] == "oof"
    # without the option: 0.5 for every class (TP .9, .6; FP .7) -> F1 4/5; thresholds.json stays for predict
    result = CliRunner().invoke(main, ["evaluate", str(run), "--resamples", "200"])
    assert json.loads((run / "metrics.json").read_text())["macro_f1"] == pytest.approx(0.8)
