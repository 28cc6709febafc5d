"""A run's oof.npz (out-of-fold predictions): the one writer of the prediction arrays, and the
reader that checks them defensively.

`write_predictions` writes the layout of oof.npz (`drct train`) and of predictions.npz
(`drct predict`): identifying columns, then the model outputs, each in its dtype (`PREDICTIONS`).

evaluate, interpret and report all read this file, and a run directory is something people copy
around and edit: a tampered file (object arrays, which would need pickle; missing or misshapen
arrays; a truncated zip) must give one clear message, never a raw ValueError or a pickle load.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from pipeline.training.atomic import atomic_write_bytes, npz_bytes

NUMERIC = ("fold", "labels", "prob", "prob_primary", "prob_aps", "sample_idx", "slice_attention", "cache_index",
           "aps_idx", "feature_attention")
TEXT = ("scan_id", "patient_id")
REQUIRED = ("scan_id", "fold", "labels", "prob")


# The model outputs of oof.npz and predictions.npz, in file order, with their dtypes.
PREDICTIONS = {"prob": np.float32, "prob_primary": np.float32, "prob_aps": np.float32, "sample_idx": np.int64,
               "slice_attention": np.float32, "feature_attention": np.float16, "aps_idx": np.int64,
               "aps_idx_per_fold": np.int64}


def write_predictions(path: str | Path, columns: dict[str, np.ndarray], preds: dict) -> Path:
    """oof.npz (`drct train`) or predictions.npz (`drct predict`): the identifying `columns` as
    given (scan ids as unicode arrays, ...), then each output of `preds` named in `PREDICTIONS`,
    cast to its dtype. No pickles; written atomically (`atomic.atomic_write_bytes`)."""
    arrays = dict(columns)
    arrays.update({key: np.asarray(preds[key]).astype(dtype) for key, dtype in PREDICTIONS.items() if key in preds})
    return atomic_write_bytes(path, npz_bytes(**arrays))


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
    check_ranges(arrays, path, hint)
    return arrays


def _first_bad(mask: np.ndarray, array: np.ndarray) -> str:
    where = tuple(int(v) for v in np.argwhere(mask)[0])
    return f"{int(mask.sum())} values, first {array[where].item()!r} at {list(where)}"


def check_ranges(arrays: dict[str, np.ndarray], path, hint: str) -> None:
    """Index arrays are integers in range and label arrays hold labels, so that no reader
    indexes out of bounds: ``fold`` >= 0; ``sample_idx`` (n, m) >= 0 (its upper bound, the scan's
    slice count, is checked against the cache by `check_sample_idx`); ``aps_idx`` (n, m_key) in
    -1 (no APS) .. m-1; ``cache_index`` >= 0; ``labels`` in {0, 1, NaN} with the shape of ``prob``;
    ``slice_attention`` of the shape of ``sample_idx``."""
    for name in ("fold", "sample_idx", "aps_idx", "cache_index"):
        if name in arrays and arrays[name].dtype.kind not in "iu":
            raise OofError(f"{path}: array '{name}' has dtype {arrays[name].dtype}, expected integers; {hint}")
    for name in ("fold", "sample_idx", "cache_index"):
        if name in arrays and (arrays[name] < 0).any():
            raise OofError(f"{path}: '{name}' holds negative indices ({_first_bad(arrays[name] < 0, arrays[name])}); {hint}")
    sample = arrays.get("sample_idx")
    if sample is not None and sample.ndim != 2:
        raise OofError(f"{path}: 'sample_idx' has shape {sample.shape}, expected (scans, m); {hint}")
    attention = arrays.get("slice_attention")
    if sample is not None and attention is not None and attention.shape != sample.shape:
        raise OofError(f"{path}: 'slice_attention' has shape {attention.shape}, 'sample_idx' {sample.shape}; {hint}")
    aps = arrays.get("aps_idx")
    if aps is not None:
        m = sample.shape[1] if sample is not None else None
        bad = (aps < -1) | (aps >= m) if m is not None else aps < -1
        if aps.ndim != 2 or bad.any():
            detail = _first_bad(bad, aps) if aps.ndim == 2 else f"shape {aps.shape}"
            raise OofError(f"{path}: 'aps_idx' holds positions outside -1..{'m-1' if m is None else m - 1} "
                           f"({detail}); {hint}")
    labels, prob = arrays.get("labels"), arrays.get("prob")
    if labels is not None:
        if prob is not None and labels.shape != prob.shape:
            raise OofError(f"{path}: 'labels' has shape {labels.shape}, 'prob' {prob.shape}; {hint}")
        values = labels.astype(np.float64)
        bad = ~(np.isnan(values) | (values == 0) | (values == 1))
        if bad.any():
            raise OofError(f"{path}: 'labels' holds values that are not 0, 1 or NaN ({_first_bad(bad, labels)}); {hint}")


def check_sample_idx(arrays: dict[str, np.ndarray], n_slices: np.ndarray, path) -> None:
    """`OofError` unless every ``sample_idx`` of scan i is below n_slices[i] (its slice count in
    the cache the run is read with): an index beyond would read another scan's slices, or fail."""
    sample = np.asarray(arrays["sample_idx"])
    limit = np.asarray(n_slices, np.int64).reshape(-1, 1)
    bad = sample >= limit
    if bad.any():
        scan, column = (int(v) for v in np.argwhere(bad)[0])
        raise OofError(
            f"{path}: 'sample_idx' points past the slices of {int(bad.any(axis=1).sum())} scans (first: scan "
            f"{str(arrays['scan_id'][scan])!r} has {int(limit[scan, 0])} slices in the cache, sample_idx "
            f"[{scan}, {column}] is {int(sample[scan, column])}): tampered, or read with another cache; "
            "re-run `drct train` on this cache"
        )
