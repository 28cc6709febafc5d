"""What a head is, for the trainer: its outputs (`HeadOutput`), its base class (`Head`), its loss
terms (`LossTerm`) and its registry entry (`HeadSpec`). The trainer, the losses and the run files
read only these; a new head is one module that fills them in (CONTRIBUTING.md, "Add a head";
the registry: pipeline/heads/registry.py).

A head maps the m sampled slice vectors of a scan, z (B, m, D), and the APS-resolution vectors
(`aps_source`: a (B, m, D) tensor or a callable aps_idx (B, k) -> (B, k, D), the cache gather)
to a `HeadOutput`. Fields a head does not have are None; the run files (`run_arrays`, then
oof.npz) still hold every field, filled as for DrCT1: the primary outputs are the head's own,
the APS outputs NaN, aps_idx -1 (`Head.m_key` wide), the attentions uniform.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

ApsSource = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]  # (B, m, D), or aps_idx -> (B, k, D)

@dataclass(frozen=True)
class HeadOutput:
    """One forward pass. logits/prob (B, C): the final prediction (fusion for DrCT2);
    logits_primary/prob_primary and logits_aps/prob_aps (B, C): the sub-networks' own, where a
    head has them; slice_attention (B, m) (sums to 1 over m); feature_attention (B, m, D);
    aps_idx (B, m_key) int64: the positions the APS zoomed in on."""

    logits: torch.Tensor
    prob: torch.Tensor
    logits_primary: torch.Tensor | None = None
    prob_primary: torch.Tensor | None = None
    logits_aps: torch.Tensor | None = None
    prob_aps: torch.Tensor | None = None
    slice_attention: torch.Tensor | None = None
    feature_attention: torch.Tensor | None = None
    aps_idx: torch.Tensor | None = None



class Head(nn.Module):
    """Base of every head: what the trainer calls besides forward, with the defaults of a head
    that has one network, no input statistics and nothing random at evaluation."""

    variant = "head"
    m_key = 0  # width of aps_idx in the run files (-1 there for a head that selects no slices)

    def forward(self, z: torch.Tensor, aps_source: ApsSource | None = None) -> HeadOutput:
        raise NotImplementedError

    def standardizers(self) -> list[tuple[nn.Module, str]]:
        """(norm, resolution) pairs whose statistics the trainer sets from the training fold: each
        norm has `centre_quantile` and `set_statistics` (pipeline/heads/input_norm.py); the
        resolution is "primary" or "aps"."""
        return []

    def parameter_groups(self, lr_primary: float, lr_aps: float, lr_fusion: float) -> list[dict]:
        """Optimiser parameter groups (train.lr_*): one group at lr_primary unless a head has parts."""
        return [{"params": list(self.parameters()), "lr": lr_primary, "name": self.variant}]

    def evaluation_seed(self, seed: int | None) -> None:
        """Seed whatever the head draws at evaluation (None: stop), so evaluation repeats."""


@dataclass(frozen=True)
class LossTerm:
    """One term of a head's training loss: `kind` ("mse" on the sigmoid, or "bce" from the
    logits) of the HeadOutput field `output` against the labels; logged as ``loss_<name>``."""

    name: str
    output: str
    kind: str


@dataclass(frozen=True)
class HeadSpec:
    """A registry entry (pipeline/heads/registry.py): what the trainer must know about a head.

    build(config, n_classes) -> Head, sized by config["model"] and config["sampler"];
    loss_terms(config) -> the LossTerms summed into its training loss (pipeline/training/losses.py);
    baseline: not the paper's model (run.json's departures say so; bench/heads.py compares);
    slice_attention: its slice attention ranks slices (Algorithm 1 is meaningful on it);
    primary_view: the cached resolution z is read at, "primary" (the first) or "aps" (the APS one);
    fit: None (trained by SGD, train.epochs epochs), or fit(model, samples, labels, patients, seed)
      -> dict fitting it in closed form on the training scans' evaluation samples (an iterable of
      (B, m, D) tensors), its return value added to the one history record.
    """

    build: Callable[[dict, int], Head]
    loss_terms: Callable[[dict], tuple[LossTerm, ...]]
    baseline: bool = False
    slice_attention: bool = True
    primary_view: str = "primary"
    fit: Callable[[Head, Iterable[torch.Tensor], np.ndarray, np.ndarray, int], dict] | None = None


def run_tensors(out: HeadOutput, z: torch.Tensor, m_key: int) -> dict[str, torch.Tensor]:
    """Every HeadOutput field as a tensor (the run files' format), the absent ones filled."""
    nan = torch.full_like(out.logits, float("nan"))
    return {
        "logits": out.logits,
        "logits_primary": out.logits if out.logits_primary is None else out.logits_primary,
        "logits_aps": nan if out.logits_aps is None else out.logits_aps,
        "prob": out.prob,
        "prob_primary": out.prob if out.prob_primary is None else out.prob_primary,
        "prob_aps": nan if out.prob_aps is None else out.prob_aps,
        "slice_attention": torch.full(z.shape[:2], 1.0 / z.shape[1], device=z.device)
        if out.slice_attention is None else out.slice_attention,
        "feature_attention": torch.full_like(z, 1.0 / z.shape[-1]) if out.feature_attention is None
        else out.feature_attention,
        "aps_idx": torch.full((z.shape[0], int(m_key)), -1, dtype=torch.long, device=z.device)
        if out.aps_idx is None else out.aps_idx,
    }
