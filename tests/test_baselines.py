"""The baseline heads (issue 15), the drct2_paper preset, the departures list and the patient
bootstrap, each against an independent computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.departures import departures
from pipeline.heads.abmil import GatedAttentionMIL
from pipeline.heads.build import build_model, predict
from pipeline.heads.pooled_logistic import PooledLogistic, pooled_vectors
from pipeline.metrics import macro_auc, patient_bootstrap_ci
from pipeline.presets import preset_overrides


def test_pooled_logistic_matches_sklearn_on_the_same_pooled_vectors():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    z = torch.from_numpy(rng.standard_normal((60, 5, 8)).astype(np.float32))
    pooled = pooled_vectors(z).numpy()
    np.testing.assert_allclose(pooled[:, :8], z.numpy().max(axis=1))
    np.testing.assert_allclose(pooled[:, 8:], z.numpy().mean(axis=1), atol=1e-6)
    labels = np.stack([(pooled[:, 8] > 0).astype(float), (pooled[:, 9] > 0).astype(float)], 1)  # means
    head = PooledLogistic(2, 4, feature_dim=8)
    chosen = head.fit(pooled, labels, np.arange(60) // 2)
    x = (pooled - pooled.mean(0)) / pooled.std(0)
    for c in range(2):
        reference = LogisticRegression(C=chosen[c], max_iter=2000).fit(x, labels[:, c])
        ours = head(z).logits[:, c].detach().numpy()
        np.testing.assert_allclose(ours, reference.decision_function(x), atol=0.02)  # lbfgs tolerances
    out = predict(head, z)  # no APS: NaN and -1 in the run files, as for DrCT1
    assert np.isnan(out["prob_aps"]).all() and (out["aps_idx"] == -1).all() and out["aps_idx"].shape == (60, 4)


def test_pooled_logistic_with_one_class_predicts_the_prior():
    head = PooledLogistic(1, 2, feature_dim=4)
    pooled = np.random.default_rng(1).standard_normal((20, 8))
    head.fit(pooled, np.zeros((20, 1)), np.arange(20))
    prob = head(torch.zeros(3, 2, 4)).prob.detach().numpy()
    np.testing.assert_allclose(prob, 1e-3, rtol=1e-4)


def test_abmil_gated_attention_is_ilse_eq9():
    torch.manual_seed(0)
    head = GatedAttentionMIL(3, 2, feature_dim=6, hidden=5, attention_dim=4, input_norm="none").eval()
    z = torch.randn(2, 7, 6)
    out = head(z)
    h = torch.relu(head.embed[0](z))
    a = torch.softmax(head.attention_w(torch.tanh(head.attention_v(h)) * torch.sigmoid(head.attention_u(h)))
                      .squeeze(-1), dim=1)
    torch.testing.assert_close(out.slice_attention, a)
    torch.testing.assert_close(out.logits, head.classifier[1]((a.unsqueeze(-1) * h).sum(1)))
    torch.testing.assert_close(out.slice_attention.sum(1), torch.ones(2))


@pytest.mark.parametrize("name", ["pooled_logistic", "meanpool", "abmil"])
def test_baselines_build_from_the_config(name):
    config = load_config(None, {"model.name": name, "sampler.m": 6, "model.m_key": 3})
    model = build_model(config, 4)
    assert model.variant == name
    out = predict(model, torch.rand(2, 6, 512))
    assert out["prob"].shape == (2, 4) and out["slice_attention"].shape == (2, 6)
    assert out["aps_idx"].shape == (2, 3)


def test_drct2_paper_preset_departs_from_the_paper_only_in_epochs():
    config = load_config(None, {**preset_overrides("drct2_paper"), "train.epochs": 100})
    assert departures(config) == []
    model = build_model(config, 6)
    assert model.primary.standardize is None and model.aps.standardize is None
    assert model.primary.feature_attention.mode == "softmax" and model.primary.feature_attention.scale == 1.0
    linear = [layer for layer in model.primary.classifier if isinstance(layer, torch.nn.Linear)]
    assert len(linear) == 3  # the paper's three FC layers
    assert len([layer for layer in model.aps.classifier if isinstance(layer, torch.nn.Linear)]) == 3
    assert len([layer for layer in model.fusion.classifier if isinstance(layer, torch.nn.Linear)]) == 3
    defaults = {d["item"] for d in departures(load_config(None))}
    assert {"feature attention (eq. 3)", "input normalisation", "input dropout", "optimiser",
            "FC readouts"} <= defaults
    default = build_model(load_config(None), 6)
    for readout in (default.primary.classifier, default.aps.classifier, default.fusion.classifier):
        assert [type(layer) for layer in readout] == [torch.nn.Linear]  # one linear readout (issue 15)
    with pytest.raises(ValueError, match="unknown preset"):
        preset_overrides("drct3")


def test_feature_attention_scale_is_validated():
    """A typo is refused by the schema (with a 'did you mean') and by the builder itself."""
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="feature_attention_scale.*did you mean 'dim'"):
        load_config(None, {"model.feature_attention_scale": "dimm"})
    config = load_config(None)
    config["model"]["feature_attention_scale"] = "dimm"
    with pytest.raises(ValueError, match="unknown model.feature_attention_scale 'dimm'"):
        build_model(config, 2)


def test_patient_bootstrap_resamples_patients_not_scans():
    """Hand case: two patients with 2 scans each. Every resample draws 2 patients; a draw of the
    same patient twice has one label value (AUC undefined, skipped), so the only defined
    resamples are {A, B} in either order: each has AUC 1.0 here."""
    labels = np.array([[1.0], [1.0], [0.0], [0.0]])
    prob = np.array([[0.9], [0.8], [0.2], [0.1]])
    estimate, low, high = patient_bootstrap_ci(labels, prob, ["A", "A", "B", "B"], macro_auc, resamples=200)
    assert (estimate, low, high) == (1.0, 1.0, 1.0)
    # independent check of the interval on a larger case: the percentile interval of a manual loop
    rng = np.random.default_rng(3)
    patients = np.repeat([f"P{i:02d}" for i in range(40)], 2)  # sorted as strings = in numeric order
    labels = rng.integers(0, 2, (80, 2)).astype(float)
    prob = np.clip(labels * 0.3 + rng.random((80, 2)) * 0.7, 0, 1)
    estimate, low, high = patient_bootstrap_ci(labels, prob, patients, macro_auc, resamples=300, seed=5)
    draws = np.random.default_rng(5)
    values = []
    for _ in range(300):
        rows = np.concatenate([np.flatnonzero(patients == f"P{p:02d}") for p in draws.integers(0, 40, 40)])
        values.append(macro_auc(labels[rows], prob[rows]))
    assert (low, high) == pytest.approx(tuple(np.quantile(values, [0.025, 0.975])))
    assert low < estimate < high


def test_macro_auc_equals_sklearn_with_ties_and_unknown_labels():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, (50, 3)).astype(float)
    labels[3, 1] = np.nan
    labels[:, 2] = 0.0  # one value only: left out
    prob = np.round(rng.random((50, 3)), 1)  # many ties
    known = ~np.isnan(labels[:, 1])
    expected = np.mean([roc_auc_score(labels[:, 0], prob[:, 0]), roc_auc_score(labels[known, 1], prob[known, 1])])
    assert macro_auc(labels, prob) == pytest.approx(expected, abs=1e-12)
