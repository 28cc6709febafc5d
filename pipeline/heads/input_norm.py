"""Per-channel normalisation of the cached VGG16 vectors before the heads (``model.input_norm``).

Why: max-pooled VGG16 values are non-negative and spread over several units, and their level
depends on anatomy and scanner as much as on disease. Measured on planted caches (BENCHMARKS.md,
issue 8), raw vectors leave DrCT2 at chance: eq. 3 keeps about 8 of 512 channels and a channel's
absolute level says nothing about a lesion.

* ``scan`` (default): each channel minus the scan's own low quantile (``model.scan_centre_quantile``,
  default 0.2) over its sampled slices, over the training sd of those centred values. A lesion is a
  rise relative to the rest of the same head; a per-scan gain cancels. A low quantile rather than the
  median: lesions raise values, so the median of a scan whose lesion covers most slices is lesion
  itself (the ``majority`` member of the planted family) while its 20 % quantile is still background;
  measured on ``weak`` (BENCHMARKS.md, issue 15) the 20 % quantile also keeps more of the signal.
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
    `quantile` over its m slices (0.5 = the median), so a channel reads "higher than elsewhere in
    this head" rather than "high": anatomy and scanner level (a per-scan gain) cancel, a lesion
    does not as long as it covers less than 1 - `quantile` of the slices.
    """

    def __init__(self, feature_dim: int = 512, centre: str = "dataset", quantile: float = 0.2):
        super().__init__()
        if centre not in ("dataset", "scan"):
            raise ValueError(f"unknown centre '{centre}'")
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"model.scan_centre_quantile must be in [0, 1], got {quantile}")
        self.centre = centre
        self.quantile = float(quantile)
        self.register_buffer("mean", torch.zeros(feature_dim))
        self.register_buffer("sd", torch.ones(feature_dim))

    @property
    def centre_quantile(self) -> float | None:
        """The quantile each scan is centred on (None: centred on the training mean), which the
        training sd is then computed after (`CachedFeatures.channel_statistics`)."""
        return self.quantile if self.centre == "scan" else None

    @torch.no_grad()
    def set_statistics(self, mean: torch.Tensor, sd: torch.Tensor, min_sd: float = 1e-3) -> None:
        """Per-channel training statistics (D,); near-constant channels keep sd >= `min_sd`."""
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.sd.copy_(torch.as_tensor(sd, dtype=torch.float32).clamp_min(min_sd))

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """`context` (B, m', D): the slices whose quantile is the scan's centre (default: z itself;
        the APS passes all m sampled slices, since the m_key chosen ones are mostly lesion)."""
        if self.centre == "scan":
            centre = scan_centre(z if context is None else context, self.quantile)
        else:
            centre = self.mean
        return (z - centre) / self.sd


def scan_centre(z: torch.Tensor, quantile: float) -> torch.Tensor:
    """(B, m, D) -> (B, 1, D): each scan's per-channel `quantile` over its slices (linear
    interpolation, as numpy's default)."""
    return torch.quantile(z.float(), quantile, dim=1, keepdim=True)
