"""`meanpool` baseline: a small MLP on the mean of a scan's sampled slice vectors (mean-pooling MIL).

z (B, m, D) -> input norm (as DrCT's) -> input dropout -> mean over m -> Linear(D, h) + ReLU +
dropout -> Linear(h, C). It has no slice attention (uniform in the run files), so Algorithm 1 on it is chance.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.heads.baseline_base import BaselineHead, baseline_sizes, bce_loss, scan_norm
from pipeline.heads.head import HeadSpec


class MeanPoolMIL(BaselineHead):
    variant = "meanpool"

    def __init__(self, n_classes: int, m_key: int, feature_dim: int = 512, hidden: int = 128,
                 dropout: float = 0.5, input_dropout: float = 0.0, input_norm: str = "scan",
                 scan_centre_quantile: float = 0.2):
        super().__init__(m_key)
        self.standardize = scan_norm(feature_dim, input_norm, scan_centre_quantile)
        self.input_dropout = nn.Dropout(input_dropout)
        self.mlp = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(hidden, n_classes))

    def scores(self, z: torch.Tensor) -> tuple[torch.Tensor, None]:
        if self.standardize is not None:
            z = self.standardize(z)
        z = self.input_dropout(z)
        return self.mlp(z.mean(dim=1)), None


def build(config: dict, n_classes: int) -> MeanPoolMIL:
    m_key, sizes = baseline_sizes(config)
    return MeanPoolMIL(n_classes, m_key, **sizes)


SPEC = HeadSpec(build=build, loss_terms=bce_loss, baseline=True, slice_attention=False, primary_view="aps")
