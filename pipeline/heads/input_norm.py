"""Per-channel standardisation of the cached VGG16 vectors before the primary network.

Why: eq. 3's softmax runs over the 512 raw values of a slice vector. Max-pooled VGG16 values
are non-negative and spread over several units, so exp(z) is dominated by the 1-3 largest
channels of every slice: the attention keeps a handful of channels that say "bright anatomy"
and x = z * w hides everything else from the BiGRU (measured on a planted cache: about 8
effective channels of 512, and a model at chance). Standardising each channel with the
training scans' mean and sd (fixed statistics, no parameters: a property of the frozen encoder's
output, like ImageNet's pixel mean and sd are of its input) makes the softmax compare how
unusual each channel is for this slice, not how large the channel is in general.

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
