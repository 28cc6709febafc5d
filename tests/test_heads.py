"""Shapes, values and gradients of every head module (paper V, eqs. 3-10)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import load_config
from pipeline.heads.aps import APSNetwork
from pipeline.heads.build import build_model, predict
from pipeline.heads.classifier import make_classifier
from pipeline.heads.dependencies import DependenciesLearning
from pipeline.heads.drct2 import gather_aps, select_slices
from pipeline.heads.feature_attention import FeatureAttention
from pipeline.heads.fusion import KnowledgeFusion
from pipeline.heads.primary import PrimaryNetwork
from pipeline.heads.slice_attention import SliceAttention

torch.set_num_threads(1)
B, M, K, D, C = 3, 8, 4, 512, 5
SMALL = {
    "sampler.m": M, "model.m_key": K, "model.gru_hidden": 8, "model.aps_gru_hidden": 6, "model.aps_fc": 16,
    "model.fc_hidden": [12, 10], "model.fusion_dim": 14,
}


@pytest.fixture(autouse=True)
def seeded():
    """Every test draws the same numbers on every run (no flaky gradient checks)."""
    torch.manual_seed(0)


def small_config(**extra) -> dict:
    return load_config(None, {**SMALL, **extra})


def test_feature_attention_is_eq3_without_parameters():
    z = torch.rand(B, M, D) * 4
    x, w = FeatureAttention(D, "softmax", rescale=False)(z)
    zn = z.numpy().astype(np.float64)
    expected_w = np.exp(zn) / np.exp(zn).sum(-1, keepdims=True)
    np.testing.assert_allclose(w.numpy(), expected_w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(x.numpy(), zn * expected_w, rtol=1e-5, atol=1e-7)
    assert sum(p.numel() for p in FeatureAttention(D, "softmax").parameters()) == 0
    assert sum(p.numel() for p in FeatureAttention(D, "learnable").parameters()) == D * D + D
    # the default scale D keeps a uniform attention an identity: x = D * z * w
    x_scaled, _ = FeatureAttention(D, "softmax")(z)
    torch.testing.assert_close(x_scaled, x * D)
    x_none, w_none = FeatureAttention(D, "none")(z)
    torch.testing.assert_close(x_none, z)
    torch.testing.assert_close(w_none, torch.full_like(z, 1 / D))
    with pytest.raises(ValueError, match="unknown model.feature_attention"):
        FeatureAttention(D, "dense")


def test_input_standardizer_centres_each_scan_on_its_low_quantile():
    """The scan centre is numpy's per-channel quantile over the scan's slices (0.2 by default;
    0.5 = the median); a lesion on most slices leaves the 20 % quantile on background."""
    from pipeline.heads.input_norm import FeatureStandardizer

    z = torch.rand(B, M, D) * 3 + 1
    norm = FeatureStandardizer(D, "scan")
    norm.set_statistics(torch.zeros(D), torch.full((D,), 2.0))
    expected = (z.numpy() - np.quantile(z.numpy(), 0.2, axis=1, keepdims=True)) / 2.0
    np.testing.assert_allclose(norm(z).numpy(), expected, rtol=1e-5, atol=1e-5)
    median = FeatureStandardizer(D, "scan", quantile=0.5)
    median.set_statistics(torch.zeros(D), torch.ones(D))
    np.testing.assert_allclose(median(z).numpy(), z.numpy() - np.median(z.numpy(), axis=1, keepdims=True), atol=1e-5)
    # the context overrides the centre (the APS: its m_key slices centred on all m)
    context = torch.rand(B, M, D)
    np.testing.assert_allclose(norm(z[:, :2], context).numpy(),
                               (z[:, :2].numpy() - np.quantile(context.numpy(), 0.2, axis=1, keepdims=True)) / 2.0,
                               rtol=1e-5, atol=1e-5)
    # lesion (+5) on 12 of 16 slices: the median is lesion, the 20 % quantile still background
    flat = torch.zeros(1, 16, D)
    flat[:, 4:] += 5.0
    assert float(median(flat)[0, 10].mean()) == pytest.approx(0.0)
    assert float(norm(flat)[0, 10].mean()) == pytest.approx(2.5)  # (5 - 0) / sd 2
    dataset = FeatureStandardizer(D, "dataset")
    dataset.set_statistics(torch.ones(D), torch.full((D,), 1e-9))  # sd floored at 1e-3
    torch.testing.assert_close(dataset(z), (z - 1) / 1e-3)
    with pytest.raises(ValueError, match="scan_centre_quantile"):
        FeatureStandardizer(D, "scan", quantile=1.5)


def test_dependencies_bigru_eq4_shapes_and_both_directions():
    module = DependenciesLearning(D, hidden=7)
    x = torch.randn(B, M, D, requires_grad=True)
    y = module(x)
    assert y.shape == (B, M, 14)
    assert y.abs().max() <= 1  # tanh g
    # the backward direction carries information from the last slice to the first output
    y[:, 0].sum().backward()
    assert x.grad[:, -1].abs().sum() > 0
    with pytest.raises(ValueError, match="unknown activation"):
        DependenciesLearning(D, 4, "swish")


def test_slice_attention_eqs_5_6():
    module = SliceAttention(10)
    y = torch.randn(B, M, 10)
    weighted, w = module(y)
    a = (y @ module.mapping.weight.T + module.mapping.bias).squeeze(-1)
    expected = torch.softmax(a, dim=1)
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(w.sum(1), torch.ones(B))
    torch.testing.assert_close(weighted, y * expected.unsqueeze(-1))


def test_classifier_is_three_fc_layers_with_dropout_half():
    net = make_classifier(20, [16, 8], C, 0.5)
    linears = [mod for mod in net if isinstance(mod, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(20, 16), (16, 8), (8, C)]
    assert [mod.p for mod in net if isinstance(mod, nn.Dropout)] == [0.5, 0.5]
    assert sum(isinstance(mod, nn.ReLU) for mod in net) == 2
    assert net(torch.randn(B, 20)).shape == (B, C)


@pytest.mark.parametrize("readout", ["sum", "flatten"])
def test_primary_network_shapes_and_gradients(readout):
    torch.manual_seed(0)
    net = PrimaryNetwork(C, M, D, gru_hidden=8, fc_hidden=[12, 10], readout_mode=readout)
    out = net(torch.rand(B, M, D))
    assert out["logits"].shape == (B, C)
    assert out["matrix"].shape == (B, M, 16)
    assert out["pooled"].shape == ((B, 16) if readout == "sum" else (B, M * 16))
    assert out["slice_attention"].shape == (B, M)
    assert out["feature_attention"].shape == (B, M, D)
    torch.testing.assert_close(out["prob"], torch.sigmoid(out["logits"]))
    out["logits"].sum().backward()
    for name, p in net.named_parameters():
        if name == "slice_attention.mapping.bias":  # eq. 6's softmax ignores a constant shift
            assert p.grad is not None and p.grad.abs().max() < 1e-5, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_aps_network_shapes_and_gradients():
    net = APSNetwork(C, K, D, fc_dim=16, gru_hidden=6, fc_hidden=[12, 10])
    assert isinstance(net.norm, nn.BatchNorm1d)
    out = net(torch.rand(B, K, D))
    assert out["logits"].shape == (B, C)
    assert out["matrix"].shape == (B, K, 12)
    out["logits"].sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_select_slices_topk_in_z_order_and_random():
    w = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05], [0.4, 0.1, 0.2, 0.1, 0.2]])
    chosen = select_slices(w, 3)
    assert chosen.tolist() == [[0, 1, 3], [0, 2, 4]] or chosen.tolist() == [[0, 1, 3], [0, 2, 4]]
    g1 = torch.Generator().manual_seed(3)
    g2 = torch.Generator().manual_seed(3)
    r1, r2 = select_slices(w, 3, "random", g1), select_slices(w, 3, "random", g2)
    assert torch.equal(r1, r2)
    assert all(len(set(row)) == 3 and row == sorted(row) for row in r1.tolist())


def test_fusion_modes_shapes():
    p = {"matrix": torch.randn(B, M, 16)}
    a = {"matrix": torch.randn(B, K, 12)}
    a["rows"] = a["matrix"].mean(dim=1)
    idx = torch.tensor([[0, 2, 4, 6]] * B)
    for mode in ("pooled_sum", "scatter_sum"):
        fusion = KnowledgeFusion(C, mode, 16, 12, M, fusion_dim=14, fc_hidden=[12, 10])
        assert fusion(p, a, idx).shape == (B, C)
    # scatter_sum puts the projected APS rows at their slice positions
    fusion = KnowledgeFusion(C, "scatter_sum", 16, 12, M, fc_hidden=[12, 10])
    captured = {}
    fusion.classifier.register_forward_hook(lambda mod, inp, out: captured.setdefault("x", inp[0]))
    fusion(p, a, idx)
    summed = captured["x"].reshape(B, M, 16)
    projected = fusion.project_aps(a["matrix"])
    torch.testing.assert_close(summed[:, 2], p["matrix"][:, 2] + projected[:, 1])
    torch.testing.assert_close(summed[:, 1], p["matrix"][:, 1])


def test_drct2_forward_uses_selected_slices_and_all_parts_learn():
    model = build_model(small_config(), C)
    z = torch.rand(B, M, D)
    aps_all = torch.rand(B, M, D)
    seen = {}

    def getter(aps_idx):
        seen["idx"] = aps_idx
        return gather_aps(aps_all, aps_idx)

    out = model(z, getter)
    expected_idx = torch.sort(torch.topk(out.slice_attention, K, dim=1).indices, dim=1).values
    assert torch.equal(out.aps_idx, expected_idx) and torch.equal(seen["idx"], expected_idx)
    for key, shape in {"logits": (B, C), "prob": (B, C), "prob_primary": (B, C), "prob_aps": (B, C),
                       "slice_attention": (B, M), "feature_attention": (B, M, D), "aps_idx": (B, K)}.items():
        assert getattr(out, key).shape == shape, key
    (out.logits.sum() + out.logits_aps.sum() + out.logits_primary.sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    # a tensor of all m APS vectors and the getter give the same result
    model.eval()
    torch.testing.assert_close(model(z, aps_all).logits, model(z, getter).logits)


def test_drct1_output_format_and_param_groups():
    model = build_model(small_config(**{"model.name": "drct1"}), C)
    out = predict(model, torch.rand(B, M, D))
    np.testing.assert_array_equal(out["prob"], out["prob_primary"])
    assert np.isnan(out["prob_aps"]).all()
    assert (out["aps_idx"] == -1).all() and out["aps_idx"].shape == (B, K)
    assert [g["name"] for g in model.parameter_groups(1, 2, 3)] == ["primary"]
    groups = build_model(small_config(), C).parameter_groups(5e-4, 3e-4, 5e-4)
    assert [(g["name"], g["lr"]) for g in groups] == [("primary", 5e-4), ("aps", 3e-4), ("fusion", 5e-4)]


def test_build_rejects_bad_sizes():
    with pytest.raises(ValueError, match="m_key = 9 must be between 1 and sampler.m = 8"):
        build_model(small_config(**{"model.m_key": 9}), C)
    with pytest.raises(ValueError, match="unknown model"):
        build_model(small_config(**{"model.name": "drct3"}), C)
    with pytest.raises(ValueError, match="unknown fusion"):
        build_model(small_config(**{"model.fusion": "concat"}), C)


def test_aps_processes_only_its_m_key_selected_slices():
    """The zoom: the APS BiGRU sees exactly the m_key highest-attention slices' APS vectors, in z
    order (their input norm reads all m only for the scan centre, a per-channel quantile)."""
    config = load_config(None, {"sampler.m": 10, "model.m_key": 3, "model.input_dropout": 0.0})
    model = build_model(config, 2).eval()
    seen = {}

    def keep_input(module, inputs, output):
        seen["fc_in"] = inputs[0]

    model.aps.fc.register_forward_hook(keep_input)
    z, aps_source = torch.rand(2, 10, 512), torch.rand(2, 10, 512)
    with torch.no_grad():
        out = model(z, aps_source)
    assert seen["fc_in"].shape == (2, 3, 512)
    expected = torch.sort(torch.topk(out.slice_attention, 3, dim=1).indices, dim=1).values
    torch.testing.assert_close(out.aps_idx, expected)
    norm = model.aps.standardize
    chosen = torch.gather(aps_source, 1, expected.unsqueeze(-1).expand(-1, -1, 512))
    reference = model.aps.norm((norm(chosen, aps_source)).reshape(6, 512)).reshape(2, 3, 512)
    torch.testing.assert_close(seen["fc_in"], reference)


def test_constructor_defaults_agree_with_the_config_defaults():
    """One source of model defaults: configs/defaults.yaml (typed by pipeline.config.ModelSchema);
    a head built without arguments is the head the default config builds."""
    import inspect

    from pipeline.config import ModelSchema

    mc = load_config(None)["model"]
    expected = {"feature_dim": mc["feature_dim"], "gru_hidden": mc["gru_hidden"], "dropout": mc["dropout"],
                "readout_mode": mc["readout"], "feature_attention": mc["feature_attention"],
                "activation": mc["activation"], "input_norm": mc["input_norm"],
                "input_dropout": mc["input_dropout"], "scan_centre_quantile": mc["scan_centre_quantile"],
                "fc_hidden": tuple(mc["fc_hidden"])}
    for cls in (PrimaryNetwork, APSNetwork):
        params = inspect.signature(cls.__init__).parameters
        for name, value in expected.items():
            if name in params and not (cls is APSNetwork and name in ("gru_hidden", "feature_attention")):
                default = params[name].default
                assert (tuple(default) if name == "fc_hidden" else default) == value, (cls.__name__, name)
    assert inspect.signature(APSNetwork.__init__).parameters["gru_hidden"].default == mc["aps_gru_hidden"]
    assert inspect.signature(APSNetwork.__init__).parameters["fc_dim"].default == mc["aps_fc"]
    fields = ModelSchema.model_fields
    for name in ("input_dropout", "scan_centre_quantile", "feature_attention", "feature_attention_scale",
                 "input_norm"):
        assert fields[name].default == mc[name], name
