"""Preprocessing against hand-computed values: CT windows, resizing, the paper's bilinear zoom-in
(eq. 8) for aps_source upsampled, native resizing, ImageNet normalisation, setting checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.features.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessError,
    apply_windows,
    check_settings,
    model_input,
    normalise,
    preprocess_slice,
    resize,
    transferred_resolutions,
    window_and_resize,
)

WINDOWS = [[40, 80], [80, 200], [600, 2800]]


def test_windows_by_hand():
    hu = np.array([[-1000.0, 0.0, 40.0, 80.0, 1000.0, 2000.0]], np.float32)
    out = apply_windows(hu, WINDOWS).numpy()
    assert out.shape == (3, 1, 6) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], [0, 0, 0.5, 1, 1, 1])                      # brain: [0, 80]
    np.testing.assert_allclose(out[1, 0], [0, 0.1, 0.3, 0.5, 1, 1])                  # subdural: [-20, 180]
    np.testing.assert_allclose(out[2, 0], np.array([0, 800, 840, 880, 1800, 2800]) / 2800, rtol=1e-6)  # bone


def test_resize_is_bilinear_and_antialiased_when_shrinking():
    image = torch.rand(3, 40, 40)
    down = resize(image, 20)
    expected = F.interpolate(image[None], size=(20, 20), mode="bilinear", align_corners=False, antialias=True)[0]
    torch.testing.assert_close(down, expected)
    # antialiasing: a 1-pixel checkerboard averages to ~0.5 everywhere
    checker = torch.from_numpy((np.indices((40, 40)).sum(0) % 2).astype(np.float32))[None].repeat(3, 1, 1)
    assert torch.allclose(resize(checker, 20), torch.full((3, 20, 20), 0.5), atol=0.05)
    up = resize(image, 80)
    torch.testing.assert_close(up, F.interpolate(image[None], size=(80, 80), mode="bilinear", align_corners=False)[0])
    assert resize(image, 40) is image or torch.equal(resize(image, 40), image)


def test_upsampled_aps_input_is_the_bilinear_zoom_of_the_small_image():
    rng = np.random.default_rng(0)
    hu = rng.uniform(-100, 200, size=(64, 64)).astype(np.float32)
    sent = window_and_resize(hu, [32, 48], WINDOWS, "upsampled")
    assert list(sent) == [32] and sent[32].dtype == torch.float16 and sent[32].shape == (3, 32, 32)
    small = sent[32].float()[None]
    big = model_input({32: sent[32][None]}, 48, [32, 48], "upsampled")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    zoomed = F.interpolate(small, size=(48, 48), mode="bilinear", align_corners=False)   # eq. 8
    torch.testing.assert_close(big, (zoomed - mean) / std)


def test_native_aps_input_comes_from_the_full_resolution_slice():
    rng = np.random.default_rng(1)
    hu = rng.uniform(-100, 200, size=(64, 64)).astype(np.float32)
    sent = window_and_resize(hu, [32, 48], WINDOWS, "native")
    assert sorted(sent) == [32, 48]
    direct = F.interpolate(apply_windows(hu, WINDOWS)[None], size=(48, 48), mode="bilinear",
                           align_corners=False, antialias=True)[0]
    torch.testing.assert_close(sent[48].float(), direct, atol=1e-3, rtol=0)       # float16 transfer
    upsampled = preprocess_slice(hu, [32, 48], WINDOWS, "upsampled")[48]
    native = preprocess_slice(hu, [32, 48], WINDOWS, "native")[48]
    assert (upsampled - native).abs().max() > 0.1                                # texture survives natively
    assert transferred_resolutions([224, 512], "upsampled") == [224]
    assert transferred_resolutions([224, 512], "native") == [224, 512]


def test_imagenet_normalisation():
    image = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    assert torch.allclose(normalise(image), torch.zeros(2, 3, 4, 4), atol=1e-6)
    ones = normalise(torch.ones(1, 3, 2, 2))
    for c in range(3):
        assert torch.allclose(ones[0, c], torch.tensor((1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]))


def test_preprocess_slice_shapes_and_odd_sizes():
    hu = np.zeros((50, 70), np.float32)                                          # not square
    out = preprocess_slice(hu, [32, 64], WINDOWS, "upsampled")
    assert out[32].shape == (3, 32, 32) and out[64].shape == (3, 64, 64)
    assert out[32].dtype == torch.float32


@pytest.mark.parametrize(
    ("resolutions", "windows", "aps", "message"),
    [
        ([64, 32], WINDOWS, "upsampled", "distinct and increasing"),
        ([], WINDOWS, "upsampled", "empty"),
        ([16, 32], WINDOWS, "upsampled", "at least 32"),
        ([32], WINDOWS[:2], "upsampled", "three"),
        ([32], [[40, 0], [80, 200], [600, 2800]], "upsampled", "width > 0"),
        ([32], WINDOWS, "zoom", "upsampled, native"),
    ],
)
def test_bad_settings_are_named(resolutions, windows, aps, message):
    with pytest.raises(PreprocessError, match=message):
        check_settings(resolutions, windows, aps)
    check_settings([224, 512], WINDOWS, "native")


def test_non_2d_input_is_refused():
    with pytest.raises(PreprocessError, match="2-D"):
        apply_windows(np.zeros((2, 3, 3)), WINDOWS)
