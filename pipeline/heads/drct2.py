"""DrCT2 = primary network (DrCT1) + APS + knowledge fusion (paper V, Fig. 4).

One forward pass::

    z (B, m, 512) at the primary resolution  -> PrimaryNetwork -> slice_attention (B, m)
    aps_idx (B, m_key) = positions of the m_key highest-attention slices, sorted (z order)
                         (or a random subset: the Fig. 6 ablation)
    F (B, m_key, 512)  = the APS-resolution vectors of those slices, from `aps_source`
                         (a gather in the in-memory cache; the paper reruns VGG16 at 512 here)
    F -> APSNetwork -> KnowledgeFusion(primary matrix, APS matrix) -> fusion logits

The selection is a hard top-k: no gradient flows through the choice of slices (as in the
paper, where the APS input is a new CNN pass on the chosen images).

With ``aps=None`` the same class is DrCT1: `prob` is the primary's and the APS outputs are NaN
(-1 for aps_idx), so every consumer reads one output format.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.heads.aps import APSNetwork
from pipeline.heads.fusion import KnowledgeFusion
from pipeline.heads.primary import PrimaryNetwork

ApsSource = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
SELECTIONS = ("attention", "random")


def select_slices(
    slice_attention: torch.Tensor,
    m_key: int,
    mode: str = "attention",
    generator: torch.Generator | None = None,
    repeated: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, m) attention -> (B, m_key) int64 positions in increasing (z) order.

    "attention": the m_key largest weights (paper V.B); "random": a uniform random subset
    (paper Fig. 6), drawn from `generator` when given so that evaluation can be repeatable.
    `repeated` (B, m) bool marks positions that show the same slice as an earlier position (a
    scan shorter than m repeats slices): they rank after every other position, so one slice is
    never zoomed in on twice while the scan has m_key distinct slices to choose from.
    """
    if mode == "attention":
        score = slice_attention.detach()
    elif mode == "random":
        score = torch.rand(slice_attention.shape, generator=generator, device="cpu").to(slice_attention.device)
    else:
        raise ValueError(f"unknown APS selection '{mode}'; choose from {SELECTIONS}")
    if repeated is not None:
        span = (score.max() - score.min()).clamp_min(1.0) + 1.0
        score = score - span * repeated.to(score.dtype)
    chosen = torch.topk(score, m_key, dim=1).indices
    return torch.sort(chosen, dim=1).values


def repeated_positions(z: torch.Tensor) -> torch.Tensor:
    """(B, m, D) sampled vectors -> (B, m) bool: position i shows the same vector as i - 1.
    Sampled positions are in z order, so a repeated slice of a short scan is always adjacent to
    its first occurrence; equal vectors are the same cache row (or identical images)."""
    repeated = torch.zeros(z.shape[:2], dtype=torch.bool, device=z.device)
    repeated[:, 1:] = (z[:, 1:] == z[:, :-1]).all(dim=-1)
    return repeated


def gather_aps(aps_source: ApsSource, aps_idx: torch.Tensor) -> torch.Tensor:
    """APS input (B, m_key, D): rows `aps_idx` of a (B, m, D) tensor, or what a getter returns."""
    if callable(aps_source) and not isinstance(aps_source, torch.Tensor):
        return aps_source(aps_idx)
    index = aps_idx.unsqueeze(-1).expand(-1, -1, aps_source.shape[-1])
    return torch.gather(aps_source, 1, index)


class DrCT(nn.Module):
    """DrCT2 (with `aps` and `fusion`) or DrCT1 (without).

    forward(z (B, m, D), aps_source) -> dict of tensors:
      logits/prob (B, C) final (fusion for DrCT2, primary for DrCT1); logits_primary,
      prob_primary, logits_aps, prob_aps (B, C); slice_attention (B, m);
      feature_attention (B, m, D); aps_idx (B, m_key) (-1 for DrCT1).
    `aps_source` is a (B, m, D_aps) tensor of the APS-resolution vectors of the m sampled slices,
    or a callable mapping aps_idx (B, m_key) to (B, m_key, D_aps) (the cache gather).
    """

    def __init__(
        self,
        primary: PrimaryNetwork,
        aps: APSNetwork | None = None,
        fusion: KnowledgeFusion | None = None,
        selection: str = "attention",
        m_key: int = 0,
    ):
        super().__init__()
        if (aps is None) != (fusion is None):
            raise ValueError("DrCT2 needs both an APS network and a fusion network (DrCT1 neither)")
        if selection not in SELECTIONS:
            raise ValueError(f"unknown APS selection '{selection}'; choose from {SELECTIONS}")
        self.primary = primary
        self.aps = aps
        self.fusion = fusion
        self.selection = selection
        # width of aps_idx in the output; DrCT1 fills it with -1 so run files have one shape
        self.m_key = aps.m_key if aps is not None else int(m_key)
        self.generator: torch.Generator | None = None  # for repeatable random selection

    @property
    def variant(self) -> str:
        return "drct1" if self.aps is None else "drct2"

    def forward(self, z: torch.Tensor, aps_source: ApsSource | None = None) -> dict[str, torch.Tensor]:
        p = self.primary(z)
        out = {
            "logits_primary": p["logits"],
            "prob_primary": p["prob"],
            "slice_attention": p["slice_attention"],
            "feature_attention": p["feature_attention"],
        }
        if self.aps is None:
            nan = torch.full_like(p["logits"], float("nan"))
            out.update(logits=p["logits"], prob=p["prob"], logits_aps=nan, prob_aps=nan)
            out["aps_idx"] = torch.full((z.shape[0], self.m_key), -1, dtype=torch.long, device=z.device)
            return out
        if aps_source is None:
            raise ValueError("DrCT2 needs the APS-resolution features (aps_source)")
        aps_idx = select_slices(p["slice_attention"], self.aps.m_key, self.selection, self.generator,
                                repeated_positions(z))
        context = None
        if self.aps.standardize is not None and self.aps.standardize.centre == "scan":
            every = torch.arange(z.shape[1], device=z.device).expand(z.shape[0], -1)
            context = gather_aps(aps_source, every)
        a = self.aps(gather_aps(aps_source, aps_idx), context)
        logits = self.fusion(p, a, aps_idx)
        out.update(
            logits=logits,
            prob=torch.sigmoid(logits),
            logits_aps=a["logits"],
            prob_aps=a["prob"],
            aps_idx=aps_idx,
        )
        return out

    def standardizers(self) -> list:
        """(norm, resolution) pairs whose statistics the trainer sets from the training fold."""
        pairs = [(self.primary.standardize, "primary")]
        if self.aps is not None:
            pairs.append((self.aps.standardize, "aps"))
        return [(norm, res) for norm, res in pairs if norm is not None]

    def parameter_groups(self, lr_primary: float, lr_aps: float, lr_fusion: float) -> list[dict]:
        """Adam parameter groups with the paper's per-module learning rates (VI.A.1)."""
        groups = [{"params": list(self.primary.parameters()), "lr": lr_primary, "name": "primary"}]
        if self.aps is not None:
            groups.append({"params": list(self.aps.parameters()), "lr": lr_aps, "name": "aps"})
            groups.append({"params": list(self.fusion.parameters()), "lr": lr_fusion, "name": "fusion"})
        return groups
