"""A head's training loss: the sum of the loss terms its registry entry declares (HeadSpec.loss_terms,
pipeline/heads/head.py), each read from the named field of its HeadOutput.

A term is ``mse``, the mean squared error between the sigmoid outputs and the labels (the paper's
eq. 12), or ``bce``, binary cross-entropy (eq. 13) computed from the logits
(``binary_cross_entropy_with_logits``), which equals eq. 13 on sigmoid outputs but is stable when a
probability saturates. DrCT2's terms are the paper's eq. 11 (primary, APS, fusion; ``train.loss``,
pipeline/heads/drct2.py), DrCT1's the primary one, a baseline's BCE of its logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pipeline.heads.build import head_spec
from pipeline.heads.head import HeadOutput, LossTerm

KINDS = ("mse", "bce")


def _term(kind: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(torch.sigmoid(logits), target)
    return F.binary_cross_entropy_with_logits(logits, target)


class HeadLoss:
    """loss(outputs: HeadOutput, target (B, C)) -> (total, {term name: value}), e.g. DrCT2's
    {"primary": .., "aps": .., "fusion": ..}."""

    def __init__(self, terms: Sequence[LossTerm]):
        terms = tuple(terms)
        if not terms:
            raise ValueError("a head's loss needs at least one term")
        for term in terms:
            if term.kind not in KINDS:
                raise ValueError(f"loss term '{term.name}': unknown kind '{term.kind}'; choose from {KINDS}")
            if term.output not in HeadOutput.__dataclass_fields__:
                raise ValueError(f"loss term '{term.name}' reads '{term.output}', not a HeadOutput field")
        self.terms = terms

    def __call__(self, outputs: HeadOutput, target: torch.Tensor):
        target = target.float()
        parts = {}
        for term in self.terms:
            logits = getattr(outputs, term.output)
            if logits is None:
                raise ValueError(f"loss term '{term.name}' reads '{term.output}', which this head does not output")
            parts[term.name] = _term(term.kind, logits, target)
        total = torch.stack(list(parts.values())).sum()
        return total, parts


def head_loss(config: dict) -> HeadLoss:
    """The training loss of the head config["model"]["name"] (its spec's terms)."""
    return HeadLoss(head_spec(config).loss_terms(config))
