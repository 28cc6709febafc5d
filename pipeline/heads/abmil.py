"""`abmil` baseline: gated attention MIL (Ilse, Tomczak and Welling, ICML 2018, eq. 9).

Each slice vector is embedded, h_t = ReLU(W z_t); the gated attention is
a_t = softmax_t(w^T (tanh(V h_t) * sigmoid(U h_t))); the scan is sum_t a_t h_t -> Linear -> logits.
No recurrence: slices are an unordered bag. `a` is its slice attention for Algorithm 1.
Input norm and input dropout are DrCT's (`model.input_norm`, `model.input_dropout`).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.heads.baseline_base import BaselineHead, baseline_sizes, bce_loss, scan_norm
from pipeline.heads.head import HeadSpec


class GatedAttentionMIL(BaselineHead):
    variant = "abmil"

    def __init__(self, n_classes: int, m_key: int, feature_dim: int = 512, hidden: int = 128,
                 attention_dim: int = 64, dropout: float = 0.5, input_dropout: float = 0.0,
                 input_norm: str = "scan", scan_centre_quantile: float = 0.2):
        super().__init__(m_key)
        self.standardize = scan_norm(feature_dim, input_norm, scan_centre_quantile)
        self.input_dropout = nn.Dropout(input_dropout)
        self.embed = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(inplace=True))
        self.attention_v = nn.Linear(hidden, attention_dim)
        self.attention_u = nn.Linear(hidden, attention_dim)
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, n_classes))

    def scores(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.standardize is not None:
            z = self.standardize(z)
        h = self.embed(self.input_dropout(z))                                   # (B, m, L)
        gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        a = torch.softmax(self.attention_w(gate).squeeze(-1), dim=1)            # (B, m)
        return self.classifier((a.unsqueeze(-1) * h).sum(dim=1)), a


def build(config: dict, n_classes: int) -> GatedAttentionMIL:
    m_key, sizes = baseline_sizes(config)
    return GatedAttentionMIL(n_classes, m_key, **sizes)


SPEC = HeadSpec(build=build, loss_terms=bce_loss, baseline=True, slice_attention=True, primary_view="aps")
