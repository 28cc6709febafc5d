"""Patient-grouped k-fold split: no patient in two folds, every label stratified, fold files."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.labels import CQ500_LABELS
from pipeline.training.folds import FoldError, assign_folds, patients_split_across_folds, read_folds_file

# Approximate CQ500 positive patients per class (reads.csv majority, 491 patients; Chilamkurthy
# et al. 2018, Table 1): EDH is the rare one, 13 patients over 10 folds.
CQ500_POSITIVES = {"IPH": 134, "IVH": 28, "SDH": 53, "EDH": 13, "SAH": 60,
                   "CalvarialFracture": 39, "MassEffect": 127, "MidlineShift": 65}


def _data(n_patients=60, seed=0):
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 4, n_patients)  # 1-3 scans per patient (CQ500-like)
    patients = np.repeat([f"P{i}" for i in range(n_patients)], per)
    labels = (rng.random((len(patients), 3)) < 0.4).astype(np.float32)
    return patients, labels


def cq500_like(seed=0, n_patients=490):
    """490 patients, 1-4 scans each (~1181 scans), the CQ500 subtype counts; a patient's scans
    share its labels (the reads are per study); ICH = any bleed subtype."""
    rng = np.random.default_rng(seed)
    table = np.zeros((n_patients, len(CQ500_LABELS)), np.float32)
    for name, count in CQ500_POSITIVES.items():
        table[rng.choice(n_patients, count, replace=False), CQ500_LABELS.index(name)] = 1
    table[:, 0] = table[:, 1:6].max(1)
    per = rng.choice([1, 2, 3, 4], n_patients, p=[0.2, 0.35, 0.3, 0.15])
    patients = np.repeat([f"CQ500-CT-{i}" for i in range(n_patients)], per)
    return patients, np.repeat(table, per, axis=0)


def test_no_patient_in_two_folds_and_every_fold_used():
    patients, labels = _data()
    fold = assign_folds(patients, labels, 5, seed=0)
    assert fold.shape == (len(patients),) and set(fold.tolist()) == set(range(5))
    for p in set(patients):
        assert len(set(fold[patients == p].tolist())) == 1
    sizes = np.bincount(fold)
    assert sizes.min() >= 0.5 * sizes.mean()


def test_split_is_seeded_and_roughly_stratified():
    patients, labels = _data(200)
    a = assign_folds(patients, labels, 10, seed=3)
    np.testing.assert_array_equal(a, assign_folds(patients, labels, 10, seed=3))
    assert not np.array_equal(a, assign_folds(patients, labels, 10, seed=4))
    for c in range(labels.shape[1]):  # every column, not only the first
        rates = [labels[a == k, c].mean() for k in range(10)]
        assert max(rates) - min(rates) < 0.35


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_subtype_in_every_fold_of_a_cq500_like_table(seed):
    patients, labels = cq500_like(seed)
    fold = assign_folds(patients, labels, 10, seed=seed)
    assert not patients_split_across_folds(patients, fold)
    _, first = np.unique(patients, return_index=True)  # one row per patient
    for c, name in enumerate(CQ500_LABELS):
        per_fold = np.bincount(fold[first], weights=labels[first, c], minlength=10)
        assert per_fold.min() >= 1, f"{name}: positive patients per fold {per_fold}"
        total = labels[first, c].sum()
        assert per_fold.max() - per_fold.min() <= max(2, 0.1 * total), f"{name}: {per_fold}"
    sizes = np.bincount(fold[first], minlength=10)
    assert sizes.max() - sizes.min() <= 3  # 49 patients per fold, give or take


def test_too_few_patients_is_a_clear_error():
    with pytest.raises(FoldError, match="cannot make 5 patient-grouped folds from 3 patients"):
        assign_folds(["a", "a", "b", "c"], np.zeros((4, 1)), 5)
    with pytest.raises(FoldError, match="at least 2 folds"):
        assign_folds(["a", "b"], np.zeros((2, 1)), 1)


def test_folds_file_by_scan_and_by_patient(tmp_path):
    scans, patients = ["s1", "s2", "s3", "s4"], ["p1", "p1", "p2", "p3"]
    by_scan = tmp_path / "scans.csv"
    by_scan.write_text("scan_id,fold\ns1,0\ns2,1\ns3,1\ns4,0\nother,1\n")
    fold = read_folds_file(by_scan, scans, patients, 2)
    np.testing.assert_array_equal(fold, [0, 1, 1, 0])
    assert patients_split_across_folds(patients, fold) == ["p1"]
    by_patient = tmp_path / "patients.csv"
    by_patient.write_text("patient_id,fold\np1,1\np2,0\np3,2\n")
    np.testing.assert_array_equal(read_folds_file(by_patient, scans, patients, 3), [1, 1, 0, 2])


@pytest.mark.parametrize(
    ("text", "k", "message"),
    [
        ("scan,fold\ns1,0\n", 2, "needs a 'fold' column and a 'scan_id' or 'patient_id' column; it has scan, fold"),
        ("scan_id,fold\ns1,0\ns2,x\n", 2, "line 3: fold 'x' is not an integer"),
        ("scan_id,fold\ns1,0\ns2,2\n", 2, r"line 3: fold 2 is not in 0..1 \(train.folds = 2"),
        ("scan_id,fold\ns1,0\n", 2, r"no fold for 1 scan_id\(s\) of the cache, e.g. s2"),
        ("scan_id,fold\ns1,0\ns2,0\n", 2, r"fold\(s\) \[1\] hold no scan"),
        ("scan_id,fold\ns1,0\ns1,1\ns2,1\n", 2, "line 3: scan_id s1 is given two folds"),
    ],
)
def test_folds_file_errors(tmp_path, text, k, message):
    path = tmp_path / "folds.csv"
    path.write_text(text)
    with pytest.raises(FoldError, match=message):
        read_folds_file(path, ["s1", "s2"], ["p1", "p2"], k)
    with pytest.raises(FoldError, match="not found"):
        read_folds_file(tmp_path / "nope.csv", ["s1"], ["p1"], 2)
