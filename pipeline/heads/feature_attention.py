"""Feature attention (paper eq. 3): re-weight the 512 values of each slice vector.

Eq. 3: w_i = exp(s_i) / sum_j exp(s_j) over the 512 nodes of one slice vector, and the new
representation is x = z * w (element-wise, paper V.A.2 "we use element-wise multiplication to
merge these two vectors"). The weights can be drawn as a per-feature heat map in the report.

Modes (config ``model.feature_attention``):

* ``learnable`` (default): s = W z + b, one dense scoring layer before the softmax, as attention
  layers are built ("assign different weights to each node"). Measured on planted caches, this
  is the form that learns which channels carry a lesion (BENCHMARKS.md, issue 8).
* ``softmax``: s = z, eq. 3 read literally, no parameters. On VGG16-like vectors it keeps the
  few largest channels of every slice and leaves the heads at chance (measured).
* ``none``: w = 1/D, the ablation without feature attention.

Scale: the weights of one slice sum to 1, so x = z * w is about 1/512 of z, and the BiGRU
starts from inputs three orders of magnitude smaller than its own initialisation expects.
``rescale=True`` (config ``model.feature_attention_scale: dim``, default) multiplies by D, so a
uniform attention leaves z unchanged: x = D * z * w. A constant factor is absorbed by the
BiGRU's input weights in exact arithmetic, so this is eq. 3 with a better starting point;
``one`` keeps the literal form.
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
