"""Fixed-length slice sampling (paper VI.A.1): m slices per scan (32 CQ500, 28 RSNA).

A scan of n slices (z order) is read as m evenly spaced slices. With s = n / m and
k = max(1, floor(s)) "phases" u_j = (j + 0.5) / k, j = 0..k-1, a sample is

    idx_i = floor((i + u_j) * s),  i = 0..m-1

* Evaluation is deterministic: phase j = k // 2 (the centred one when k = 1).
* Training, ``sampler.train_phases: all`` (default; paper VI.A.1: "the unused slices generate new
  CT sets"): every scan gives k samples per epoch, one per disjoint phase, u_j = (j + r) / k
  with one r ~ U[0, 1) per scan and epoch. Consecutive phases are s / k >= 1 slices apart, so the
  k samples share no slice and a long scan adds k - 1 extra training samples to the epoch
  (`epoch_plan`). Where k = 1 (n < 2m) this is one jittered evenly spaced sample.
* ``train_phases: one`` (the former behaviour): one sample per scan and epoch, another phase
  j != k // 2 drawn at random (disjoint from the evaluation sample; `train_positions`); with
  k = 1 a random phase u in [0, 1). Kept for comparison and for epochs of fixed size.
* Scans shorter than m repeat slices (floor of a finer-than-1 stride), still in z order.

All functions are vectorised over scans: no Python loop per scan or per slice.
"""

from __future__ import annotations

import numpy as np

TRAIN_PHASES = ("all", "one")


def _phases(n: np.ndarray, m: int) -> np.ndarray:
    return np.maximum(1, n // m)


def n_phases(n: np.ndarray, m: int) -> np.ndarray:
    """(B,) number of disjoint evenly spaced samples of m slices each scan holds: max(1, n // m)."""
    return _phases(np.asarray(n, dtype=np.int64), m)


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


def train_phase_one(n: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """``train_phases: one``: (B,) phases of one random training sample per scan, avoiding the
    evaluation sample where the scan has enough slices (see the module docstring)."""
    n = np.asarray(n, dtype=np.int64)
    k = _phases(n, m)
    j_eval = k // 2
    r = np.floor(rng.random(len(n)) * np.maximum(k - 1, 1)).astype(np.int64)  # 0..k-2
    j = r + (r >= j_eval)
    return np.where(k >= 2, (j + 0.5) / k, rng.random(len(n)))


def train_positions(n: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """A random training sample, (B, m), ``train_phases: one``."""
    return sample_positions(n, m, train_phase_one(n, m, rng))


def epoch_plan(n: np.ndarray, m: int, rng: np.random.Generator, mode: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """The training samples of one epoch, in scan order: (which (N,) index into `n`, phase (N,)).

    ``all``: k = max(1, n // m) samples per scan, phases (j + r) / k, j = 0..k-1, one r per scan
    (disjoint samples covering the scan); ``one``: one sample per scan (`train_phase_one`).
    Positions of sample t: ``sample_positions(n[which[t]], m, phase[t])``.
    """
    n = np.asarray(n, dtype=np.int64)
    if mode == "one":
        return np.arange(len(n)), train_phase_one(n, m, rng)
    if mode != "all":
        raise ValueError(f"sampler.train_phases must be one of {', '.join(TRAIN_PHASES)}, not {mode!r}")
    k = _phases(n, m)
    r = rng.random(len(n))
    which = np.repeat(np.arange(len(n)), k)
    first = np.repeat(np.cumsum(k) - k, k)
    j = np.arange(len(which)) - first
    return which, (j + r[which]) / k[which]
