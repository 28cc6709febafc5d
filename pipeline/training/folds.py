"""Patient-grouped k-fold cross-validation (paper VI.A.1: 10 folds CQ500, 5 RSNA).

Every scan of a patient lands in the same fold, so a model is never validated on a patient it
was trained on (CQ500 has several scans per patient). The folds are stratified on **every**
label column at once with iterative stratification (Sechidis et al. 2011, the
`iterative-stratification` package's MultilabelStratifiedKFold), applied to one row per patient
(the OR of the patient's scan labels): each fold gets positives of each class wherever the data
allow, which a rare class (CQ500 EDH: ~13 positive patients) needs for its per-fold metrics.

Alternatively a fold file fixes the split (the paper's RSNA results used the first-place
Kaggle solution's split): see `read_folds_file`.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold


class FoldError(ValueError):
    """A split that cannot be made (too few patients for k folds, a bad fold file)."""


def patient_label_table(patient_ids, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(patients (P,), per-patient labels (P, C) = OR over the patient's scans (NaN = 0),
    inverse (n_scans,) index of each scan's patient)."""
    patient_ids = np.asarray([str(p) for p in patient_ids], dtype=str)
    patients, inverse = np.unique(patient_ids, return_inverse=True)
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim != 2:
        labels = labels.reshape(len(patient_ids), -1)
    positive = (np.nan_to_num(labels, nan=0.0) > 0.5).astype(np.int64)
    table = np.zeros((len(patients), positive.shape[1]), np.int64)
    np.maximum.at(table, inverse, positive)
    return patients, table, inverse


def assign_folds(patient_ids, labels: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """(n_scans,) int fold number in 0..k-1 for every scan: grouped by patient, stratified on
    every label column, shuffled by the seed."""
    patient_ids = np.asarray([str(p) for p in patient_ids], dtype=object)
    n_patients = len(set(patient_ids))
    if k < 2:
        raise FoldError(f"cross-validation needs at least 2 folds, got {k}")
    if n_patients < k:
        raise FoldError(f"cannot make {k} patient-grouped folds from {n_patients} patients; use --folds {max(2, n_patients)} or fewer")
    patients, table, inverse = patient_label_table(patient_ids, labels)
    if table.shape[1] == 0:
        table = np.zeros((len(patients), 1), np.int64)
    splitter = MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    patient_fold = np.full(len(patients), -1, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for number, (_, val) in enumerate(splitter.split(np.zeros(len(patients)), table)):
            patient_fold[val] = number
    return patient_fold[inverse]


def read_folds_file(path: str | Path, scan_ids, patient_ids, k: int) -> np.ndarray:
    """A fixed split: CSV with a ``fold`` column (integers 0..k-1) and either ``scan_id`` (one row
    per scan) or ``patient_id`` (one row per patient, all its scans in that fold).

    Returns (n_scans,) folds in the order of `scan_ids`. Every scan must be covered; rows for
    scans or patients not in the cache are ignored (a split made for the full dataset also
    serves a subset). Errors name the file and the first offending rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FoldError(f"train.folds_file {path} not found")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        key = "scan_id" if "scan_id" in columns else "patient_id" if "patient_id" in columns else None
        if key is None or "fold" not in columns:
            raise FoldError(
                f"train.folds_file {path}: needs a 'fold' column and a 'scan_id' or 'patient_id' column; "
                f"it has {', '.join(columns) or 'no header'}"
            )
        table: dict[str, int] = {}
        for line, row in enumerate(reader, start=2):
            row = {(name or "").strip(): (value or "").strip() for name, value in row.items()}
            ident, text = row[key], row["fold"]
            try:
                fold = int(text)
            except ValueError:
                raise FoldError(f"train.folds_file {path}, line {line}: fold {text!r} is not an integer") from None
            if not 0 <= fold < k:
                raise FoldError(
                    f"train.folds_file {path}, line {line}: fold {fold} is not in 0..{k - 1} "
                    f"(train.folds = {k}; folds are numbered from 0)"
                )
            if table.get(ident, fold) != fold:
                raise FoldError(f"train.folds_file {path}, line {line}: {key} {ident} is given two folds")
            table[ident] = fold
    wanted = [str(s) for s in (scan_ids if key == "scan_id" else patient_ids)]
    missing = sorted({w for w in wanted if w not in table})
    if missing:
        raise FoldError(
            f"train.folds_file {path} has no fold for {len(missing)} {key}(s) of the cache, e.g. "
            + ", ".join(missing[:5])
        )
    fold = np.array([table[w] for w in wanted], dtype=np.int64)
    empty = sorted(set(range(k)) - set(fold.tolist()))
    if empty:
        raise FoldError(f"train.folds_file {path}: fold(s) {empty} hold no scan of the cache (train.folds = {k})")
    return fold


def patients_split_across_folds(patient_ids, fold: np.ndarray) -> list[str]:
    """Patients whose scans sit in more than one fold (a fold file may do this; it leaks)."""
    seen: dict[str, set[int]] = {}
    for patient, f in zip(patient_ids, np.asarray(fold).tolist()):
        seen.setdefault(str(patient), set()).add(f)
    return sorted(p for p, folds in seen.items() if len(folds) > 1)
