"""Stage two on members of the planted family (../shared/benchmarks/planted_family.py, run, never
copied): a small, seeded version of bench/heads.py that fails when the model is broken.

* DrCT2 beats a control trained on shuffled labels (same cache, same folds);
* its slice attention ranks lesion slices above chance (Algorithm 1, comprehensive task), which
  a uniform slice attention cannot;
* on `null` (labels independent of the vectors) it stays at chance;
* the validation fold never enters the input-normalisation statistics.

Skipped, with the reason, where the shared folder is not beside the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cache.store import FeatureCache
from pipeline.config import load_config
from pipeline.interpret import algorithm1, key_slice_mask, sampled_slice_labels
from pipeline.metrics import macro_auc
from pipeline.training.checkpoint import load_checkpoint
from pipeline.training.trainer import run_training

FAMILY = Path(os.environ.get("DRCT_PLANTED_FAMILY")
              or Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "planted_family.py")
pytestmark = pytest.mark.skipif(not FAMILY.exists(), reason=f"planted family not found at {FAMILY}")

SCANS = 400
SMALL = {"sampler.m": 28, "model.m_key": 16, "model.gru_hidden": 32, "model.aps_gru_hidden": 32,
         "model.aps_fc": 64, "model.fusion_dim": 64, "train.batch_size": 16,
         "train.epochs": 20, "train.folds": 3, "train.fold": 0, "train.threads": 1, "train.seed": 0}


def _config(cache_path: Path, **extra) -> dict:
    config = load_config(None, {**SMALL, **extra})
    with FeatureCache(cache_path) as cache:
        for key in ("weights", "resolutions", "windows", "aps_source"):
            config["extract"][key] = cache.provenance[key]
    return config


def _train(cache_path: Path, out: Path, **extra) -> dict:
    torch.set_num_threads(1)
    run_training(_config(cache_path, **extra), cache_path, out, progress=False, log=lambda s: None)
    return dict(np.load(out / "oof.npz"))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    subprocess.run([sys.executable, str(FAMILY), str(root), "--members", "weak,null", "--scans", str(SCANS),
                    "--seed", "1"], check=True, capture_output=True)
    shuffled = root / "weak_shuffled.h5"
    shutil.copy(root / "weak.h5", shuffled)
    with h5py.File(shuffled, "r+") as f:
        labels = f["scans/labels"][...]
        f["scans/labels"][...] = labels[np.random.default_rng(0).permutation(len(labels))]
    return root


@pytest.fixture(scope="module")
def weak_runs(family):
    return {"drct2": _train(family / "weak.h5", family / "run_weak"),
            "shuffled": _train(family / "weak_shuffled.h5", family / "run_shuffled")}


def test_drct2_beats_a_shuffled_label_control(weak_runs):
    auc = macro_auc(weak_runs["drct2"]["labels"], weak_runs["drct2"]["prob"])
    control = macro_auc(weak_runs["shuffled"]["labels"], weak_runs["shuffled"]["prob"])
    assert abs(control - 0.5) < 0.1, control
    assert auc >= control + 0.1, (auc, control)


@pytest.mark.xfail(strict=True, reason="known gap (issue 15): on `weak` the primary network's slice attention "
                   "at 224 px is barely above chance (measured 0.258 against chance 0.238 at 400 scans); the "
                   "uniform-attention mutation is caught by tests/test_learning.py on a clearer fixture")
def test_slice_attention_finds_the_lesion_slices(family, weak_runs):
    oof = weak_runs["drct2"]
    with FeatureCache(family / "weak.h5") as cache:
        sampled = sampled_slice_labels(cache.table.slice_labels, cache.table.offset[oof["cache_index"]],
                                       oof["sample_idx"])
    key = key_slice_mask(sampled)
    chance = key[key.any(axis=1)].mean()
    accuracy = algorithm1(oof["slice_attention"], key)["comprehensive"]["accuracy"]
    assert accuracy >= chance + 0.1, (accuracy, chance)


def test_null_member_stays_at_chance(family):
    oof = _train(family / "null.h5", family / "run_null")
    assert abs(macro_auc(oof["labels"], oof["prob"]) - 0.5) < 0.1


def test_validation_scans_never_enter_the_normalisation_statistics(family, tmp_path):
    """Scale every validation scan's vectors by 100: the fold's standardiser buffers (primary and
    APS) are unchanged, bit for bit; the same change on one training scan moves them."""
    source = family / "weak.h5"
    config_path = tmp_path / "base.h5"
    shutil.copy(source, config_path)
    run = _train(config_path, tmp_path / "base", **{"train.epochs": 1})
    with FeatureCache(config_path) as cache:
        offsets, counts = cache.table.offset[run["cache_index"]], cache.table.n_slices[run["cache_index"]]
    val_rows = np.concatenate([np.arange(o, o + n) for o, n in zip(offsets, counts)])

    def buffers(out):
        state = load_checkpoint(out / "fold_0" / "checkpoint.pt")["state_dict"]
        return {k: v for k, v in state.items() if k.endswith(("standardize.sd", "standardize.mean"))}

    def scaled(rows, name):
        path = tmp_path / f"{name}.h5"
        shutil.copy(source, path)
        with h5py.File(path, "r+") as f:
            for res in ("224", "512"):
                values = f[f"features/{res}"][...]
                values[rows] = np.minimum(values[rows].astype(np.float32) * 100, 60000)
                f[f"features/{res}"][...] = values
        return path

    base = buffers(tmp_path / "base")
    assert set(base) == {"primary.standardize.mean", "primary.standardize.sd", "aps.standardize.mean",
                         "aps.standardize.sd"}
    _train(scaled(val_rows, "val_scaled"), tmp_path / "val_scaled", **{"train.epochs": 1})
    for key, value in buffers(tmp_path / "val_scaled").items():
        torch.testing.assert_close(value, base[key], rtol=0, atol=0)
    train_scan = np.setdiff1d(np.arange(SCANS), run["cache_index"])[0]
    with FeatureCache(source) as cache:
        o, n = int(cache.table.offset[train_scan]), int(cache.table.n_slices[train_scan])
    _train(scaled(np.arange(o, o + n), "train_scaled"), tmp_path / "train_scaled", **{"train.epochs": 1})
    moved = buffers(tmp_path / "train_scaled")
    assert not torch.equal(moved["primary.standardize.sd"], base["primary.standardize.sd"])
