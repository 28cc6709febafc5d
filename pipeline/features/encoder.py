"""The frozen slice encoder: VGG16's 13 conv layers (+ ReLU and the 5 max pools), then
AdaptiveMaxPool2d(1) -> one 512-d vector per slice (the paper's P(.) in eqs. 1 and 9).

DrCT2 never trains the CNN, so stage one runs it once per slice and resolution and stores the
vectors. The architecture is data (torchvision's configuration "D"), built by torchvision's own
`make_layers`, so a torchvision VGG16 state dict loads unchanged.

Weights are named by a spec string (a table of sources, not code paths):

* ``imagenet``      torchvision ``VGG16_Weights.IMAGENET1K_V1`` (downloaded once where a network exists)
* ``PATH``          a local state dict (full VGG16 or `features` only), loaded with ``weights_only=True``
* ``random:SEED``   ``torch.manual_seed(SEED)`` then torchvision's VGG init (kaiming normal, zero bias):
                    deterministic weights for tests and the offline demo

The weights digest is the sha256 of the conv parameters (float32 bytes, in module order), so the
same weights give the same digest whatever their source.
"""

from __future__ import annotations

import hashlib
import os
import re
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from pipeline.weights_only import load_weights_only

FEATURE_DIM = 512
VGG16_CONFIG = cfgs["D"]  # [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
PRECISIONS = ("auto", "fp32", "bf16")


class EncoderError(RuntimeError):
    """Weights or device settings that cannot be used; the message says what to do instead."""


class VGG16Encoder(nn.Module):
    """VGG16 conv trunk -> global max pool -> (N, 512). Frozen and in eval mode from construction."""

    def __init__(self) -> None:
        super().__init__()
        self.features = make_layers(VGG16_CONFIG, batch_norm=False)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VGG16Encoder:
        # Frozen encoder: never leave eval mode (no dropout/BN here, but keep the contract explicit).
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


def init_like_torchvision(features: nn.Module) -> None:
    """torchvision VGG's conv init: kaiming normal (fan_out, relu), zero bias."""
    for module in features.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)


def features_state_dict(state: dict) -> dict[str, torch.Tensor]:
    """Keep the conv trunk of a VGG16 state dict; accepts full (`features.N.*`) or trunk-only (`N.*`) keys
    and an optional {"state_dict": ...} wrapper."""
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        match = re.fullmatch(r"(?:features\.)?(\d+\.(?:weight|bias))", key)
        if match and (key.startswith("features.") or not any(k.startswith("features.") for k in state)):
            out[match.group(1)] = value
    return out


def weights_digest(encoder: VGG16Encoder) -> str:
    digest = hashlib.sha256()
    for tensor in encoder.features.state_dict().values():
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _load_imagenet() -> dict:
    from torchvision.models import VGG16_Weights

    weights = VGG16_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:  # noqa: BLE001 - URLError, SSL, HTTP errors, socket timeouts: all mean "offline"
        raise EncoderError(
            f"could not download the ImageNet VGG16 weights ({weights.url}): {exc}. "
            "On an offline machine use a local weights file (--weights path/to/vgg16.pth, a torchvision "
            "VGG16 state dict) or random:SEED for a deterministic demo encoder."
        ) from None


def _load_file(path: Path) -> dict:
    if not path.is_file():
        raise EncoderError(
            f"weights file not found: {path} (use 'imagenet', a VGG16 state dict file, or random:SEED)"
        )
    state = load_weights_only(path, EncoderError, f"cannot read weights file {path} as a torch state dict", refused=(
        f"cannot read weights file {path}: refused, it holds Python objects besides tensors (never unpickled); "
        "give a plain VGG16 state dict"))
    if not isinstance(state, dict):
        raise EncoderError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    return state


def load_encoder(spec: str) -> tuple[VGG16Encoder, str]:
    """Build the frozen encoder for a weights spec; returns (encoder on CPU, weights digest)."""
    spec = str(spec)
    match = re.fullmatch(r"random:(-?\d+)", spec)
    with torch.random.fork_rng(devices=[]):  # building and seeding never disturb the caller's RNG
        if match:
            torch.manual_seed(int(match.group(1)))
        encoder = VGG16Encoder()
        if match:
            init_like_torchvision(encoder.features)
    if match:
        return encoder, weights_digest(encoder)
    if spec.startswith("random"):
        raise EncoderError(f"weights spec {spec!r}: write random:SEED with an integer seed, e.g. random:0")
    state = _load_imagenet() if spec == "imagenet" else _load_file(Path(os.path.expanduser(spec)))
    trunk = features_state_dict(state)
    expected = encoder.features.state_dict()
    missing = sorted(set(expected) - set(trunk), key=lambda k: int(k.split(".")[0]))
    if missing:
        raise EncoderError(
            f"weights {spec!r} are not a VGG16 state dict: conv parameters missing "
            f"({', '.join('features.' + k for k in missing[:4])}{' ...' if len(missing) > 4 else ''})"
        )
    bad = [k for k in expected if tuple(trunk[k].shape) != tuple(expected[k].shape)]
    if bad:
        raise EncoderError(
            f"weights {spec!r} do not fit VGG16: features.{bad[0]} has shape {tuple(trunk[bad[0]].shape)}, "
            f"expected {tuple(expected[bad[0]].shape)}"
        )
    encoder.features.load_state_dict({k: trunk[k].float() for k in expected})
    return encoder, weights_digest(encoder)


def resolve_device(device: str) -> torch.device:
    """auto -> cuda when present, else cpu; a requested cuda that is absent is an error."""
    device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EncoderError(f"device {device!r} requested but CUDA is not available here; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise EncoderError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: oneDNN runs bf16 convolutions several times faster than fp32 there."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 on CUDA (with bf16 support) and on CPUs with AMX/AVX512-BF16, else fp32."""
    if precision not in PRECISIONS:
        raise EncoderError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") and cpu_has_fast_bf16() else "fp32"
    return "fp32"


class EncoderRunner:
    """The encoder placed on a device with its precision: bf16 autocast + channels_last where fast.

    Returns float32 vectors on the CPU; the cache stores them as float16.
    """

    def __init__(self, encoder: VGG16Encoder, device: torch.device, precision: str):
        self.device = device
        self.precision = resolve_precision(precision, device)
        self.channels_last = self.precision == "bf16"
        if device.type == "cpu":
            torch.set_flush_denormal(True)
        self.encoder = encoder.to(device)
        if self.channels_last:
            self.encoder = self.encoder.to(memory_format=torch.channels_last)

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def warm_up(self, batch_size: int, sent: list[int], resolutions: list[int], aps_source: str) -> None:
        """One full batch per resolution before timing starts: oneDNN/cuDNN pick their kernels per shape."""
        from pipeline.features.preprocess import model_input

        images = {r: torch.zeros(batch_size, 3, r, r, dtype=torch.float16, device=self.device) for r in sent}
        for r in resolutions:
            self(model_input(images, r, resolutions, aps_source))

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, r, r) normalised float32 -> (N, 512) float32 on CPU."""
        x = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            out = self.encoder(x)
        return out.float().cpu()
