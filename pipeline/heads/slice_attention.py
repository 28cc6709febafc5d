"""Slice attention (paper V.A.3, eqs. 5-6): how much each slice matters for the diagnosis.

a_t = Mapping(y_t) with Mapping one fully connected layer to a single value (eq. 5), and
w_t = softmax over the m slices (eq. 6). The sequence outputs are multiplied by their weights
("fused using the element-wise multiplication method"); the weights also choose the m_key
slices the APS network zooms in on and are the histogram of the report (paper Fig. 2).
"""

from __future__ import annotations

import torch
from torch import nn


class SliceAttention(nn.Module):
    """(B, m, H) -> (weighted (B, m, H), w (B, m)); w sums to 1 over the m slices."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.mapping = nn.Linear(in_dim, 1)  # eq. 5

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.softmax(self.mapping(y).squeeze(-1), dim=-1)  # eq. 6
        return y * w.unsqueeze(-1), w
