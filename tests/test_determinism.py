"""Repeatable training and evaluation protocol details of the trainer: a fixed seed gives
identical runs on CPU, the APS never zooms in on one slice twice, every disjoint phase of a long
scan is a training sample, and a fold file fixes the split."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.config import load_config
from pipeline.heads.drct2 import repeated_positions, select_slices
from pipeline.synthetic.synthetic import write_synthetic_cache
from pipeline.training.dataset import CachedFeatures
from pipeline.training.trainer import run_training
from stages.cli import main

torch.set_num_threads(1)
NAMES = ["any", "bleed", "fracture"]
SMALL = {
    "sampler.m": 8, "model.m_key": 4, "model.gru_hidden": 8, "model.aps_gru_hidden": 8, "model.aps_fc": 16,
    "model.fc_hidden": [16, 12], "model.fusion_dim": 16, "train.batch_size": 16, "train.epochs": 2,
    "train.folds": 2, "train.threads": 1, "train.device": "cpu",
}


def small_config(**extra):
    return load_config(None, {**SMALL, **extra})


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "features.h5"
    # 3..40 slices at m = 8: short scans repeat slices, long ones hold up to 5 disjoint phases
    return write_synthetic_cache(path, small_config(), NAMES, n_scans=24, slices=(3, 40), scans_per_patient=2, seed=1)


@pytest.fixture(scope="module")
def two_runs(cache_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for name in ("a", "b"):
        run_training(small_config(), cache_path, root / name, progress=False, log=lambda _: None)
    return root / "a", root / "b"


def test_fixed_seed_gives_identical_runs_on_cpu(two_runs):
    a, b = two_runs
    with np.load(a / "oof.npz") as oa, np.load(b / "oof.npz") as ob:
        assert set(oa.files) == set(ob.files)
        for key in oa.files:
            np.testing.assert_array_equal(oa[key], ob[key], err_msg=key)
    for fold in (0, 1):
        sa = torch.load(a / f"fold_{fold}" / "checkpoint.pt", weights_only=True)["state_dict"]
        sb = torch.load(b / f"fold_{fold}" / "checkpoint.pt", weights_only=True)["state_dict"]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
        ha = json.loads((a / f"fold_{fold}" / "history.json").read_text())
        hb = json.loads((b / f"fold_{fold}" / "history.json").read_text())
        assert [h["loss"] for h in ha] == [h["loss"] for h in hb]
    info = json.loads((a / "run.json").read_text())
    assert info["deterministic"] is True and info["train_phases"] == "all"
    assert not torch.are_deterministic_algorithms_enabled()  # global setting restored after the run


def test_aps_never_picks_the_same_slice_twice(two_runs, cache_path):
    with np.load(two_runs[0] / "oof.npz") as oof:
        sample, aps = oof["sample_idx"], oof["aps_idx"]
    slices = np.take_along_axis(sample, aps, axis=1)  # slice index within the scan of each APS pick
    n_distinct = np.array([len(set(row.tolist())) for row in sample])
    short = n_distinct < sample.shape[1]
    assert short.any()  # the cache has scans shorter than m, which repeat slices
    for row, distinct in zip(slices, n_distinct):
        assert len(set(row.tolist())) == min(4, distinct), row


def test_select_slices_ranks_repeated_positions_last():
    attention = torch.tensor([[0.30, 0.25, 0.20, 0.10, 0.08, 0.07]])
    z = torch.tensor([[1.0, 1.0, 2.0, 2.0, 3.0, 4.0]]).unsqueeze(-1)  # positions 1 and 3 repeat 0 and 2
    repeated = repeated_positions(z)
    assert repeated.tolist() == [[False, True, False, True, False, False]]
    assert select_slices(attention, 3).tolist() == [[0, 1, 2]]  # without the mask: slice 0 twice
    assert select_slices(attention, 3, repeated=repeated).tolist() == [[0, 2, 4]]
    assert select_slices(attention, 5, repeated=repeated).tolist() == [[0, 1, 2, 4, 5]]  # 4 distinct: one repeat
    random = select_slices(attention, 4, "random", torch.Generator().manual_seed(0), repeated)
    assert random.tolist() == [[0, 2, 4, 5]]


@pytest.mark.parametrize("mode", ["all", "one"])
def test_every_disjoint_phase_is_a_training_sample(cache_path, tmp_path, mode):
    config = small_config(**{"sampler.train_phases": mode, "train.epochs": 1, "train.fold": 0})
    run_training(config, cache_path, tmp_path / "run", progress=False, log=lambda _: None)
    (history,) = json.loads((tmp_path / "run" / "fold_0" / "history.json").read_text())
    with np.load(tmp_path / "run" / "oof.npz") as oof:
        validation = set(oof["cache_index"].tolist())
    from cache.store import FeatureCache

    data = CachedFeatures.from_cache(FeatureCache(cache_path), 224, 512, torch.device("cpu"))
    train = np.array([s for s in data.labelled if s not in validation])
    n = data.n_slices[train]
    expected = int(np.maximum(1, n // 8).sum()) if mode == "all" else len(train)
    assert history["samples"] == expected
    if mode == "all":
        assert expected > len(train)  # long scans add samples to the epoch


def test_folds_file_fixes_the_split_and_bad_files_exit_2(cache_path, tmp_path):
    from cache.store import FeatureCache

    cache = FeatureCache(cache_path)
    patients = sorted({str(p) for p in cache.table.patient_id})
    folds = tmp_path / "folds.csv"
    folds.write_text("patient_id,fold\n" + "".join(f"{p},{i % 2}\n" for i, p in enumerate(patients)))
    run_training(small_config(**{"train.folds_file": str(folds), "train.epochs": 1}), cache_path, tmp_path / "run",
                 progress=False, log=lambda _: None)
    with np.load(tmp_path / "run" / "oof.npz") as oof:
        expected = [patients.index(str(p)) % 2 for p in oof["patient_id"]]
        np.testing.assert_array_equal(oof["fold"], expected)
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_id,fold\n" + "".join(f"{p},{i % 3}\n" for i, p in enumerate(patients)))
    result = CliRunner().invoke(main, ["train", "--cache", str(cache_path), "--out", str(tmp_path / "x"), "--quiet",
                                       "--set", f"train.folds_file={bad}", "--set", "train.folds=2"])
    assert result.exit_code == 2
    assert "fold 2 is not in 0..1 (train.folds = 2" in result.output and "Traceback" not in result.output
