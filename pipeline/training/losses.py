"""The DrCT2 training loss (paper V.D, eq. 11): Loss = Loss_primary + Loss_aps + Loss_fusion.

Default ``mse_mse_bce`` (the paper): mean squared error (eq. 12) between the sigmoid outputs
and the labels for the primary and APS networks, binary cross-entropy (eq. 13) for fusion.
``bce``: BCE for all three (the Table 2 comparison). BCE is computed from the logits
(``binary_cross_entropy_with_logits``), which equals eq. 13 on sigmoid outputs but is stable
when a probability saturates. DrCT1 has only the primary term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("mse_mse_bce", "bce")


def _term(kind: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(torch.sigmoid(logits), target)
    return F.binary_cross_entropy_with_logits(logits, target)


class DrCTLoss:
    """loss(outputs, target (B, C)) -> (total, {"primary": .., "aps": .., "fusion": ..})."""

    def __init__(self, kind: str = "mse_mse_bce"):
        if kind not in LOSSES:
            raise ValueError(f"unknown loss '{kind}'; choose from {LOSSES}")
        self.kind = kind
        self.primary_kind = "mse" if kind == "mse_mse_bce" else "bce"

    def __call__(self, outputs: dict[str, torch.Tensor], target: torch.Tensor):
        target = target.float()
        parts = {"primary": _term(self.primary_kind, outputs["logits_primary"], target)}
        if not torch.isnan(outputs["logits_aps"]).all():
            parts["aps"] = _term(self.primary_kind, outputs["logits_aps"], target)
            parts["fusion"] = _term("bce", outputs["logits"], target)
        total = torch.stack(list(parts.values())).sum()
        return total, parts
