"""The primary network, DrCT1 (paper V.A): feature attention -> BiGRU -> slice attention -> FC readout.

Input: the m sampled slices' 512-d VGG16 vectors at the primary resolution (224), read from the
feature cache (the paper's encoder, frozen, is stage one). Shapes, with B scans per batch::

    z (B, m, D=512) --FeatureStandardizer (per-channel, training-fold statistics)-->
      --input dropout (model.input_dropout; training only)-->
      --FeatureAttention (eq. 3)--> x (B, m, D), feature_attention (B, m, D)
      --DependenciesLearning (eq. 4)--> y (B, m, H=2*gru_hidden)
      --SliceAttention (eqs. 5-6)--> weighted (B, m, H), slice_attention (B, m)
      --readout--> pooled (B, H) ("sum": sum_t w_t y_t)  or (B, m*H) ("flatten")
      --readout FC layers--> logits (B, C)   (sigmoid -> probabilities)

Readout (the paper says only that the weighted vectors pass through three FC layers): "sum"
(default) sums the attention-weighted rows, i.e. attention pooling, independent of m;
"flatten" concatenates the m weighted rows (needs the fixed m of the sampler).

Readout FC layers (``model.fc_hidden``, shared with APS and fusion): the paper passes the weighted
vectors through three FC layers (ReLU, dropout 0.5); the default here is one linear layer
(``fc_hidden=()``), our departure. Measured on the planted family's ``weak`` member at 224 px (BENCHMARKS.md, issue 15):
with three layers the training loss stays at the constant predictor's for 16 epochs and the slice
attention stays uniform (27 of 28 slices), with or without their dropout, wider or He-initialised;
with one linear layer the same network reaches validation AUC 0.78 and puts a lesion slice first in
75 % of positive scans after 25 epochs. The attention can only learn to rank slices once the readout
passes a consistent gradient back to it. In DrCT2 the one-layer readouts of APS and fusion also
learn faster (heterogeneous, 30 epochs: 0.955 against 0.770). ``fc_hidden: [256, 128]`` restores
the three layers.

Input dropout (not in the paper, which names dropout 0.5 for the FC layers only): zeroing a
random 30 % of the 512 channels of every slice during training. A lesion shows on a few of 512
channels; without it the BiGRU fits the noise channels of ~1,000 training scans (training loss
falls, validation AUC stays at chance: issue 15); with it, it has to use every lesion channel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.heads.classifier import make_classifier
from pipeline.heads.dependencies import DependenciesLearning
from pipeline.heads.feature_attention import FeatureAttention
from pipeline.heads.input_norm import NORMS, FeatureStandardizer
from pipeline.heads.slice_attention import SliceAttention

READOUTS = ("sum", "flatten")


def readout(matrix: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, T, H) -> (B, H) by summing rows, or (B, T*H) by flattening."""
    return matrix.sum(dim=1) if mode == "sum" else matrix.flatten(1)


class PrimaryNetwork(nn.Module):
    """DrCT1. forward(z (B, m, D)) -> dict with logits (B, C), prob (B, C), matrix (B, m, H),
    pooled (B, H or m*H), slice_attention (B, m), feature_attention (B, m, D)."""

    def __init__(
        self,
        n_classes: int,
        m: int,
        feature_dim: int = 512,
        gru_hidden: int = 128,
        fc_hidden: Sequence[int] = (),
        dropout: float = 0.5,
        readout_mode: str = "sum",
        feature_attention: str = "learnable",
        activation: str = "tanh",
        input_norm: str = "scan",
        attention_rescale: bool = True,
        input_dropout: float = 0.3,
        scan_centre_quantile: float = 0.2,
    ):
        super().__init__()
        if readout_mode not in READOUTS:
            raise ValueError(f"unknown readout '{readout_mode}'; choose from {READOUTS}")
        self.m = m
        self.readout_mode = readout_mode
        if input_norm not in NORMS:
            raise ValueError(f"unknown model.input_norm '{input_norm}'; choose from {NORMS}")
        centre = "scan" if input_norm == "scan" else "dataset"
        self.standardize = FeatureStandardizer(feature_dim, centre, scan_centre_quantile) \
            if input_norm != "none" else None
        self.input_dropout = nn.Dropout(input_dropout)
        self.feature_attention = FeatureAttention(feature_dim, feature_attention, attention_rescale)
        self.dependencies = DependenciesLearning(feature_dim, gru_hidden, activation)
        self.out_dim = self.dependencies.out_dim
        self.slice_attention = SliceAttention(self.out_dim)
        pooled_dim = self.out_dim if readout_mode == "sum" else m * self.out_dim
        self.classifier = make_classifier(pooled_dim, fc_hidden, n_classes, dropout)

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.standardize is not None:
            z = self.standardize(z)
        z = self.input_dropout(z)
        x, feature_w = self.feature_attention(z)
        y = self.dependencies(x)
        weighted, slice_w = self.slice_attention(y)
        pooled = readout(weighted, self.readout_mode)
        logits = self.classifier(pooled)
        return {
            "logits": logits,
            "prob": torch.sigmoid(logits),
            "matrix": weighted,
            "pooled": pooled,
            "slice_attention": slice_w,
            "feature_attention": feature_w,
        }
