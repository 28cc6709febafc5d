"""The heads learn where the signal is: a short, seeded training run on a small planted cache
(pipeline/synthetic/planted.py) with the paper's optimiser settings (Adam, lr 5e-4 / 3e-4 / 5e-4,
dropout 0.5, MSE/MSE/BCE), and checks that fail when the model is broken:

* slice attention (eqs. 5-6) must rank lesion slices first (Algorithm 1) - a uniform or
  constant attention cannot;
* the "small" subtypes are faint at the primary resolution and clear at the APS resolution, so
  only an APS that zooms in on the *attended* slices at the *APS* resolution diagnoses them:
  APS on the first m_key slices, or on the primary-resolution vectors, cannot;
* feature attention (eq. 3) must weight the planted channels of a lesion slice above the rest.

Every mutation named in issue 8 was applied to the code and made at least one test here fail
(see the closing note of issue 8 / BENCHMARKS.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache.store import FeatureCache
from pipeline.config import load_config
from pipeline.interpret import algorithm1, key_slice_mask, sampled_slice_labels
from pipeline.metrics import classification_metrics
from pipeline.synthetic.planted import PlantedSpec, write_planted_cache
from pipeline.training.checkpoint import load_model
from pipeline.training.dataset import CachedFeatures
from pipeline.training.sampler import eval_positions
from pipeline.training.trainer import run_training

SMALL = {
    "sampler.m": 16, "model.m_key": 4, "model.gru_hidden": 32, "model.aps_gru_hidden": 32, "model.aps_fc": 64,
    "model.fusion_dim": 128, "train.batch_size": 8, "train.epochs": 40,
    "train.folds": 3, "train.fold": 0, "train.threads": 1, "train.seed": 0,
}
# A clear signal (the test is about the wiring, the benchmark about difficulty); the small
# subtypes' own channels are all but invisible at the primary resolution.
SPEC = PlantedSpec(n_scans=150, slices=(16, 30), strength=8.0, channels_per_class=32, anatomy_sd=0.35,
                   faint=0.05, seed=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("learning")
    config = load_config(None, SMALL)
    cache_path, truth = write_planted_cache(root / "planted.h5", config, SPEC)
    run_training(config, cache_path, root / "run", progress=False, log=lambda s: None)
    oof = np.load(root / "run" / "oof.npz")
    cache = FeatureCache(cache_path)
    return {"root": root, "cache": cache, "oof": oof, "truth": truth, "config": config}


def test_drct2_diagnoses_the_planted_lesions(trained):
    oof, names = trained["oof"], list(trained["cache"].label_names)
    metrics = classification_metrics(oof["labels"], oof["prob"], names)
    assert metrics["macro_auc"] >= 0.95, metrics["per_class"]


def test_slice_attention_ranks_lesion_slices_first(trained):
    oof, cache = trained["oof"], trained["cache"]
    sampled = sampled_slice_labels(cache.table.slice_labels, cache.table.offset[oof["cache_index"]], oof["sample_idx"])
    key = key_slice_mask(sampled)
    tasks = algorithm1(oof["slice_attention"], key)
    chance = key[key.any(axis=1)].mean()
    assert chance < 0.35
    assert tasks["comprehensive"]["accuracy"] >= 0.8, (tasks, chance)
    assert tasks["difficult"]["accuracy"] >= 0.9, (tasks, chance)


def test_small_subtypes_are_found_by_the_aps_zoom(trained):
    """Visible mainly at the APS resolution: only the zoom on attended slices sees them."""
    oof, names = trained["oof"], list(trained["cache"].label_names)
    metrics = classification_metrics(oof["labels"], oof["prob"], names)
    small = [n for n, kind in SPEC.subtypes.items() if kind == "aps"]
    aucs = {n: metrics["per_class"][n]["auc"] for n in small}
    assert min(aucs.values()) >= 0.95, aucs
    primary = classification_metrics(oof["labels"], oof["prob_primary"], names)
    assert np.mean([metrics["per_class"][n]["auc"] for n in small]) > \
        np.mean([primary["per_class"][n]["auc"] for n in small]) + 0.05


def test_attention_spread_is_logged_per_epoch(trained):
    """history.json carries the effective number of channels/slices the attentions use."""
    import json

    from pipeline.training.trainer import effective_count

    assert effective_count(np.full((3, 8), 1 / 8)) == pytest.approx(8)
    assert effective_count(np.eye(4)) == pytest.approx(1, abs=1e-6)
    history = json.loads((trained["root"] / "run" / "fold_0" / "history.json").read_text())
    m = SMALL["sampler.m"]
    assert all(1 <= h["val_slice_attention_slices"] <= m and 1 <= h["val_feature_attention_channels"] <= 512
               for h in history)
    # it learned to concentrate on lesion slices. Measured (seed 0, AVX2, fp32): 15.9 of 16 at epoch 1,
    # 12.3 at epoch 25 (the old epoch count: a machine with AMX failed this bound there), 9.2 at
    # epoch 40; a uniform slice attention stays at 16.
    assert history[-1]["val_slice_attention_slices"] < 0.75 * m


def test_feature_attention_weights_the_planted_channels(trained):
    """On lesion slices, eq. 3's weights single out the lesion's own channels: their mean weight is
    at least 1.5x (or at most 1/1.5x) the slice's mean. The direction is the model's choice: with
    x = D * z * w on scan-centred inputs a lesion channel's value is already large, and the learnable
    scoring layer has been seen to damp it (ratio ~0.16 under the issue-15 defaults) as readily as to
    boost it. A uniform attention (the no_feature_attention mutation) gives exactly 1."""
    model, _, _ = load_model(trained["root"] / "run" / "fold_0" / "checkpoint.pt")
    cache, oof, truth = trained["cache"], trained["oof"], trained["truth"]
    data = CachedFeatures.from_cache(cache, 224, 512)
    scans = oof["cache_index"]
    positions = eval_positions(data.n_slices[scans], int(SMALL["sampler.m"]))
    batch = data.batch(scans, positions)
    with torch.no_grad():
        weights = model.primary(batch.primary)["feature_attention"].numpy()  # (B, m, D)
    sampled = sampled_slice_labels(cache.table.slice_labels, cache.table.offset[scans], positions)
    names = list(cache.label_names)
    ratios = {}
    for name, kind in SPEC.subtypes.items():
        if kind != "both":
            continue
        lesion = sampled[..., names.index(name)] == 1
        channels = np.asarray(truth["channels"][name])
        on_lesion = weights[lesion][:, channels].mean()
        ratios[name] = on_lesion / weights[lesion].mean()
    assert min(max(r, 1 / r) for r in ratios.values()) >= 1.5, ratios
