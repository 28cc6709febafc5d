"""The feature cache held in memory for stage two: no disk read and no CNN during training.

Both resolutions are loaded once as float16 torch tensors (RSNA: ~750,000 slices x 512 x 2
bytes = ~0.77 GB per resolution). A batch is pure index arithmetic:

    positions (B, m)  from the sampler (indices within each scan, z order)
    rows      (B, m)  = offset[scan] + positions   (global rows of the cache arrays)
    primary   (B, m, 512) = features[primary_res][rows]
    APS input (B, m_key, 512) = features[aps_res][rows.gather(1, aps_idx)]  (the "zoom in")
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cache.store import FeatureCache


@dataclass
class Batch:
    scans: np.ndarray        # (B,) scan numbers in the cache
    positions: np.ndarray    # (B, m) slice indices within each scan (z order)
    rows: torch.Tensor       # (B, m) global rows of the feature arrays
    primary: torch.Tensor    # (B, m, D) float32
    labels: torch.Tensor     # (B, C) float32


class CachedFeatures:
    """All slice vectors at the primary and APS resolutions, plus the scan table."""

    def __init__(
        self,
        primary: torch.Tensor,
        aps: torch.Tensor,
        offset: np.ndarray,
        n_slices: np.ndarray,
        labels: np.ndarray,
        scan_id: np.ndarray,
        patient_id: np.ndarray,
        device: torch.device | str = "cpu",
    ):
        self.device = torch.device(device)
        self.primary_features = primary.to(self.device)
        self.aps_features = self.primary_features if aps is primary else aps.to(self.device)
        self.offset = np.asarray(offset, np.int64)
        self.n_slices = np.asarray(n_slices, np.int64)
        self.labels = np.asarray(labels, np.float32)
        self.labels_t = torch.from_numpy(np.nan_to_num(self.labels)).to(self.device)
        self.scan_id = np.asarray(scan_id, dtype=object)
        self.patient_id = np.asarray(patient_id, dtype=object)

    @classmethod
    def from_cache(
        cls, cache: FeatureCache, primary_resolution: int, aps_resolution: int, device: torch.device | str = "cpu"
    ) -> CachedFeatures:
        table = cache.table
        primary = torch.from_numpy(cache.load_all(primary_resolution))
        aps = primary if aps_resolution == primary_resolution else torch.from_numpy(cache.load_all(aps_resolution))
        return cls(primary, aps, table.offset, table.n_slices, table.labels, table.scan_id, table.patient_id, device)

    def __len__(self) -> int:
        return len(self.offset)

    @property
    def labelled(self) -> np.ndarray:
        """Scan numbers whose every label is known (folder-layout scans have NaN labels)."""
        return np.flatnonzero(~np.isnan(self.labels).any(axis=1)) if self.labels.size else np.arange(0)

    def channel_statistics(
        self, scans: np.ndarray, resolution: str = "primary", block: int = 65536, centre_quantile: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and sd (D,) of every slice of `scans` at the primary or APS resolution,
        summed in float64 blocks (an RSNA-size cache never becomes one float32 copy).

        With `centre_quantile` the sd is that of each slice minus its scan's per-channel quantile
        (the values the ``scan`` input norm produces), so a per-scan level does not inflate it."""
        features = self.primary_features if resolution == "primary" else self.aps_features
        scans = np.asarray(scans, np.int64)
        dim = features.shape[1]
        total = torch.zeros(dim, dtype=torch.float64, device=self.device)
        squares = torch.zeros(dim, dtype=torch.float64, device=self.device)
        count = 0
        for values in self._scan_blocks(features, scans, block, centre_quantile):
            total += values.sum(dim=0)
            squares += (values * values).sum(dim=0)
            count += values.shape[0]
        n = max(count, 1)
        mean = total / n
        sd = (squares / n - mean * mean).clamp_min(0).sqrt()
        return mean.float().cpu(), sd.float().cpu()

    def _scan_blocks(self, features: torch.Tensor, scans: np.ndarray, block: int, centre_quantile: float | None):
        """Float64 row blocks of `scans`' slices; each scan minus its own quantile if one is given."""
        if centre_quantile is None:
            rows = np.concatenate([np.arange(o, o + n) for o, n in zip(self.offset[scans], self.n_slices[scans])]) \
                if len(scans) else np.zeros(0, np.int64)
            for start in range(0, len(rows), block):
                yield features[torch.from_numpy(rows[start : start + block]).to(self.device)].double()
            return
        for scan in scans:
            values = features[int(self.offset[scan]) : int(self.offset[scan] + self.n_slices[scan])].double()
            yield values - torch.quantile(values, centre_quantile, dim=0, keepdim=True)

    def batch(self, scans: np.ndarray, positions: np.ndarray) -> Batch:
        scans = np.asarray(scans, np.int64)
        rows_np = self.offset[scans][:, None] + positions
        rows = torch.from_numpy(rows_np).to(self.device)
        primary = self.primary_features[rows].float()
        labels = self.labels_t[torch.from_numpy(scans).to(self.device)]
        return Batch(scans, positions, rows, primary, labels)

    def aps_getter(self, rows: torch.Tensor):
        """Callable aps_idx (B, m_key) -> (B, m_key, D) APS-resolution vectors of those slices."""

        def gather(aps_idx: torch.Tensor) -> torch.Tensor:
            return self.aps_features[torch.gather(rows, 1, aps_idx)].float()

        return gather
