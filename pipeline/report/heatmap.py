"""The "suspicious area" of a key slice: VGG16 conv maps weighted by the model's feature attention.

DrCT2's feature attention (eq. 3) gives each of a slice's 512 descriptor channels a weight; the
descriptor is the global max of the last VGG16 conv block, channel by channel. Weighting the
last conv maps (512, h, w) by those same weights and summing over channels shows where the
channels the model relies on fire -- a CAM-style map with no gradients and no extra model.

Only the five slices shown large are run through the encoder (a few hundred ms on a CPU), so
reports never need the CNN over the whole scan.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.features.encoder import VGG16Encoder
from pipeline.features.preprocess import apply_windows, normalise, resize


def conv_maps(encoder: VGG16Encoder, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, r, r) normalised input -> (N, 512, r/16, r/16): the last conv block's ReLU maps,
    before VGG16's final 2x2 max pool. Their global max per channel is exactly the cached 512-d
    vector (max pooling twice = one global max), at twice the spatial detail (14 x 14 at 224)."""
    trunk = encoder.features
    if isinstance(trunk[-1], torch.nn.MaxPool2d):
        trunk = trunk[:-1]
    with torch.inference_mode():
        return trunk(images.float()).float()


def weighted_map(maps: torch.Tensor | np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(512, h, w) maps and (512,) weights -> (h, w) map in [0, 1]: ReLU(sum_c w_c * A_c), min-max
    normalised as in CAM (a flat map stays all zero)."""
    maps_t = torch.as_tensor(np.asarray(maps, dtype=np.float32))
    w = torch.as_tensor(np.asarray(weights, dtype=np.float32)).view(-1, 1, 1)
    if maps_t.shape[0] != w.shape[0]:
        raise ValueError(f"{maps_t.shape[0]} conv channels but {w.shape[0]} feature-attention weights")
    cam = torch.relu((maps_t * w).sum(0))
    low, span = float(cam.min()), float(cam.max() - cam.min())
    return ((cam - low) / span).numpy() if span > 0 else torch.zeros_like(cam).numpy()


def upsample(heat: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of an (h, w) map to size x size."""
    t = torch.as_tensor(np.asarray(heat, np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1).numpy()


def display_image(hu: np.ndarray, window: tuple[float, float], size: int) -> np.ndarray:
    """(H, W) HU -> (size, size) grey values in [0, 1] in one CT window (the brain window in reports)."""
    return resize(apply_windows(hu, [window]), int(size))[0].clamp(0, 1).numpy()


def encoder_input(hu_slices: list[np.ndarray], windows, resolution: int) -> torch.Tensor:
    """HU slices -> (N, 3, r, r) normalised encoder input at one resolution (as preprocessing does)."""
    images = torch.stack([resize(apply_windows(hu, windows), int(resolution)) for hu in hu_slices])
    return normalise(images)


def overlay(gray: np.ndarray, heat: np.ndarray, alpha: float = 0.45, floor: float = 0.3) -> np.ndarray:
    """Grey image and heat map in [0, 1] (same size) -> (H, W, 3) uint8 with a red-yellow overlay.

    Values of the heat map below ``floor`` are left transparent so that only the suspicious area
    is coloured and the anatomy stays readable.
    """
    gray = np.clip(np.asarray(gray, np.float32), 0, 1)
    heat = np.clip(np.asarray(heat, np.float32), 0, 1)
    if gray.shape != heat.shape:
        raise ValueError(f"image {gray.shape} and heat map {heat.shape} differ in size")
    base = np.repeat(gray[..., None], 3, axis=-1)
    colour = np.stack([np.ones_like(heat), heat, np.zeros_like(heat)], axis=-1)  # red -> yellow
    a = (alpha * np.clip((heat - floor) / max(1e-6, 1 - floor), 0, 1))[..., None]
    return np.round(255 * ((1 - a) * base + a * colour)).astype(np.uint8)


def heatmaps(
    encoder: VGG16Encoder,
    hu_slices: list[np.ndarray],
    feature_weights: np.ndarray,
    windows,
    resolution: int,
    display_size: int,
) -> np.ndarray:
    """Heat maps (N, display_size, display_size) in [0, 1] for N slices and their (N, 512) weights."""
    if not hu_slices:
        return np.zeros((0, display_size, display_size), np.float32)
    maps = conv_maps(encoder, encoder_input(hu_slices, windows, resolution))
    return np.stack([upsample(weighted_map(maps[i], feature_weights[i]), display_size) for i in range(len(hu_slices))])
