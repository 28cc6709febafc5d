"""Loss = Loss_primary + Loss_aps + Loss_fusion (eq. 11): MSE (eq. 12) and BCE (eq. 13), as the
loss terms of DrCT's registry entries (pipeline/heads/drct2.py) summed by HeadLoss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.heads.drct2 import paper_loss
from pipeline.heads.head import HeadOutput, LossTerm
from pipeline.training.losses import HeadLoss, head_loss


def drct_loss(kind="mse_mse_bce", aps=True):  # the loss the trainer builds for DrCT2 (DrCT1: aps=False)
    return HeadLoss(paper_loss({"train": {"loss": kind}}, aps=aps))


def _outputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(4, 3, generator=g) * 2 for k in ("logits_primary", "logits_aps", "logits")}
    return out


def _head(out):
    return HeadOutput(prob=torch.sigmoid(out["logits"]), **out)


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
    total, parts = drct_loss("mse_mse_bce")(_head(out), y)
    yn = y.numpy()
    assert parts["primary"].item() == pytest.approx(_mse(out["logits_primary"], yn), rel=1e-5)
    assert parts["aps"].item() == pytest.approx(_mse(out["logits_aps"], yn), rel=1e-5)
    assert parts["fusion"].item() == pytest.approx(_bce(out["logits"], yn), rel=1e-5)
    assert total.item() == pytest.approx(sum(p.item() for p in parts.values()), rel=1e-6)


def test_bce_everywhere_option_and_drct1():
    out = _outputs(1)
    y = torch.ones(4, 3)
    _, parts = drct_loss("bce")(_head(out), y)
    assert parts["primary"].item() == pytest.approx(_bce(out["logits_primary"], y.numpy()), rel=1e-5)
    assert parts["aps"].item() == pytest.approx(_bce(out["logits_aps"], y.numpy()), rel=1e-5)
    drct1 = _outputs(2)
    del drct1["logits_aps"]
    total, parts = drct_loss(aps=False)(_head(drct1), y)
    assert set(parts) == {"primary"} and torch.isfinite(total)


def test_gradient_flows_and_unknown_loss():
    out = {k: v.requires_grad_() for k, v in _outputs(3).items()}
    total, _ = drct_loss()(_head(out), torch.zeros(4, 3))
    total.backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in out.values())
    with pytest.raises(ValueError, match="unknown loss 'focal'"):
        drct_loss("focal")


def test_the_trainer_loss_is_the_spec_terms():
    """`head_loss` reads the head's registry entry: DrCT2 three terms per train.loss, DrCT1 the
    primary one, a baseline BCE of its logits whatever train.loss says."""
    from pipeline.config import load_config

    assert [t.name for t in head_loss(load_config(None)).terms] == ["primary", "aps", "fusion"]
    assert head_loss(load_config(None, {"model.name": "drct1"})).terms == (LossTerm("primary", "logits_primary", "mse"),)
    assert head_loss(load_config(None, {"model.name": "abmil"})).terms == (LossTerm("primary", "logits", "bce"),)
    with pytest.raises(ValueError, match="does not output"):
        drct_loss()(HeadOutput(logits=torch.zeros(2, 1), prob=torch.zeros(2, 1)), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="not a HeadOutput field"):
        HeadLoss([LossTerm("x", "logit", "bce")])
