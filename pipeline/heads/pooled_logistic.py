"""`pooled_logistic` baseline: L2 logistic regression on max+mean pooled slice vectors.

x = [max_t z_t, mean_t z_t] (2D values) over a scan's m sampled slices (the raw cached vectors),
standardised with the training fold's mean and sd, then one L2-penalised logistic regression per
class, its C chosen by 3-fold inner cross-validation grouped by patient (log loss). Fitted in
closed form by scikit-learn (`fit`), not by SGD; the coefficients then live in a Linear layer, so
the head is saved, loaded and applied like every other one. `drct train` calls `fit_scans`
(the spec's `fit`) once per fold instead of SGD epochs.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from pipeline.heads.baseline_base import BaselineHead, bce_loss
from pipeline.heads.head import HeadSpec

C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def pooled_vectors(z: torch.Tensor) -> torch.Tensor:
    """(B, m, D) -> (B, 2D): per-channel max, then mean, over the slices."""
    return torch.cat([z.max(dim=1).values, z.mean(dim=1)], dim=1)


class PooledLogistic(BaselineHead):
    variant = "pooled_logistic"

    def __init__(self, n_classes: int, m_key: int, feature_dim: int = 512):
        super().__init__(m_key)
        self.register_buffer("mean", torch.zeros(2 * feature_dim))
        self.register_buffer("sd", torch.ones(2 * feature_dim))
        self.linear = nn.Linear(2 * feature_dim, n_classes)
        self.chosen_c: list[float] = []

    def scores(self, z: torch.Tensor) -> tuple[torch.Tensor, None]:
        x = (pooled_vectors(z) - self.mean) / self.sd
        return self.linear(x), None

    @torch.no_grad()
    def fit(self, pooled: np.ndarray, labels: np.ndarray, groups: np.ndarray, seed: int = 0) -> list[float]:
        """Fit on (N, 2D) pooled training vectors; returns the C chosen per class."""
        from sklearn.linear_model import LogisticRegressionCV
        from sklearn.model_selection import GroupKFold

        pooled = np.asarray(pooled, np.float64)
        mean, sd = pooled.mean(axis=0), np.maximum(pooled.std(axis=0), 1e-6)
        x = (pooled - mean) / sd
        n_splits = max(2, min(3, len(np.unique(groups))))
        splits = list(GroupKFold(n_splits=n_splits).split(x, groups=groups))
        weight = np.zeros((labels.shape[1], x.shape[1]))
        bias = np.zeros(labels.shape[1])
        chosen = []
        for c in range(labels.shape[1]):
            y = labels[:, c]
            if y.min() == y.max() or any(y[test].min() == y[test].max() for _, test in splits):
                prevalence = np.clip(y.mean(), 1e-3, 1 - 1e-3)  # one class only: the prior
                bias[c] = np.log(prevalence / (1 - prevalence))
                chosen.append(float("nan"))
                continue
            with warnings.catch_warnings():  # scikit-learn 1.9 announces 1.10's defaults; we set what matters
                warnings.simplefilter("ignore", FutureWarning)
                model = LogisticRegressionCV(Cs=list(C_GRID), cv=splits, scoring="neg_log_loss", max_iter=2000,
                                             random_state=seed).fit(x, y)
            weight[c], bias[c] = model.coef_[0], model.intercept_[0]
            chosen.append(float(np.ravel(model.C_)[0]))
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.sd.copy_(torch.as_tensor(sd, dtype=torch.float32))
        self.linear.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        self.linear.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
        self.chosen_c = chosen
        return chosen


def build(config: dict, n_classes: int) -> PooledLogistic:
    m_key = min(int(config["model"]["m_key"]), int(config["sampler"]["m"]))
    return PooledLogistic(n_classes, m_key, int(config["model"]["feature_dim"]))


def fit_scans(model: PooledLogistic, samples, labels: np.ndarray, patients: np.ndarray, seed: int) -> dict:
    """The closed-form fit on the training scans' evaluation samples ((B, m, D) batches), max+mean
    pooled; C by inner patient-grouped CV. Returns what the fold's history record adds."""
    pooled = np.concatenate([pooled_vectors(z).cpu().numpy() for z in samples])
    model.fit(pooled, labels, patients, seed)
    return {"chosen_c": model.chosen_c}


SPEC = HeadSpec(build=build, loss_terms=bce_loss, baseline=True, slice_attention=False, primary_view="aps",
                fit=fit_scans)
