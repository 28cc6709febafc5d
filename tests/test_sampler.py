"""Fixed-length sampling: evenly spaced, deterministic for evaluation, disjoint training subsets."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.training.sampler import epoch_plan, eval_positions, n_phases, sample_positions, train_positions

M = 8


def test_eval_sample_is_deterministic_evenly_spaced_and_in_range():
    n = np.array([8, 13, 16, 40, 100, 257])
    a, b = eval_positions(n, M), eval_positions(n, M)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (len(n), M)
    for row, count in zip(a, n):
        assert row.min() >= 0 and row.max() <= count - 1
        gaps = np.diff(row)
        assert (gaps > 0).all()
        assert set(gaps) <= {count // M, -(-count // M)}  # floor or ceil of n/m


def test_exact_values_for_an_integer_stride():
    # n = 24, m = 8: stride 3, three phases; evaluation uses the middle one
    np.testing.assert_array_equal(eval_positions(np.array([24]), M)[0], np.arange(1, 24, 3))
    np.testing.assert_array_equal(sample_positions(np.array([24]), M, np.array([0.5 / 3]))[0], np.arange(0, 24, 3))


def test_short_scans_repeat_slices_in_order():
    for count in (1, 3, 5, 7):
        row = eval_positions(np.array([count]), M)[0]
        assert len(row) == M
        assert (np.diff(row) >= 0).all()
        assert set(row.tolist()) == set(range(count))  # every slice used, some twice
        train = train_positions(np.array([count]), M, np.random.default_rng(0))[0]
        assert (np.diff(train) >= 0).all() and train.max() <= count - 1


def test_training_subsets_avoid_the_evaluation_sample_and_vary():
    rng = np.random.default_rng(0)
    n = np.array([16, 23, 40, 61, 256] * 20)
    ev = eval_positions(n, M)
    tr = train_positions(n, M, rng)
    for e, t, count in zip(ev, tr, n):
        assert not set(e.tolist()) & set(t.tolist())
        assert (np.diff(t) > 0).all() and t.max() <= count - 1
        assert set(np.diff(t)) <= {count // M, -(-count // M)}
    # several different subsets are drawn for a long scan
    draws = {tuple(train_positions(np.array([256]), M, rng)[0]) for _ in range(20)}
    assert len(draws) > 5


def test_between_m_and_2m_training_jitters_but_stays_valid():
    rng = np.random.default_rng(1)
    n = np.full(50, 12)
    tr = train_positions(n, M, rng)
    assert ((np.diff(tr, axis=1) > 0).all()) and tr.max() <= 11
    assert len({tuple(r) for r in tr}) > 1


def test_vectorised_batch_equals_row_by_row_and_seed_reproducible():
    n = np.array([5, 9, 30, 77])
    batch = eval_positions(n, M)
    for i, count in enumerate(n):
        np.testing.assert_array_equal(batch[i], eval_positions(np.array([count]), M)[0])
    a = train_positions(n, M, np.random.default_rng(7))
    b = train_positions(n, M, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)


def test_every_disjoint_phase_of_a_long_scan_is_an_extra_training_sample():
    """train_phases=all: a scan of n slices gives n // m disjoint samples per epoch, which
    together use k * m distinct slices (the unused slices make new CT sets, paper VI.A.1)."""
    n = np.array([5, 12, 16, 24, 61, 256])
    which, phase = epoch_plan(n, M, np.random.default_rng(0), "all")
    k = n_phases(n, M)
    np.testing.assert_array_equal(k, [1, 1, 2, 3, 7, 32])
    np.testing.assert_array_equal(np.bincount(which, minlength=len(n)), k)  # 46 samples, not 6
    positions = sample_positions(n[which], M, phase)
    for i, count in enumerate(n):
        rows = positions[which == i]
        assert (rows >= 0).all() and (rows <= count - 1).all()
        assert (np.diff(rows, axis=1) >= 0).all()
        if k[i] >= 2:  # disjoint subsets, each evenly spaced
            assert len(set(rows.ravel().tolist())) == k[i] * M
            assert all(set(np.diff(r)) <= {count // M, -(-count // M)} for r in rows)
    # n = 24, m = 8: the three phases are exactly the three residues mod 3, in some jitter
    rows = positions[which == 3]
    assert sorted(sorted(set(r % 3)) for r in rows) == [[0], [1], [2]]


def test_phases_are_jittered_across_epochs_and_one_mode_keeps_one_sample():
    rng = np.random.default_rng(1)
    n = np.array([61])
    draws = {tuple(sample_positions(n[w], M, p)[0]) for w, p in (epoch_plan(n, M, rng, "all") for _ in range(20))}
    assert len(draws) > 5
    which, phase = epoch_plan(np.array([16, 61, 256]), M, np.random.default_rng(2), "one")
    np.testing.assert_array_equal(which, [0, 1, 2])
    ev = eval_positions(np.array([16, 61, 256]), M)
    for e, t in zip(ev, sample_positions(np.array([16, 61, 256]), M, phase)):
        assert not set(e.tolist()) & set(t.tolist())
    with pytest.raises(ValueError, match="sampler.train_phases must be one of all, one"):
        epoch_plan(n, M, rng, "every")
