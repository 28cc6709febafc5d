"""Sequence-level interpretability tasks of DrCT2 (paper section IV, Algorithm 1; Tables 5-6; Fig. 7).

Pure functions over arrays, so every number can be checked against a hand-computed case.
Everything is computed on the m *sampled* slices a scan was evaluated on (the deterministic
evaluation sample): ``attention`` is the model's slice attention over those m positions and
``key`` says which of them are key slices (slices with at least one positive slice-level label).

Tasks (Algorithm 1), with k = 5 (``TOP``):

* easy           scans with >= 5 key slices; Score_i = (key slices among the top 5) / 5
* difficult      scans with 1..5 key slices; Score_i = 1 if any of the top 5 is a key slice
* comprehensive  scans with h >= 1 key slices; Score_i = (key slices among the top h) / h

Accuracy = mean of Score_i over the scans of the task. A scan with exactly 5 key slices is in
both the easy and the difficult task, as the paper's own counts imply (Table 5: 6,529 easy +
1,759 difficult = 7,855 comprehensive + 433).

Ranking ("Sort" in Algorithm 1): descending attention; ties are broken by the lower slice
position (a stable sort), so results never depend on the platform's sort.

Because sampling may repeat slices of short scans, a repeated key slice counts at each of its
positions, exactly as the model sees it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TOP = 5
TASKS = ("easy", "difficult", "comprehensive")


def rank_positions(attention: np.ndarray) -> np.ndarray:
    """Positions sorted by descending attention, ties to the lower position: (m,) or (n, m) -> same shape."""
    attention = np.asarray(attention, dtype=np.float64)
    return np.argsort(-attention, axis=-1, kind="stable")


def top_positions(attention: np.ndarray, k: int = TOP) -> np.ndarray:
    """The k highest-attention positions in rank order ((n, k) for (n, m) input)."""
    return rank_positions(attention)[..., : int(k)]


def key_slice_mask(slice_labels: np.ndarray, label_names: Sequence[str] | None = None) -> np.ndarray:
    """(..., C) slice labels (1 positive, 0 negative, -1 unknown) -> (...) bool: any positive class.

    The 'any' column (RSNA) is the OR of the others, so including it changes nothing.
    """
    labels = np.asarray(slice_labels)
    return (labels == 1).any(axis=-1)


def known_mask(slice_labels: np.ndarray) -> np.ndarray:
    """(n, m, C) -> (n,) bool: scans whose sampled slices all carry slice-level labels (no -1)."""
    labels = np.asarray(slice_labels)
    return (labels >= 0).all(axis=(-1, -2))


def _hits_in_top(attention: np.ndarray, key: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Per scan: number of key slices among its top-k_i positions (k_i may differ per scan)."""
    order = rank_positions(attention)
    key_ranked = np.take_along_axis(np.asarray(key, bool), order, axis=-1)
    m = key_ranked.shape[-1]
    within = np.arange(m)[None, :] < np.asarray(k)[:, None]
    return (key_ranked & within).sum(axis=-1)


def scan_scores(attention: np.ndarray, key: np.ndarray, task: str, k: int = TOP) -> np.ndarray:
    """Score_i of Algorithm 1 for every scan, NaN where the scan is not part of the task.

    attention (n, m) float, key (n, m) bool.
    """
    attention = np.atleast_2d(np.asarray(attention, dtype=np.float64))
    key = np.atleast_2d(np.asarray(key, dtype=bool))
    if attention.shape != key.shape:
        raise ValueError(f"attention {attention.shape} and key-slice mask {key.shape} differ in shape")
    n, m = attention.shape
    h = key.sum(axis=1)
    scores = np.full(n, np.nan)
    if task == "easy":
        eligible = h >= k
        hits = _hits_in_top(attention, key, np.full(n, min(k, m)))
        scores[eligible] = hits[eligible] / k
    elif task == "difficult":
        eligible = (h >= 1) & (h <= k)
        hits = _hits_in_top(attention, key, np.full(n, min(k, m)))
        scores[eligible] = (hits[eligible] > 0).astype(float)
    elif task == "comprehensive":
        eligible = h >= 1
        hits = _hits_in_top(attention, key, h)
        scores[eligible] = hits[eligible] / h[eligible]
    else:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return scores


def algorithm1(attention: np.ndarray, key: np.ndarray, k: int = TOP) -> dict:
    """The three tasks of Algorithm 1: {task: {"accuracy": mean Score_i or None, "n_scans": int}}."""
    out = {}
    for task in TASKS:
        scores = scan_scores(attention, key, task, k)
        valid = ~np.isnan(scores)
        n = int(valid.sum())
        out[task] = {"accuracy": float(scores[valid].mean()) if n else None, "n_scans": n}
    return out


