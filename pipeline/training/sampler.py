"""Fixed-length slice sampling (paper VI.A.1): m slices per scan (32 CQ500, 28 RSNA).

A scan of n slices (z order) is read as m evenly spaced slices. With s = n / m and
k = max(1, floor(s)) "phases" u_j = (j + 0.5) / k, j = 0..k-1, a sample is

    idx_i = floor((i + u_j) * s),  i = 0..m-1

* Evaluation is deterministic: phase j = k // 2 (the centred one when k = 1).
* Training ("the unsampled data are used to generate a new CT set for data enhancement") draws
  another phase j != k // 2 at random, so when n >= 2m the training subset is evenly spaced
  and disjoint from the evaluation subset: consecutive phases are s / k >= 1 slices apart.
  Where k = 1 (m <= n < 2m) or n < m there are no unsampled slices to spare, and training uses
  a random phase u in [0, 1) instead (a jittered even spacing).
* Scans shorter than m repeat slices (floor of a finer-than-1 stride), still in z order.

All functions are vectorised over scans: no Python loop per scan or per slice.
"""

from __future__ import annotations

import numpy as np


def _phases(n: np.ndarray, m: int) -> np.ndarray:
    return np.maximum(1, n // m)


def sample_positions(n: np.ndarray, m: int, phase: np.ndarray) -> np.ndarray:
    """(B,) slice counts and (B,) phases in [0, 1) -> (B, m) int64 indices, non-decreasing."""
    n = np.asarray(n, dtype=np.int64)
    i = np.arange(m, dtype=np.float64)
    idx = np.floor((i[None, :] + np.asarray(phase, np.float64)[:, None]) * (n[:, None] / m)).astype(np.int64)
    return np.clip(idx, 0, np.maximum(n - 1, 0)[:, None])


def eval_positions(n: np.ndarray, m: int) -> np.ndarray:
    """The deterministic evaluation sample, (B, m) indices within each scan."""
    n = np.asarray(n, dtype=np.int64)
    k = _phases(n, m)
    return sample_positions(n, m, (k // 2 + 0.5) / k)


def train_positions(n: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """A random training sample, (B, m): another evenly spaced subset, avoiding the evaluation
    sample where the scan has enough slices (see the module docstring)."""
    n = np.asarray(n, dtype=np.int64)
    k = _phases(n, m)
    j_eval = k // 2
    r = np.floor(rng.random(len(n)) * np.maximum(k - 1, 1)).astype(np.int64)  # 0..k-2
    j = r + (r >= j_eval)
    phase = np.where(k >= 2, (j + 0.5) / k, rng.random(len(n)))
    return sample_positions(n, m, phase)
