"""Patient-grouped k-fold split: no patient in two folds."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.training.folds import FoldError, assign_folds


def _data(n_patients=60, seed=0):
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 4, n_patients)  # 1-3 scans per patient (CQ500-like)
    patients = np.repeat([f"P{i}" for i in range(n_patients)], per)
    labels = (rng.random((len(patients), 3)) < 0.4).astype(np.float32)
    return patients, labels


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
    rates = [labels[a == k, 0].mean() for k in range(10)]
    assert max(rates) - min(rates) < 0.35


def test_too_few_patients_is_a_clear_error():
    with pytest.raises(FoldError, match="cannot make 5 patient-grouped folds from 3 patients"):
        assign_folds(["a", "a", "b", "c"], np.zeros((4, 1)), 5)
    with pytest.raises(FoldError, match="at least 2 folds"):
        assign_folds(["a", "b"], np.zeros((2, 1)), 1)
