"""Per-channel normalisation of the cached VGG16 vectors before the heads (``model.input_norm``).

Why: max-pooled VGG16 values are non-negative and spread over several units, and their level
depends on anatomy and scanner as much as on disease. Measured on planted caches (BENCHMARKS.md,
issue 8), raw vectors leave DrCT2 at chance: eq. 3 keeps about 8 of 512 channels and a channel's
absolute level says nothing about a lesion.

* ``scan`` (default): each channel minus the scan's own median over its sampled slices, over the
  training sd. A lesion is a rise relative to the rest of the same head; a per-scan gain cancels.
* ``standardize``: minus the training mean, over the training sd (fixed statistics, like
  ImageNet's pixel mean and sd for the encoder's input).
* ``none``: the raw vectors.

The statistics are buffers: they travel in the checkpoint and are set once per fold from that
fold's training scans (never the validation scans).
"""

from __future__ import annotations

import torch
from torch import nn

NORMS = ("standardize", "scan", "none")


class FeatureStandardizer(nn.Module):
    """(B, m, D) -> (z - centre) / sd per channel; sd from `set_statistics` (1 until then).

    ``centre="dataset"``: the training mean. ``centre="scan"``: each scan's own per-channel
    median over its m slices, so a channel reads "higher than elsewhere in this head" rather than
    "high": anatomy and scanner level (a per-scan gain) cancel, a lesion on a minority of slices
    does not (the median ignores it).
    """

    def __init__(self, feature_dim: int = 512, centre: str = "dataset"):
        super().__init__()
        if centre not in ("dataset", "scan"):
            raise ValueError(f"unknown centre '{centre}'")
        self.centre = centre
        self.register_buffer("mean", torch.zeros(feature_dim))
        self.register_buffer("sd", torch.ones(feature_dim))

    @torch.no_grad()
    def set_statistics(self, mean: torch.Tensor, sd: torch.Tensor, min_sd: float = 1e-3) -> None:
        """Per-channel training statistics (D,); near-constant channels keep sd >= `min_sd`."""
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.sd.copy_(torch.as_tensor(sd, dtype=torch.float32).clamp_min(min_sd))

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """`context` (B, m', D): the slices whose median is the scan's centre (default: z itself;
        the APS passes all m sampled slices, since the m_key chosen ones are mostly lesion)."""
        if self.centre == "scan":
            centre = (z if context is None else context).median(dim=1, keepdim=True).values
        else:
            centre = self.mean
        return (z - centre) / self.sd
