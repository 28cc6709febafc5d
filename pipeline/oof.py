"""Reading a run's oof.npz (out-of-fold predictions) defensively.

evaluate, interpret and report all read this file, and a run directory is something people copy
around and edit: a tampered file (object arrays, which would need pickle; missing or misshapen
arrays; a truncated zip) must give one clear message, never a raw ValueError or a pickle load.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

NUMERIC = ("fold", "labels", "prob", "prob_primary", "prob_aps", "sample_idx", "slice_attention", "cache_index",
           "aps_idx", "feature_attention")
TEXT = ("scan_id", "patient_id")
REQUIRED = ("scan_id", "fold", "labels", "prob")


class OofError(ValueError):
    """An oof.npz that cannot be used; the message names the file and the problem."""


def read_oof(path: str | Path, required: tuple[str, ...] = REQUIRED) -> dict[str, np.ndarray]:
    """Every array of an oof.npz, checked: no pickled objects, `required` present, numeric arrays
    numeric, text arrays text, one row per scan everywhere, probabilities finite in [0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise OofError(f"{path} not found: is {path.parent} a `drct train` run directory?")
    hint = "re-run `drct train` to write it again"
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for name in npz.files:
                arrays[name] = npz[name]
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise OofError(f"{path} holds object (pickled) arrays, which are refused: tampered or not ours; {hint}") from None
        raise OofError(f"{path} is not a readable oof.npz ({exc}); {hint}") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise OofError(f"{path} is not a readable oof.npz ({type(exc).__name__}: {exc}); {hint}") from None
    missing = [name for name in required if name not in arrays]
    if missing:
        raise OofError(f"{path} lacks the arrays {', '.join(missing)}; {hint}")
    n = len(arrays["scan_id"]) if "scan_id" in arrays else None
    for name, array in arrays.items():
        if name in NUMERIC and not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise OofError(f"{path}: array '{name}' has dtype {array.dtype}, expected numbers; {hint}")
        if name in TEXT and array.dtype.kind not in "US":
            raise OofError(f"{path}: array '{name}' has dtype {array.dtype}, expected text; {hint}")
        if n is not None and (array.ndim == 0 or len(array) != n):
            raise OofError(f"{path}: array '{name}' has shape {array.shape}, expected {n} rows (one per scan); {hint}")
    prob = arrays.get("prob")
    if prob is not None and not (np.isfinite(prob).all() and (prob >= 0).all() and (prob <= 1).all()):
        raise OofError(f"{path}: 'prob' holds values that are not probabilities (NaN, inf or outside [0, 1]); {hint}")
    return arrays
