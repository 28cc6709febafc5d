"""Checkpoints: plain dicts of tensors and JSON-like values, loadable with weights_only=True.

A checkpoint is ``{"state_dict", "config", "provenance", "label_names", "fold", "format"}``;
the config is the merged config the model was trained with, so `load_model` rebuilds the same
architecture, and the provenance is the feature cache's (stage two never applies a head to
vectors of another encoder: see cache.provenance).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from pipeline.heads.build import build_model
from pipeline.heads.head import Head
from pipeline.training.atomic import atomic_write_bytes
from pipeline.weights_only import load_weights_only

CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message says why."""


def _plain(value):
    """Round-trip through JSON so only plain types reach the file (weights_only=True safe)."""
    return json.loads(json.dumps(value))


def save_checkpoint(path: str | Path, model: Head, config: dict, provenance: dict, label_names, fold: int | None) -> Path:
    """Serialised in memory, then written atomically (`atomic.atomic_write_bytes`): a full disk is
    one `cache.store.DiskSpaceError` naming the folder and the size, never a torch stream error,
    and no ``checkpoint.pt.tmp`` is left."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": state,
        "config": _plain(config),
        "provenance": _plain(provenance),
        "label_names": [str(n) for n in label_names],
        "fold": None if fold is None else int(fold),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write_bytes(path, buffer.getbuffer())


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    payload = load_weights_only(path, CheckpointError, f"{path} is not a readable DrCT checkpoint", refused=(
        f"{path} is not a readable DrCT checkpoint: refused, it holds Python objects besides tensors and plain "
        "values (not written by `drct train`, or tampered); it is never unpickled"))
    if not isinstance(payload, dict) or "state_dict" not in payload or "config" not in payload:
        raise CheckpointError(f"{path} is not a DrCT checkpoint (no state_dict/config)")
    return payload


def load_model(checkpoint_path: str | Path, device: str | torch.device = "cpu") -> tuple[Head, dict, dict]:
    """(model in eval mode, its config, meta = provenance, label_names, fold, path)."""
    payload = load_checkpoint(checkpoint_path)
    config = payload["config"]
    label_names = list(payload["label_names"])
    model = build_model(config, len(label_names))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint_path}: weights do not fit the configured model: {exc}") from None
    model.to(device).eval()
    meta = {
        "provenance": payload.get("provenance", {}),
        "label_names": label_names,
        "fold": payload.get("fold"),
        "path": str(checkpoint_path),
    }
    return model, config, meta
