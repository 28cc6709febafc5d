"""The one safe `torch.load`: ``weights_only=True``, on the CPU, every failure as one message.

Stage one (encoder weights: pipeline/features/encoder.py; `drct adapt`'s resume file:
pipeline/features/adapt.py) and stage two (fold checkpoints: pipeline/training/checkpoint.py)
both load torch files through `load_weights_only`, which imports neither stage. A file that holds
Python objects besides tensors and plain values is refused and never unpickled: torch's own
message for it is a page of advice to pass ``weights_only=False``, exactly what must not happen.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch


def load_weights_only(path: str | Path, error: type[Exception], unreadable: str, refused: str):
    """``torch.load(path, map_location="cpu", weights_only=True)``. A failure raises `error` with
    one message: `refused` for a file that holds pickled Python objects; else `unreadable`
    followed by why, in brackets: "(not a torch file)" or the first line of torch's message."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise error(refused if "Weights only load failed" in str(exc) else f"{unreadable} (not a torch file)") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise error(f"{unreadable} ({reason})") from None