def per_disease_accuracy(
    attention: np.ndarray,
    slice_labels: np.ndarray,
    label_names: Sequence[str],
    selection: str = "disease",
) -> dict:
    """Table 6: for each disease, the share of its positive (sampled) slices picked by the model.

    ``selection='disease'`` (default): in each scan the model picks its top-h_d slices, h_d being the
    number of that disease's positive slices in the scan ("for all slices that reflect a certain
    disease, how many slices our algorithm can correctly pick out").
    ``selection='any'``: the pick is the top-h slices with h the scan's key-slice count (any disease).
    Pooled over slices: {name: {"amount": positive slices, "picked": int, "accuracy": float|None}}.
    """
    if selection not in ("disease", "any"):
        raise ValueError(f"selection {selection!r}: choose 'disease' or 'any'")
    attention = np.atleast_2d(np.asarray(attention, dtype=np.float64))
    labels = np.asarray(slice_labels)
    if labels.ndim != 3 or labels.shape[:2] != attention.shape or labels.shape[2] != len(label_names):
        raise ValueError(
            f"slice labels {labels.shape} do not match attention {attention.shape} and {len(label_names)} classes"
        )
    h_any = key_slice_mask(labels).sum(axis=1)
    out = {}
    for c, name in enumerate(label_names):
        positive = labels[:, :, c] == 1
        h = positive.sum(axis=1) if selection == "disease" else h_any
        picked = int(_hits_in_top(attention, positive, h).sum())
        amount = int(positive.sum())
        out[str(name)] = {"amount": amount, "picked": picked, "accuracy": picked / amount if amount else None}
    return out


def top_position_histogram(attention: np.ndarray, k: int = TOP, scans: np.ndarray | None = None) -> np.ndarray:
    """Fig. 7: how often each position 0..m-1 is among a scan's top-k attention, over the chosen scans."""
    attention = np.atleast_2d(np.asarray(attention, dtype=np.float64))
    if scans is not None:
        attention = attention[np.asarray(scans, bool)]
    m = attention.shape[1]
    return np.bincount(top_positions(attention, k).ravel(), minlength=m)[:m].astype(np.int64)


def sampled_slice_labels(slice_labels: np.ndarray, offset: np.ndarray, sample_idx: np.ndarray) -> np.ndarray:
    """Gather the slice labels of each scan's sampled slices: cache rows offset_i + sample_idx_ij -> (n, m, C)."""
    rows = np.asarray(offset, np.int64)[:, None] + np.asarray(sample_idx, np.int64)
    return np.asarray(slice_labels)[rows]


def interpret_arrays(
    attention: np.ndarray,
    sampled_labels: np.ndarray,
    label_names: Sequence[str],
    scan_labels: np.ndarray | None = None,
    k: int = TOP,
) -> dict:
    """All interpretability numbers for one model: Algorithm 1 (Table 5), Table 6 and Fig. 7.

    Scans with any unknown (-1) slice label among their sampled slices are left out of the
    slice-level tasks (CQ500 has no slice labels: then the tasks report zero scans).
    Fig. 7 counts scans with a positive scan-level label (the paper's "diseased" CTs) where
    ``scan_labels`` is given, else every scan.
    """
    attention = np.atleast_2d(np.asarray(attention, dtype=np.float64))
    labels = np.asarray(sampled_labels)
    known = known_mask(labels) if labels.size else np.zeros(len(attention), bool)
    result: dict = {"n_scans": len(attention), "n_scans_with_slice_labels": int(known.sum())}
    if known.any():
        key = key_slice_mask(labels[known])
        result["tasks"] = algorithm1(attention[known], key, k)
        result["per_disease"] = per_disease_accuracy(attention[known], labels[known], label_names)
    else:
        result["tasks"] = {task: {"accuracy": None, "n_scans": 0} for task in TASKS}
        result["per_disease"] = {}
    diseased = None
    if scan_labels is not None:
        diseased = np.nan_to_num(np.asarray(scan_labels, np.float64), nan=0.0).max(axis=1) > 0.5
    result["top_position_histogram"] = {
        "k": int(k),
        "n_scans": int(diseased.sum()) if diseased is not None else len(attention),
        "counts": top_position_histogram(attention, k, diseased).tolist(),
    }
    return result
