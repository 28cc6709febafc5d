"""The frozen VGG16 encoder: architecture, weight sources and their digest, clear errors,
precision handling. Small inputs (32 px) keep it fast."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from torch import nn

import pipeline.features.encoder as enc
from pipeline.features.encoder import (
    EncoderError,
    EncoderRunner,
    VGG16Encoder,
    load_encoder,
    resolve_device,
    resolve_precision,
)


@pytest.fixture(scope="module")
def random0():
    return load_encoder("random:0")


def test_architecture_is_vgg16_conv_trunk_with_global_max_pool(random0):
    encoder, _ = random0
    convs = [m for m in encoder.features if isinstance(m, nn.Conv2d)]
    pools = [m for m in encoder.features if isinstance(m, nn.MaxPool2d)]
    assert len(convs) == 13 and len(pools) == 5
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training                                      # frozen: stays in eval mode
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = encoder(x)
        expected = encoder.features(x).amax(dim=(2, 3))               # AdaptiveMaxPool2d(1) by hand
    assert out.shape == (2, 512)
    torch.testing.assert_close(out, expected)
    assert (out >= 0).all()                                           # ReLU then max


def test_random_weights_are_deterministic_and_leave_the_global_rng_alone(random0):
    _, digest = random0
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    again, digest_again = load_encoder("random:0")
    assert digest_again == digest and len(digest) == 64
    assert torch.rand(1) == before
    assert load_encoder("random:1")[1] != digest
    conv = again.features[0]
    assert torch.count_nonzero(conv.bias) == 0                        # torchvision init: zero bias
    std = conv.weight.std().item()
    assert abs(std - (2 / (64 * 9)) ** 0.5) < 0.02                    # kaiming normal, fan_out, relu


def test_state_dict_files_full_or_trunk_give_the_same_digest(random0, tmp_path):
    encoder, digest = random0
    trunk = encoder.features.state_dict()
    full = {f"features.{k}": v for k, v in trunk.items()}
    full["classifier.0.weight"] = torch.zeros(4, 4)                   # ignored: only the conv trunk is used
    torch.save(full, tmp_path / "full.pth")
    torch.save(trunk, tmp_path / "trunk.pth")
    torch.save({"state_dict": full}, tmp_path / "wrapped.pth")
    for name in ("full.pth", "trunk.pth", "wrapped.pth"):
        loaded, loaded_digest = load_encoder(str(tmp_path / name))
        assert loaded_digest == digest
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), encoder(x))


def test_bad_weights_give_clear_errors(tmp_path):
    with pytest.raises(EncoderError, match="weights file not found"):
        load_encoder(str(tmp_path / "none.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(EncoderError, match="cannot read weights file"):
        load_encoder(str(tmp_path / "junk.pth"))
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "resnet.pth")
    with pytest.raises(EncoderError, match="not a VGG16 state dict: conv parameters missing"):
        load_encoder(str(tmp_path / "resnet.pth"))
    torch.save({f"{k}": torch.zeros(1) for k in VGG16Encoder().features.state_dict()}, tmp_path / "shape.pth")
    with pytest.raises(EncoderError, match="do not fit VGG16"):
        load_encoder(str(tmp_path / "shape.pth"))
    torch.save({"model": nn.Linear(2, 2)}, tmp_path / "pickled.pth")   # arbitrary objects: weights_only refuses
    with pytest.raises(EncoderError, match="cannot read weights file"):
        load_encoder(str(tmp_path / "pickled.pth"))
    with pytest.raises(EncoderError, match="random:SEED"):
        load_encoder("random:abc")


def test_imagenet_offline_says_what_to_do(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    import torchvision.models._api as api

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(EncoderError, match="could not download.*local weights file.*random:SEED"):
        load_encoder("imagenet")


def test_precision_and_device():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", cpu) == ("bf16" if enc.cpu_has_fast_bf16() else "fp32")
    with pytest.raises(EncoderError, match="precision"):
        resolve_precision("fp8", cpu)
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu
        with pytest.raises(EncoderError, match="CUDA is not available"):
            resolve_device("cuda")


def test_runner_fp32_is_exact_and_bf16_close(random0):
    encoder, _ = random0
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        direct = encoder(x)
    fp32 = EncoderRunner(encoder, torch.device("cpu"), "fp32")
    torch.testing.assert_close(fp32(x), direct)
    bf16 = EncoderRunner(encoder, torch.device("cpu"), "bf16")
    assert bf16.channels_last
    out = bf16(x)
    assert out.dtype == torch.float32
    assert ((out - direct).abs().max() / direct.abs().max()).item() < 0.05
    EncoderRunner(encoder, torch.device("cpu"), "fp32")                 # back to contiguous for other tests
