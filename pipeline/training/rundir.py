"""The run directory of `drct train`: how it is written, and the one check every reader makes.

Writing (pipeline/training/trainer.py):

- **One writer**: `drct train` holds ``RUN_DIR.lock`` (`cache.lock.OutputLock`, the lock
  discipline of `drct extract`) while it writes; a second train into the same directory stops.
- **Incomplete until finished**: ``RUN_DIR/incomplete.json`` (`INCOMPLETE`) is written before
  anything else and removed last, so a run that was stopped (SIGTERM, SIGINT, a full disk) or
  killed (SIGKILL, a crash) stays marked. It records the folds to run and a key of the settings
  and data (`run_key`); a rerun with the same key resumes at the first unfinished fold.
- **Atomic files**: every file goes to ``NAME.tmp`` first, then `os.replace` (`atomic.atomic_write_bytes`):
  a file exists whole or not at all, and a full disk is one `cache.store.DiskSpaceError` (where,
  how much is needed and free) with the temporary file removed, as in `drct extract`.
- A fold counts as finished once its ``fold_<k>/checkpoint.pt``, ``fold_<k>/history.json`` and
  its rows of ``oof.npz`` (rewritten after each fold) are written, in that order.

Reading: every command that reads a run (`drct predict --run`, `evaluate`, `report`,
`interpret`) reads it through `RunDir` (run.json, config, label names, the cache, checkpoints,
oof.npz, thresholds.json, histories), after `RunDir.check`, i.e. `check_run`. That refuses an
incomplete run, naming the missing folds (unless ``allow_partial``), and a run whose fold
checkpoints differ from each other or from run.json in model, label names or extraction
settings (never overridable: such an ensemble is not one model).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache import store
from pipeline.oof import REQUIRED, read_oof
from pipeline.training.atomic import atomic_write_text

INCOMPLETE = "incomplete.json"
INCOMPLETE_FORMAT = "drct-train-incomplete"
CHECKPOINT = "checkpoint.pt"
HISTORY = "history.json"
RUN_JSON = "run.json"
CONFIG = "config.yaml"
OOF = "oof.npz"
# Written by `drct train`; removed from a run directory before a fresh (not resumed) run.
RUN_FILES = (OOF, RUN_JSON, "MODEL_CARD.md", "summary.json")  # summary: pipeline/run_summary.py
FOLD_FILES = (CHECKPOINT, HISTORY)
_FOLD_DIR = re.compile(r"^fold_(\d+)$")


class RunError(ValueError):
    """A run directory that cannot be used; the message says why and what to do."""


class IncompleteRun(RunError):
    """The run was stopped or is still training: some of its folds are missing."""


class MixedRun(RunError):
    """The fold checkpoints do not belong to one run (model, label names or extraction settings differ)."""


# -- writing (files through pipeline/training/atomic.py) ------------------------------------
def fold_dirs(run_dir: str | Path) -> dict[int, Path]:
    """{k: RUN_DIR/fold_<k>} of the fold folders present."""
    run_dir = Path(run_dir)
    found = {}
    if run_dir.is_dir():
        for child in run_dir.iterdir():
            match = _FOLD_DIR.match(child.name)
            if match and child.is_dir():
                found[int(match.group(1))] = child
    return dict(sorted(found.items()))


def finished_folds(run_dir: str | Path) -> list[int]:
    """Folds whose checkpoint and history are both written."""
    return [k for k, d in fold_dirs(run_dir).items() if all((d / name).is_file() for name in FOLD_FILES)]


def read_marker(run_dir: str | Path) -> dict | None:
    """incomplete.json's content; {} for a marker that cannot be read (still incomplete); None when absent."""
    path = Path(run_dir) / INCOMPLETE
    if not path.exists():
        return None
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def write_marker(run_dir: str | Path, content: dict) -> None:
    atomic_write_text(Path(run_dir) / INCOMPLETE, json.dumps({"format": INCOMPLETE_FORMAT, **content}, indent=1))


def update_marker(run_dir: str | Path, **changes) -> None:
    """Best effort (the disk may be full): the marker's presence is what matters, not its state text."""
    try:
        write_marker(run_dir, {**(read_marker(run_dir) or {}), **changes})
    except (store.CacheError, OSError):
        pass


