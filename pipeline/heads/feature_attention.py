"""Feature attention (paper eq. 3): re-weight the 512 values of each slice vector.

Eq. 3 as written: w_i = exp(z_i) / sum_j exp(z_j) over the 512 values of one slice vector,
and the new representation is x = z * w (element-wise, paper V.A.2 "we use element-wise
multiplication to merge these two vectors"). There are no parameters: the attention only
re-scales what the frozen VGG16 already found salient, which is why the weights can be drawn
as a per-feature heat map in the report (the CAM of the highest-weighted channels).

Scale: the weights of one slice sum to 1, so x = z * w is about 1/512 of z, and the BiGRU
starts from inputs three orders of magnitude smaller than its own initialisation expects.
``rescale=True`` (config ``model.feature_attention_scale: dim``, default) multiplies by D, so a
uniform attention leaves z unchanged: x = D * z * w. A constant factor is absorbed by the
BiGRU's input weights in exact arithmetic, so this is eq. 3 with a better starting point;
``one`` keeps the literal form.

A learnable variant (``mode='learnable'``, config ``model.feature_attention: learnable``) scores
each value with a linear map before the softmax, w = softmax(W z + b); it is not in the paper.
"""

from __future__ import annotations

import torch
from torch import nn

MODES = ("softmax", "learnable", "none")


class FeatureAttention(nn.Module):
    """(B, m, D) slice vectors -> (x, w), both (B, m, D); w sums to 1 over D for every slice.

    ``mode="none"`` is the ablation without feature attention: w = 1/D, so x = z (rescaled).
    """

    def __init__(self, feature_dim: int = 512, mode: str = "softmax", rescale: bool = True):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown model.feature_attention '{mode}'; choose from {MODES}")
        self.mode = mode
        self.score = nn.Linear(feature_dim, feature_dim) if mode == "learnable" else None
        self.scale = float(feature_dim) if rescale else 1.0

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "none":
            w = torch.full_like(z, 1.0 / z.shape[-1])
        else:
            w = torch.softmax(z if self.score is None else self.score(z), dim=-1)
        return z * w * self.scale, w
