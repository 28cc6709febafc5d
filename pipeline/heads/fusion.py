"""Knowledge fusion (paper V.C): "We summed the two feature matrices and after three fully
connected layers, we obtained the final prediction."

The primary matrix has m rows (slice-attention weighted) and the APS matrix m_key rows, so a
literal element-wise sum is not defined. Two shape-consistent readings (config ``model.fusion``):

``pooled_sum`` (default)
    Each matrix is first reduced to one vector the way its own network reads it out (the
    primary's attention-weighted sum, the APS's row mean), each vector is projected by a linear
    layer to ``model.fusion_dim``, and the two are summed: f = P_p(pool(M_p)) + P_a(pool(M_a)).
    Independent of m and m_key, cheap, and it is what the two classifiers already look at.

``scatter_sum``
    The APS rows are projected to the primary width and put back at the positions of the m_key
    slices they came from (zeros elsewhere), giving an (m, H) matrix that is summed with the
    primary matrix element-wise, then flattened (m*H). Closest to the words "summed the two
    feature matrices"; depends on the fixed m.

Either way the sum goes through the FC readout (the paper's three FC layers with ``model.fc_hidden:
[256, 128]``; one linear layer by default, pipeline/heads/classifier.py) to the fusion logits (B, C).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.heads.classifier import make_classifier

FUSIONS = ("pooled_sum", "scatter_sum")


class KnowledgeFusion(nn.Module):
    """forward(primary_out, aps_out, aps_idx (B, k)) -> logits (B, C)."""

    def __init__(
        self,
        n_classes: int,
        mode: str,
        primary_dim: int,
        aps_dim: int,
        m: int,
        fusion_dim: int = 256,
        fc_hidden: Sequence[int] = (),
        dropout: float = 0.5,
    ):
        super().__init__()
        if mode not in FUSIONS:
            raise ValueError(f"unknown fusion '{mode}'; choose from {FUSIONS}")
        self.mode = mode
        if mode == "pooled_sum":
            self.project_primary = nn.Linear(primary_dim, fusion_dim)
            self.project_aps = nn.Linear(aps_dim, fusion_dim)
            in_dim = fusion_dim
        else:
            self.project_aps = nn.Linear(aps_dim, primary_dim)
            in_dim = m * primary_dim
        self.classifier = make_classifier(in_dim, fc_hidden, n_classes, dropout)

    def forward(self, primary_out: dict, aps_out: dict, aps_idx: torch.Tensor) -> torch.Tensor:
        if self.mode == "pooled_sum":
            primary_pooled = primary_out["matrix"].sum(dim=1)  # attention pooling (eq. 6 weights)
            aps_pooled = aps_out["rows"]  # the APS's own row pooling (model.aps_row_pool)
            fused = self.project_primary(primary_pooled) + self.project_aps(aps_pooled)
        else:
            primary = primary_out["matrix"]  # (B, m, H)
            aps_rows = self.project_aps(aps_out["matrix"])  # (B, k, H)
            index = aps_idx.unsqueeze(-1).expand(-1, -1, primary.shape[-1])
            placed = torch.zeros_like(primary).scatter(1, index, aps_rows)
            fused = (primary + placed).flatten(1)
        return self.classifier(fused)