def start_fresh(run_dir: str | Path, marker: dict) -> None:
    """Mark RUN_DIR incomplete, then remove what an earlier run wrote there (its run files and
    fold files, and leftover temporary files), so that no checkpoint of another run stays beside
    the new ones. Other files are left alone."""
    run_dir = Path(run_dir)
    write_marker(run_dir, marker)
    for name in RUN_FILES:
        for path in (run_dir / name, run_dir / (name + ".tmp")):
            path.unlink(missing_ok=True)
    for fold_dir in fold_dirs(run_dir).values():
        for name in FOLD_FILES:
            for path in (fold_dir / name, fold_dir / (name + ".tmp")):
                path.unlink(missing_ok=True)
        try:
            fold_dir.rmdir()
        except OSError:
            pass  # not empty: files that are not ours


def remove_temporaries(run_dir: str | Path) -> None:
    run_dir = Path(run_dir)
    for folder in (run_dir, *fold_dirs(run_dir).values()):
        for tmp in folder.glob("*.tmp"):
            store.remove_quietly(tmp)


def folds_text(folds) -> str:
    folds = list(folds)
    return ", ".join(str(f) for f in folds) if folds else "none"


# -- reading ------------------------------------------------------------------------------------
@dataclass
class RunState:
    """What `check_run` found: the folds the run is meant to have, those finished and missing."""

    run_dir: Path
    folds: list[int]                     # the folds the run trains (run.json / incomplete.json / configs)
    finished: list[int]                  # folds with a checkpoint (and history)
    missing: list[int]                   # folds - finished, where that is known to matter
    incomplete: bool                     # incomplete.json present, or checkpoints missing
    checkpoints: list[Path] = field(default_factory=list)   # the finished folds' checkpoints, in fold order

    @property
    def partial(self) -> bool:
        return self.incomplete or bool(self.missing)


