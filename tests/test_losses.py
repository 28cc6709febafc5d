"""Loss = Loss_primary + Loss_aps + Loss_fusion (eq. 11): MSE (eq. 12) and BCE (eq. 13)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.training.losses import DrCTLoss


def _outputs(seed=0, drct1=False):
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(4, 3, generator=g) * 2 for k in ("logits_primary", "logits_aps", "logits")}
    if drct1:
        out["logits_aps"] = torch.full((4, 3), float("nan"))
    return out


def _sig(x):
    return 1 / (1 + np.exp(-x.numpy().astype(np.float64)))


def _mse(logits, y):
    return ((y - _sig(logits)) ** 2).mean()


def _bce(logits, y):
    p = _sig(logits)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()


def test_paper_loss_is_mse_mse_bce():
    out = _outputs()
    y = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.float32)
    total, parts = DrCTLoss("mse_mse_bce")(out, y)
    yn = y.numpy()
    assert parts["primary"].item() == pytest.approx(_mse(out["logits_primary"], yn), rel=1e-5)
    assert parts["aps"].item() == pytest.approx(_mse(out["logits_aps"], yn), rel=1e-5)
    assert parts["fusion"].item() == pytest.approx(_bce(out["logits"], yn), rel=1e-5)
    assert total.item() == pytest.approx(sum(p.item() for p in parts.values()), rel=1e-6)


def test_bce_everywhere_option_and_drct1():
    out = _outputs(1)
    y = torch.ones(4, 3)
    _, parts = DrCTLoss("bce")(out, y)
    assert parts["primary"].item() == pytest.approx(_bce(out["logits_primary"], y.numpy()), rel=1e-5)
    assert parts["aps"].item() == pytest.approx(_bce(out["logits_aps"], y.numpy()), rel=1e-5)
    total, parts = DrCTLoss()(_outputs(2, drct1=True), y)
    assert set(parts) == {"primary"} and torch.isfinite(total)


def test_gradient_flows_and_unknown_loss():
    out = {k: v.requires_grad_() for k, v in _outputs(3).items()}
    total, _ = DrCTLoss()(out, torch.zeros(4, 3))
    total.backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in out.values())
    with pytest.raises(ValueError, match="unknown loss 'focal'"):
        DrCTLoss("focal")
