"""Slice preprocessing for the frozen VGG16: HU -> three CT windows -> resize -> ImageNet normalisation.

The work is split in two halves so that stage one can ship small arrays between processes:

* `window_and_resize` runs in the decoding workers (CPU): HU -> one channel per window,
  ``clip((hu - (c - w/2)) / w, 0, 1)`` -> resized to the first (smallest) resolution, and, for
  ``aps_source: native`` only, to every larger resolution straight from the full-resolution image.
  The images travel as float16 in [0, 1] (11-bit mantissa: better than 0.03 HU on the brain window),
  which is part of the preprocessing contract (PREPROCESS_VERSION 1), so any path that feeds the
  encoder -- the cache, a direct forward in a test, inline inference -- sees the same pixels.
* `model_input` runs where the encoder runs (GPU or main process): for ``aps_source: upsampled``
  the larger resolutions are the bilinear upsampling of the smallest image (the paper's zoom-in,
  eq. 8: K_i = BilinearInterpolation(k_i), 224 -> 512), then ImageNet mean/std normalisation.
  Upsampling on the device means the workers send only the 224 image.

Every resize is `torch.nn.functional.interpolate` (bilinear, align_corners=False, antialias when
downscaling), so workers, tests and inline inference share one implementation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
APS_SOURCES = ("upsampled", "native")
TRANSFER_DTYPE = torch.float16


class PreprocessError(ValueError):
    """A preprocessing setting that cannot be used (message says which)."""


def check_settings(resolutions: Sequence[int], windows: Sequence[Sequence[float]], aps_source: str) -> None:
    """Validate the extract settings once, before any worker starts."""
    if not resolutions:
        raise PreprocessError("extract.resolutions is empty: give at least one resolution, e.g. 224,512")
    if any(int(r) < 32 for r in resolutions):
        raise PreprocessError(f"extract.resolutions {list(resolutions)}: VGG16 needs at least 32 px")
    if list(resolutions) != sorted({int(r) for r in resolutions}):
        raise PreprocessError(
            f"extract.resolutions {list(resolutions)} must be distinct and increasing "
            "(the first is the primary network input, the last the APS input)"
        )
    if len(windows) != 3 or any(len(w) != 2 or float(w[1]) <= 0 for w in windows):
        raise PreprocessError(
            f"extract.windows {windows!r}: need three [center, width] pairs with width > 0 (one per channel)"
        )
    if aps_source not in APS_SOURCES:
        raise PreprocessError(f"extract.aps_source {aps_source!r}: choose one of {', '.join(APS_SOURCES)}")


def apply_windows(hu: np.ndarray | torch.Tensor, windows: Sequence[Sequence[float]]) -> torch.Tensor:
    """(H, W) HU -> (3, H, W) float32 in [0, 1]: channel k = clip((hu - (c_k - w_k / 2)) / w_k, 0, 1)."""
    hu_t = torch.as_tensor(np.asarray(hu, dtype=np.float32)) if not isinstance(hu, torch.Tensor) else hu.float()
    if hu_t.ndim != 2:
        raise PreprocessError(f"expected a 2-D slice of HU values, got shape {tuple(hu_t.shape)}")
    centers = torch.tensor([float(c) for c, _ in windows], dtype=torch.float32).view(-1, 1, 1)
    widths = torch.tensor([float(w) for _, w in windows], dtype=torch.float32).view(-1, 1, 1)
    return ((hu_t.unsqueeze(0) - (centers - widths / 2)) / widths).clamp_(0.0, 1.0)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (C, H, W) or (N, C, H, W) to size x size; antialiased when shrinking."""
    batched = images.ndim == 4
    x = images if batched else images.unsqueeze(0)
    if tuple(x.shape[-2:]) == (size, size):
        out = x
    else:
        shrinking = x.shape[-2] > size or x.shape[-1] > size
        out = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)
    return out if batched else out.squeeze(0)


def window_and_resize(
    hu: np.ndarray,
    resolutions: Sequence[int],
    windows: Sequence[Sequence[float]],
    aps_source: str,
) -> dict[int, torch.Tensor]:
    """The worker half: windowed images at the resolutions the workers must send, float16 in [0, 1].

    Always the first resolution; the larger ones only for ``aps_source: native`` (for
    ``upsampled`` they are derived from the first by `model_input`).
    """
    windowed = apply_windows(hu, windows)
    first = int(resolutions[0])
    out = {first: resize(windowed, first).to(TRANSFER_DTYPE)}
    if aps_source == "native":
        for resolution in resolutions[1:]:
            out[int(resolution)] = resize(windowed, int(resolution)).to(TRANSFER_DTYPE)
    return out


def transferred_resolutions(resolutions: Sequence[int], aps_source: str) -> list[int]:
    """Resolutions whose images come from the workers (the rest are upsampled from the first)."""
    return [int(r) for r in resolutions] if aps_source == "native" else [int(resolutions[0])]


def normalise(images: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation of (N, 3, H, W) images in [0, 1] (what VGG16 was trained on)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float() - mean) / std


def model_input(
    images: dict[int, torch.Tensor],
    resolution: int,
    resolutions: Sequence[int],
    aps_source: str,
) -> torch.Tensor:
    """The encoder half: (N, 3, r, r) normalised float32 input at `resolution`.

    `images` maps each transferred resolution to (N, 3, r, r) windowed images (float16, [0, 1]).
    For ``upsampled``, a larger resolution is the bilinear upsampling of the first (eq. 8).
    """
    resolution = int(resolution)
    if resolution in images:
        base = images[resolution].float()
    elif aps_source == "upsampled":
        base = resize(images[int(resolutions[0])].float(), resolution)
    else:
        raise PreprocessError(f"no {resolution} px images for aps_source {aps_source!r}")
    return normalise(base)


def preprocess_slice(
    hu: np.ndarray,
    resolutions: Sequence[int],
    windows: Sequence[Sequence[float]],
    aps_source: str,
) -> dict[int, torch.Tensor]:
    """Both halves for one slice: {resolution: (3, r, r) normalised float32}, the exact encoder input."""
    sent = {r: t.unsqueeze(0) for r, t in window_and_resize(hu, resolutions, windows, aps_source).items()}
    return {int(r): model_input(sent, r, resolutions, aps_source)[0] for r in resolutions}