def _run_json(run_dir: Path) -> dict:
    try:
        info = json.loads((run_dir / RUN_JSON).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _folds_of_train(train: dict) -> list[int] | None:
    try:
        k = int(train["folds"])
        return list(range(k)) if train.get("fold") is None else [int(train["fold"])]
    except (KeyError, TypeError, ValueError):
        return None


def _config_folds(run_dir: Path) -> list[int] | None:
    import yaml

    try:
        config = yaml.safe_load((run_dir / CONFIG).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    return _folds_of_train(config.get("train") or {}) if isinstance(config, dict) else None


def check_run(run_dir: str | Path, allow_partial: bool = False, need_checkpoints: bool = False) -> RunState:
    """The check every reader of a run directory makes before using it.

    Incomplete (incomplete.json present; or, with `need_checkpoints`, a fold of the run without a
    checkpoint): `IncompleteRun` naming the missing folds, unless `allow_partial`. Checkpoints that
    disagree with each other or with run.json (model, label names, extraction settings), or that
    are not a fold of this run: `MixedRun`, always."""
    run_dir = Path(run_dir)
    marker = read_marker(run_dir)
    info = _run_json(run_dir)
    present = {k: d / CHECKPOINT for k, d in fold_dirs(run_dir).items() if (d / CHECKPOINT).is_file()}
    folds = None
    for source in ((marker or {}).get("folds_run"), info.get("folds_run")):
        if isinstance(source, list) and all(isinstance(f, int) for f in source):
            folds = sorted(source)
            break
    if folds is None:
        folds = _config_folds(run_dir)
    if folds is not None:
        _refuse_extra_folds(run_dir, present, folds)
    payloads = _check_checkpoints(run_dir, present, info)
    if folds is None and payloads:
        folds = _folds_of_train((next(iter(payloads.values())).get("config") or {}).get("train") or {})
    if folds is None:
        folds = sorted(present)
    _refuse_extra_folds(run_dir, present, folds)
    finished = sorted(set(finished_folds(run_dir)) & set(folds)) if marker is not None else sorted(present)
    missing = sorted(set(folds) - set(finished)) if (marker is not None or need_checkpoints) else []
    incomplete = marker is not None or bool(missing)
    if incomplete and not allow_partial:
        state = (marker or {}).get("state") or ("stopped or still training" if marker is not None else
                                                "fold checkpoints deleted")
        if finished:
            use = f"or pass --allow-partial to use fold(s) {folds_text(finished)} only"
        else:
            use = "no fold is finished yet"
        raise IncompleteRun(
            f"{run_dir} is an incomplete `drct train` run ({state}): fold(s) {folds_text(missing)} of "
            f"{folds_text(folds)} missing; run the same `drct train` command again to finish it, {use}"
        )
    return RunState(run_dir, folds, finished, missing, incomplete,
                    [present[k] for k in finished if k in present])


def _refuse_extra_folds(run_dir: Path, present: dict[int, Path], folds: list[int]) -> None:
    extra = sorted(set(present) - set(folds))
    if extra:
        raise MixedRun(
            f"{run_dir}: fold_{extra[0]}/{CHECKPOINT} is not a fold of this run (folds {folds_text(folds)}): "
            "it comes from another run; remove it, or train into a new directory"
        )


def _differences(a: dict, b: dict) -> list[str]:
    """Fields in which two checkpoint payloads differ: model, sampler.m, label names, extraction settings."""
    from cache.provenance import CHECKED_FIELDS, normalise_field

    out = []
    model_a, model_b = (p.get("config", {}).get("model") or {} for p in (a, b))
    for key in sorted(set(model_a) | set(model_b)):
        if model_a.get(key) != model_b.get(key):
            out.append(f"model.{key} {model_a.get(key)!r} vs {model_b.get(key)!r}")
    m_a, m_b = ((p.get("config", {}).get("sampler") or {}).get("m") for p in (a, b))
    if m_a != m_b:
        out.append(f"sampler.m {m_a!r} vs {m_b!r}")
    if list(a.get("label_names") or []) != list(b.get("label_names") or []):
        out.append(f"label names {list(a.get('label_names') or [])} vs {list(b.get('label_names') or [])}")
    prov_a, prov_b = a.get("provenance") or {}, b.get("provenance") or {}
    for key in (*CHECKED_FIELDS, "weights_digest"):
        if normalise_field(key, prov_a.get(key)) != normalise_field(key, prov_b.get(key)):
            out.append(f"extraction setting {key} {prov_a.get(key)!r} vs {prov_b.get(key)!r}")
    return out


def _check_checkpoints(run_dir: Path, present: dict[int, Path], info: dict) -> dict[int, dict]:
    """Load every fold checkpoint (weights_only) and refuse a mixed set: `MixedRun` naming the file
    and the fields. run.json, where it records them, is the reference for model name, label names
    and extraction settings."""
    if not present:
        return {}
    from pipeline.training.checkpoint import CheckpointError, load_checkpoint

    payloads = {}
    for k, path in present.items():
        try:
            payload = load_checkpoint(path)
        except CheckpointError as exc:
            raise MixedRun(f"{run_dir}: {exc}") from None
        if payload.get("fold") is not None and payload["fold"] != k:
            raise MixedRun(f"{path} is the checkpoint of fold {payload['fold']}, not of fold {k}: "
                           "it was copied from elsewhere; retrain the run")
        payloads[k] = payload
    reference_fold = min(payloads)
    reference = payloads[reference_fold]
    if info:
        recorded = {"config": {"model": {**(reference.get("config", {}).get("model") or {}),
                                         **({"name": info["model"]} if "model" in info else {})},
                               "sampler": reference.get("config", {}).get("sampler") or {}},
                    "label_names": info.get("label_names", reference.get("label_names")),
                    "provenance": {**(reference.get("provenance") or {}), **(info.get("provenance") or {})}}
        if "weights_digest" in info:
            recorded["provenance"]["weights_digest"] = info["weights_digest"]
        differences = _differences(reference, recorded)
        if differences:
            raise MixedRun(
                f"{run_dir}: fold_{reference_fold}/{CHECKPOINT} does not belong to this run (run.json): it differs in "
                + "; ".join(differences) + ". Its checkpoints would not form one model: retrain into a new directory"
            )
    for k, payload in payloads.items():
        differences = _differences(payload, reference)
        if differences:
            raise MixedRun(
                f"{run_dir}: fold_{k}/{CHECKPOINT} differs from fold_{reference_fold}/{CHECKPOINT} in "
                + "; ".join(differences) + ": the folds come from different runs and are never averaged "
                "into one ensemble; retrain into a new directory"
            )
    return payloads


# -- the reader ---------------------------------------------------------------------------------

class RunDir:
    """A `drct train` run directory as every command reads it (`drct report`, `evaluate`,
    `interpret`, `predict --run`): `check` first (`check_run`), then typed accessors. A file a
    reader needs and the run lacks (run.json, oof.npz) is a `RunError` naming it; a damaged
    oof.npz is a `pipeline.oof.OofError`; an invalid thresholds.json a ValueError."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._run_json: dict | None = None
        self._config: dict | None = None

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def check(self, allow_partial: bool = False, need_checkpoints: bool = False) -> RunState:
        """`check_run`: an incomplete run is refused (`IncompleteRun`) unless `allow_partial`, a mixed one always."""
        return check_run(self.path, allow_partial=allow_partial, need_checkpoints=need_checkpoints)

    def require(self, *names: str) -> None:
        """`RunError` unless the run holds the files `names` (e.g. run.json, oof.npz)."""
        for name in names:
            if not (self.path / name).is_file():
                raise RunError(f"{self.path / name} not found: is {self.path} a finished `drct train` run directory?")

    @property
    def run_json(self) -> dict:
        """run.json's content (cache, provenance, label names, folds, resolutions, ...)."""
        if self._run_json is None:
            self.require(RUN_JSON)
            try:
                info = json.loads((self.path / RUN_JSON).read_text())
            except (OSError, ValueError) as exc:
                raise RunError(f"{self.path / RUN_JSON} is not readable ({type(exc).__name__}: {exc}); "
                               "re-run `drct train` to write it again") from None
            if not isinstance(info, dict):
                raise RunError(f"{self.path / RUN_JSON} is not a run record (no JSON object); "
                               "re-run `drct train` to write it again")
            self._run_json = info
        return self._run_json

    @property
    def config(self) -> dict:
        """The merged config the run was trained with (config.yaml); {} where the run has none."""
        if self._config is None:
            import yaml

            path = self.path / CONFIG
            self._config = (yaml.safe_load(path.read_text()) if path.is_file() else None) or {}
        return self._config

    @property
    def label_names(self) -> list[str]:
        """run.json's label names ([] where it records none)."""
        return [str(n) for n in self.run_json.get("label_names") or []]

    @property
    def threshold(self) -> float:
        """The run's one decision threshold: evaluate.threshold of its config (0.5 by default)."""
        return float((self.config.get("evaluate") or {}).get("threshold", 0.5))

    def cache_path(self, override: str | Path | None = None) -> Path:
        """The feature cache the run was trained on (run.json), or `override`; a relative path that
        does not exist from here is taken relative to the run directory."""
        path = Path(override) if override else Path(str(self.run_json.get("cache", "")))
        if override or path.is_absolute() or path.exists():
            return path
        return self.path / path

    @property
    def provenance(self) -> dict:
        """run.json's provenance with its recorded encoder weights digest."""
        provenance = dict(self.run_json.get("provenance") or {})
        if self.run_json.get("weights_digest"):
            provenance["weights_digest"] = self.run_json["weights_digest"]
        return provenance

    @property
    def folds(self) -> dict[int, Path]:
        """{k: RUN_DIR/fold_<k>} of the fold folders present."""
        return fold_dirs(self.path)

    def checkpoints(self, allow_partial: bool = False) -> list[Path]:
        """The finished folds' checkpoints, in fold order, after `check` (a fold of the run without
        a checkpoint counts as missing); `RunError` where there is none."""
        state = self.check(allow_partial=allow_partial, need_checkpoints=True)
        if not state.checkpoints:
            raise RunError(f"{self.path}: no fold_<k>/{CHECKPOINT}; is it a finished `drct train` run directory?")
        return state.checkpoints

    def oof(self, required: tuple[str, ...] | None = None) -> dict:
        """oof.npz's arrays, checked (`pipeline.oof.read_oof`; `required` beyond its REQUIRED)."""
        self.require(OOF)
        return read_oof(self.path / OOF, tuple(dict.fromkeys((*REQUIRED, *(required or ())))))

    @property
    def oof_path(self) -> Path:
        return self.path / OOF

    def thresholds(self, names) -> np.ndarray | None:
        """The per-class thresholds of thresholds.json (`drct evaluate --threshold-from oof`) in
        `names` order; None if the run has none; ValueError for an invalid file
        (`pipeline.calibration.run_thresholds`)."""
        from pipeline.calibration import run_thresholds

        return run_thresholds(self.path, names)

    def history(self, fold: int) -> list[dict] | None:
        """fold_<k>/history.json (one record per epoch); None where absent or unreadable."""
        try:
            history = json.loads((self.path / f"fold_{int(fold)}" / HISTORY).read_text())
        except (OSError, ValueError):
            return None
        return history if isinstance(history, list) else None
