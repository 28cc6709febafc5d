"""Attention proposal slices network, APS (paper V.B, eqs. 7-10): the "zoom in".

The paper upsamples the m_key key slices to 512x512 (eq. 8), runs VGG16 on them (eq. 9) and
stacks the vectors (eq. 10); here those vectors come from the feature cache's 512 array
(stage one computed them once), gathered by slice index. Then, as in the paper: batch
normalisation, one fully connected layer, the dependencies-learning BiGRU (eq. 4) and three FC
layers. The m_key slices keep their z order so the BiGRU sees a (sparser) anatomical sequence.

Shapes::

    F (B, k=m_key, D=512) --FeatureStandardizer (as the primary's, centred on all m slices)-->
      --input dropout (as the primary's)-->
      --BatchNorm1d(D)--> --Linear(D, aps_fc) + ReLU--> (B, k, aps_fc)
      --DependenciesLearning--> matrix (B, k, H_a = 2*aps_gru_hidden)
      --readout--> pooled (B, H_a) (mean or max of the rows, model.aps_row_pool: APS has no slice
                   attention) or (B, k*H_a) (readout: flatten)
      --FC readout (model.fc_hidden: one linear layer by default, the paper's three with [256, 128])--> logits (B, C)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.heads.classifier import make_classifier
from pipeline.heads.dependencies import DependenciesLearning
from pipeline.heads.input_norm import NORMS, FeatureStandardizer

ROW_POOLS = ("mean", "max")


class APSNetwork(nn.Module):
    """forward(F (B, k, D)) -> dict with logits (B, C), prob, matrix (B, k, H_a), pooled."""

    def __init__(
        self,
        n_classes: int,
        m_key: int,
        feature_dim: int = 512,
        fc_dim: int = 256,
        gru_hidden: int = 128,
        fc_hidden: Sequence[int] = (),
        dropout: float = 0.5,
        readout_mode: str = "sum",
        activation: str = "tanh",
        row_pool: str = "mean",
        input_norm: str = "scan",
        input_dropout: float = 0.3,
        scan_centre_quantile: float = 0.2,
    ):
        super().__init__()
        if input_norm not in NORMS:
            raise ValueError(f"unknown model.input_norm '{input_norm}'; choose from {NORMS}")
        self.m_key = m_key
        centre = "scan" if input_norm == "scan" else "dataset"
        self.standardize = FeatureStandardizer(feature_dim, centre, scan_centre_quantile) \
            if input_norm != "none" else None
        self.input_dropout = nn.Dropout(input_dropout)
        self.readout_mode = readout_mode
        if row_pool not in ROW_POOLS:
            raise ValueError(f"unknown model.aps_row_pool '{row_pool}'; choose from {ROW_POOLS}")
        self.row_pool = row_pool
        self.norm = nn.BatchNorm1d(feature_dim)
        self.fc = nn.Sequential(nn.Linear(feature_dim, fc_dim), nn.ReLU(inplace=True))
        self.dependencies = DependenciesLearning(fc_dim, gru_hidden, activation)
        self.out_dim = self.dependencies.out_dim
        pooled_dim = self.out_dim if readout_mode == "sum" else m_key * self.out_dim
        self.classifier = make_classifier(pooled_dim, fc_hidden, n_classes, dropout)

    @property
    def reads_scan_context(self) -> bool:
        """Whether forward wants `context`: its input norm centres on the scan's own slices."""
        return self.standardize is not None and self.standardize.centre == "scan"

    def forward(self, features: torch.Tensor, context: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`context`: the APS-resolution vectors of all m sampled slices (the scan centre)."""
        if self.standardize is not None:
            features = self.standardize(features, context)
        features = self.input_dropout(features)
        b, k, d = features.shape
        h = self.norm(features.reshape(b * k, d)).reshape(b, k, d)
        matrix = self.dependencies(self.fc(h))
        rows = matrix.max(dim=1).values if self.row_pool == "max" else matrix.mean(dim=1)
        pooled = rows if self.readout_mode == "sum" else matrix.flatten(1)
        logits = self.classifier(pooled)
        return {"logits": logits, "prob": torch.sigmoid(logits), "matrix": matrix, "pooled": pooled, "rows": rows}
