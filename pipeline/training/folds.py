"""Patient-grouped k-fold cross-validation (paper VI.A.1: 10 folds CQ500, 5 RSNA).

Every scan of a patient lands in the same fold, so a model is never validated on a patient it
was trained on (CQ500 has several scans per patient). Folds are stratified on the first label
column (ICH / "any") so each holds a similar share of positive scans, shuffled by the seed.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold


class FoldError(ValueError):
    """A split that cannot be made (too few patients for k folds)."""


def assign_folds(patient_ids, labels: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """(n_scans,) int fold number in 0..k-1 for every scan, grouped by patient."""
    patient_ids = np.asarray([str(p) for p in patient_ids], dtype=object)
    n_patients = len(set(patient_ids))
    if k < 2:
        raise FoldError(f"cross-validation needs at least 2 folds, got {k}")
    if n_patients < k:
        raise FoldError(f"cannot make {k} patient-grouped folds from {n_patients} patients; use --folds {max(2, n_patients)} or fewer")
    labels = np.asarray(labels, dtype=np.float32)
    strata = (np.nan_to_num(labels[:, 0], nan=0.0) > 0.5).astype(int) if labels.ndim == 2 and labels.shape[1] else np.zeros(len(patient_ids), int)
    _, groups = np.unique(patient_ids.astype(str), return_inverse=True)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold = np.full(len(patient_ids), -1, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has only ..." on tiny sets
        for number, (_, val) in enumerate(splitter.split(np.zeros(len(groups)), strata, groups)):
            fold[val] = number
    return fold
