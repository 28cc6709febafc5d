"""What the baseline heads share: DrCT's output format and the trainer's interface, so a baseline
trains with `drct train`, writes the same `oof.npz` and is read by predict, evaluate and interpret.

Baselines (issue 15; DESIGN: "a head that loses to them is broken, whatever its loss curve says")
read one resolution only, the APS one (512 by default, `model.aps_resolution`): the most
informative view a cache holds, so no baseline is handicapped against DrCT2's zoom. They have no
APS: `prob_aps`/`logits_aps` are NaN and `aps_idx` is -1, as for DrCT1.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.heads.input_norm import NORMS, FeatureStandardizer


def scan_norm(feature_dim: int, input_norm: str, quantile: float) -> FeatureStandardizer | None:
    """The same input normalisation as DrCT's heads (`model.input_norm`), so a comparison differs
    only in the head."""
    if input_norm not in NORMS:
        raise ValueError(f"unknown model.input_norm '{input_norm}'; choose from {NORMS}")
    if input_norm == "none":
        return None
    return FeatureStandardizer(feature_dim, "scan" if input_norm == "scan" else "dataset", quantile)


class BaselineHead(nn.Module):
    """Base of the baseline heads: subclasses implement `scores(z) -> (logits, slice_attention)`."""

    variant = "baseline"
    selection = "attention"  # no random zoom to seed (trainer.predict_scans reads it)

    def __init__(self, m_key: int):
        super().__init__()
        self.m_key = int(m_key)
        self.generator: torch.Generator | None = None
        self.standardize: FeatureStandardizer | None = None

    def standardizers(self) -> list[tuple[FeatureStandardizer, str]]:
        """(norm, resolution) pairs whose statistics the trainer sets from the training fold."""
        return [] if self.standardize is None else [(self.standardize, "primary")]

    def scores(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, z: torch.Tensor, aps_source=None) -> dict[str, torch.Tensor]:
        logits, slice_w = self.scores(z)
        nan = torch.full_like(logits, float("nan"))
        prob = torch.sigmoid(logits)
        return {
            "logits": logits, "prob": prob, "logits_primary": logits, "prob_primary": prob,
            "logits_aps": nan, "prob_aps": nan, "slice_attention": slice_w,
            "feature_attention": torch.full_like(z, 1.0 / z.shape[-1]),
            "aps_idx": torch.full((z.shape[0], self.m_key), -1, dtype=torch.long, device=z.device),
        }

    def parameter_groups(self, lr_primary: float, lr_aps: float, lr_fusion: float) -> list[dict]:
        return [{"params": list(self.parameters()), "lr": lr_primary, "name": self.variant}]
