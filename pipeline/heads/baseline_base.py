"""What the baseline heads share: DrCT's output format and the trainer's interface, so a baseline
trains with `drct train`, writes the same `oof.npz` and is read by predict, evaluate and interpret.

Baselines (issue 15; DESIGN: "a head that loses to them is broken, whatever its loss curve says")
read one resolution only, the APS one (512 by default, `model.aps_resolution`; their specs say
``primary_view="aps"``): the most informative view a cache holds, so no baseline is handicapped
against DrCT2's zoom. They have no APS: `prob_aps`/`logits_aps` are NaN and `aps_idx` is -1 in the
run files, as for DrCT1; they are trained on BCE (`bce_loss`), their usual loss, whatever train.loss says.
"""

from __future__ import annotations

import torch

from pipeline.heads.head import Head, HeadOutput, LossTerm
from pipeline.heads.input_norm import NORMS, FeatureStandardizer


def bce_loss(config: dict) -> tuple[LossTerm, ...]:
    """A baseline's loss: BCE of its logits (logged as loss_primary, its only network)."""
    return (LossTerm("primary", "logits", "bce"),)


def scan_norm(feature_dim: int, input_norm: str, quantile: float) -> FeatureStandardizer | None:
    """The same input normalisation as DrCT's heads (`model.input_norm`), so a comparison differs
    only in the head."""
    if input_norm not in NORMS:
        raise ValueError(f"unknown model.input_norm '{input_norm}'; choose from {NORMS}")
    if input_norm == "none":
        return None
    return FeatureStandardizer(feature_dim, "scan" if input_norm == "scan" else "dataset", quantile)


def baseline_sizes(config: dict) -> tuple[int, dict]:
    """(m_key, the keyword arguments meanpool and abmil share) from the config: DrCT's input norm
    and input dropout, model.baseline_hidden, model.dropout."""
    mc = config["model"]
    m_key = min(int(mc["m_key"]), int(config["sampler"]["m"]))
    return m_key, {"feature_dim": int(mc["feature_dim"]), "hidden": int(mc.get("baseline_hidden", 128)),
                   "dropout": float(mc["dropout"]), "input_dropout": float(mc.get("input_dropout", 0.3)),
                   "input_norm": str(mc.get("input_norm", "scan")),
                   "scan_centre_quantile": float(mc.get("scan_centre_quantile", 0.2))}


class BaselineHead(Head):
    """Base of the baseline heads: subclasses implement `scores(z) -> (logits, slice_attention)`
    (slice_attention None for a head without one: uniform in the run files)."""

    variant = "baseline"

    def __init__(self, m_key: int):
        super().__init__()
        self.m_key = int(m_key)
        self.standardize: FeatureStandardizer | None = None

    def standardizers(self) -> list[tuple[FeatureStandardizer, str]]:
        """(norm, resolution) pairs whose statistics the trainer sets from the training fold."""
        return [] if self.standardize is None else [(self.standardize, "primary")]

    def scores(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def forward(self, z: torch.Tensor, aps_source=None) -> HeadOutput:
        logits, slice_w = self.scores(z)
        return HeadOutput(logits=logits, prob=torch.sigmoid(logits), slice_attention=slice_w)
