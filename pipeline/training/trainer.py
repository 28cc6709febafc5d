"""Stage two: train DrCT1/DrCT2 heads on the in-memory feature cache with patient-grouped
k-fold cross-validation, and write the run directory (format in stages/train.py's help and
below). The CNN never runs here: the APS "zoom in" is a gather of 512-resolution rows.

Run directory::

    config.yaml   the merged config          run.json   cache, provenance, labels, folds, resolutions
    MODEL_CARD.md data, folds, metrics, intended use and limits (pipeline/training/model_card.py)
    fold_<k>/checkpoint.pt, fold_<k>/history.json
    oof.npz       out-of-fold predictions with slice and feature attentions (see write_oof), rewritten
                  after each fold with the folds finished so far
    incomplete.json  only while the run is unfinished (training, stopped, killed): see rundir.py

RUN_DIR.lock beside it is held while a train writes (one writer). A stopped run (SIGTERM, SIGINT,
a full disk) keeps its finished folds and resumes at the first unfinished one when the same
command runs again (pipeline/training/rundir.py).

The checkpoint of a fold is the model after the last epoch (the paper trains a fixed 100
epochs; choosing the best epoch on the validation fold would bias the out-of-fold metrics).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from cache import store
from cache.lock import OutputLock
from cache.provenance import config_provenance, provenance_differences
from cache.store import FeatureCache
from pipeline.departures import departures
from pipeline.heads.build import build_model, head_spec, predict
from pipeline.heads.head import Head, HeadSpec
from pipeline.metrics import classification_metrics
from pipeline.oof import OofError, read_oof, write_predictions
from pipeline.training import rundir
from pipeline.training.atomic import atomic_write_text
from pipeline.training.checkpoint import save_checkpoint
from pipeline.training.dataset import CachedFeatures
from pipeline.training.folds import assign_folds, patients_split_across_folds, read_folds_file
from pipeline.training.interrupt import StopOnSignal, TrainingInterrupted, signal_name
from pipeline.training.losses import HeadLoss, head_loss
from pipeline.training.model_card import write_model_card
from pipeline.training.sampler import TRAIN_PHASES, epoch_plan, eval_positions, sample_positions

EPOCH_PAUSE_ENV = "DRCT_EPOCH_PAUSE"  # seconds to sleep after each epoch (kill-and-resume tests only)


class TrainingError(ValueError):
    """A training run that cannot start (bad cache, config or fold); the message says why."""


class ProvenanceMismatch(TrainingError):
    """The cache was made with other extraction settings than the config asks for."""


def check_provenance(cache: FeatureCache, config: dict) -> None:
    """Refuse a cache whose provenance differs from config["extract"], naming each field."""
    differences = provenance_differences(cache.provenance, config_provenance(config["extract"]))
    if differences:
        raise ProvenanceMismatch(f"cache {cache.path} does not match the config: " + "; ".join(differences))


def effective_count(weights: np.ndarray) -> float:
    """Mean over rows of exp(entropy) of weights that sum to 1 on the last axis: how many entries an
    attention really uses (m for a uniform slice attention, 1 for one slice). Never above the
    row length: exp of a float64 entropy of a uniform row can round past it."""
    w = np.clip(np.asarray(weights, np.float64), 1e-12, None)
    if not w.size:
        return float("nan")
    return float(np.minimum(np.exp(-(w * np.log(w)).sum(axis=-1)), w.shape[-1]).mean())


def attention_spread(preds: dict) -> dict[str, float]:
    """Validation attention spread, logged per epoch: a feature attention collapsing onto a few
    of the 512 channels, or a slice attention staying uniform, shows here before the metrics.
    The feature attention arrives summarised per slice (`predict(..., feature_attention="count")`):
    its full (scans, m, 512) array never leaves the device during training."""
    channels = preds["feature_attention_channels"] if "feature_attention_channels" in preds \
        else _counts(preds["feature_attention"])
    return {"val_feature_attention_channels": float(np.mean(channels)) if np.size(channels) else float("nan"),
            "val_slice_attention_slices": effective_count(preds["slice_attention"])}


def _counts(weights: np.ndarray) -> np.ndarray:
    w = np.clip(np.asarray(weights, np.float64), 1e-12, None)
    return np.minimum(np.exp(-(w * np.log(w)).sum(axis=-1)), w.shape[-1])


def check_adaptation_overlap(cache: FeatureCache) -> None:
    """Refuse a cache encoded by a `drct adapt` encoder that was tuned on some of its own scans:
    their out-of-fold figures would be inflated by an encoder that saw their slice labels.

    The sidecar (`W.pth.json`) lists digests of the adapted slices' SOP Instance UIDs, compared
    with the cache's own: scan pseudonyms are keyed to each data root, so the same scans under two
    roots would not match by id. It fails closed: a sidecar that is gone or lists no digests (an
    older `drct adapt`) is refused, naming the file."""
    from cache.provenance import sop_digest

    record = cache.provenance.get("adaptation")
    if not record:
        return
    sidecar = Path(record.get("sidecar", "?")) if isinstance(record, dict) else Path("?")
    try:
        digests = set(json.loads(sidecar.read_text())["sop_digests"])
    except (ValueError, KeyError, TypeError, OSError):
        raise TrainingError(
            f"cache {cache.path} was encoded by a `drct adapt` encoder whose record {sidecar} is missing or "
            "older than the overlap check (no sop_digests): the scans it was tuned on cannot be compared with "
            "this cache's. Put the record back beside the weights, or rerun `drct adapt`"
        ) from None
    shared = [i for i, uid in enumerate(cache.table.sop_uid) if sop_digest(uid) in digests]
    if shared:
        rows = np.asarray(shared)
        scans = sorted({str(cache.table.scan_id[np.searchsorted(cache.table.offset, r, side="right") - 1])
                        for r in rows[:1000]})
        raise TrainingError(
            f"cache {cache.path} was encoded by an encoder adapted on {len(shared)} of its own slices "
            f"(scans e.g. {', '.join(scans[:3])}; see {sidecar}): adapt on other scans, or extract with other weights"
        )


def resolve_device(name: str) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise TrainingError(f"train.device '{name}' is not a device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"train.device is '{name}' but CUDA is not available; use cpu or auto")
    return device


def resolutions(config: dict, cache: FeatureCache) -> dict[str, int]:
    """Primary = the first cached resolution; APS = the last (or the first: Table 4 ablation)."""
    which = str(config["model"]["aps_resolution"])
    if which not in ("last", "first"):
        raise TrainingError(f"model.aps_resolution must be 'last' or 'first', not '{which}'")
    res = cache.resolutions
    aps = int(res[-1] if which == "last" else res[0])
    if head_spec(config).primary_view == "aps":  # e.g. the baselines: one view, the APS one
        return {"primary": aps, "aps": aps}
    return {"primary": int(res[0]), "aps": aps}


def deterministic_mode(enabled: bool) -> Callable[[], None]:
    """Make training repeatable bit for bit (``train.deterministic``); returns a function that
    restores the previous global settings.

    CPU: the seeds alone already give identical runs (tested). CUDA: cuDNN picks kernels by
    benchmark and several CUDA kernels (atomics in backward passes, cuBLAS split-K workspaces)
    are not bitwise repeatable, so this sets ``torch.use_deterministic_algorithms(True,
    warn_only=True)`` (an op without a deterministic kernel warns, naming itself, instead of
    failing the run), ``cudnn.deterministic = True``, ``cudnn.benchmark = False`` and
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (cuBLAS reads it when it creates its handle: export it
    in the shell to be sure it is set before any CUDA work in the process). Cost: slower CUDA
    kernels (deterministic cuDNN RNN/cuBLAS paths) and ~4 MiB of cuBLAS workspace per stream;
    not measured here (no GPU on the development machine; see README "Determinism")."""
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False

    def restore() -> None:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2], previous[3]

    return restore


def set_input_statistics(model: Head, data: CachedFeatures, train_scans: np.ndarray) -> None:
    """The input standardisers' channel sd (and mean) from this fold's training scans only (the
    sd of the scan-centred values where the norm centres each scan): the head lists them."""
    for norm, resolution in model.standardizers():
        norm.set_statistics(*data.channel_statistics(train_scans, resolution, centre_quantile=norm.centre_quantile))


def optimizer_for(model: Head, config: dict) -> torch.optim.Optimizer:
    t = config["train"]
    groups = model.parameter_groups(float(t["lr_primary"]), float(t["lr_aps"]), float(t["lr_fusion"]))
    # AdamW: decoupled weight decay (Adam with weight_decay 0 is the paper's optimiser exactly)
    return torch.optim.AdamW(groups, weight_decay=float(t.get("weight_decay") or 0.0))


def train_epoch(
    model: Head,
    data: CachedFeatures,
    scans: np.ndarray,
    m: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    loss_fn: HeadLoss,
    rng: np.random.Generator,
    augment: bool = True,
    bar: tqdm | None = None,
    train_phases: str = "all",
) -> dict[str, float]:
    """One pass over the epoch's samples of `scans` (`sampler.epoch_plan`: with
    train_phases="all" every disjoint phase of a long scan is a sample) in a random order;
    returns mean losses, the number of samples and timings."""
    model.train()
    if augment:
        which, phase = epoch_plan(data.n_slices[scans], m, rng, train_phases)
    else:
        which, phase = np.arange(len(scans)), None
    order = rng.permutation(len(which))
    if bar is not None:
        bar.total = len(order)
        bar.refresh()
    totals: dict[str, float] = {}
    n_seen = 0
    data_seconds = 0.0
    start = time.perf_counter()
    for first in range(0, len(order), batch_size):
        t0 = time.perf_counter()
        pick = order[first : first + batch_size]
        chunk = scans[which[pick]]
        n = data.n_slices[chunk]
        positions = sample_positions(n, m, phase[pick]) if augment else eval_positions(n, m)
        batch = data.batch(chunk, positions)
        getter = data.aps_getter(batch.rows)
        data_seconds += time.perf_counter() - t0
        out = model(batch.primary, getter)
        loss, parts = loss_fn(out, batch.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        weight = len(chunk)
        n_seen += weight
        totals["loss"] = totals.get("loss", 0.0) + loss.item() * weight
        for key, value in parts.items():
            totals[f"loss_{key}"] = totals.get(f"loss_{key}", 0.0) + value.item() * weight
        if bar is not None:
            bar.update(weight)
            bar.set_postfix(loss=f"{totals['loss'] / n_seen:.4f}", refresh=False)
    result = {key: value / max(n_seen, 1) for key, value in totals.items()}
    result["samples"] = n_seen
    result["seconds"] = time.perf_counter() - start
    result["data_seconds"] = data_seconds
    return result


def predict_scans(model: Head, data: CachedFeatures, scans: np.ndarray, m: int, batch_size: int, seed: int = 0,
                  feature_attention: str = "full") -> dict:
    """Deterministic evaluation of `scans`: the evaluation sample, then model outputs, as numpy.
    feature_attention="count" returns its per-slice effective channel count instead of the
    (B, m, 512) weights (the per-epoch validation; see build.predict)."""
    collected: dict[str, list] = {}
    model.evaluation_seed(seed)
    try:
        for first in range(0, len(scans), batch_size):
            chunk = np.asarray(scans[first : first + batch_size])
            positions = eval_positions(data.n_slices[chunk], m)
            batch = data.batch(chunk, positions)
            out = predict(model, batch.primary, data.aps_getter(batch.rows), feature_attention)
            out["sample_idx"] = positions
            for key, value in out.items():
                collected.setdefault(key, []).append(value)
    finally:
        model.evaluation_seed(None)
    return {key: np.concatenate(values) for key, values in collected.items()}


def train_fold(model, data: CachedFeatures, train_scans: np.ndarray, val_scans: np.ndarray, config: dict,
               loss_fn: HeadLoss, rng: np.random.Generator, names: list[str], threshold: float, progress: bool,
               fold: int, on_epoch: Callable[[int, int, dict], None] | None) -> list[dict]:
    """train.epochs epochs of SGD on one fold; returns the per-epoch history (losses, validation
    macro-F1/AUC, attention spread). The model after the last epoch is the fold's model."""
    t = config["train"]
    m = int(config["sampler"]["m"])
    epochs = int(t["epochs"])
    seed = int(t["seed"])
    eval_batch = int(t.get("eval_batch_size") or 512)
    augment = bool(config["sampler"].get("augment", True))
    train_phases = str(config["sampler"].get("train_phases", "all"))
    optimizer = optimizer_for(model, config)
    history = []
    for epoch in range(1, epochs + 1):
        bar = tqdm(total=len(train_scans), desc=f"fold {fold} epoch {epoch}/{epochs}", unit="scan", leave=False,
                   disable=not progress)
        stats = train_epoch(model, data, train_scans, m, int(t["batch_size"]), optimizer, loss_fn, rng, augment,
                            bar, train_phases)
        preds = predict_scans(model, data, val_scans, m, eval_batch, seed, feature_attention="count")
        val = classification_metrics(data.labels[val_scans], preds["prob"], names, threshold)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", val_macro_f1=f"{val['macro_f1']:.4f}")
        bar.close()
        history.append({"epoch": epoch, **stats, "val_macro_f1": val["macro_f1"], "val_macro_auc": val["macro_auc"],
                        **attention_spread(preds)})
        if on_epoch is not None:
            on_epoch(fold, epoch, history[-1])
        if EPOCH_PAUSE_ENV in os.environ:  # bench/soak.py and the tests: time to stop a run mid-fold
            time.sleep(float(os.environ[EPOCH_PAUSE_ENV] or 0))
    return history


def fit_closed_form(spec: HeadSpec, model: Head, data: CachedFeatures, train_scans: np.ndarray,
                    val_scans: np.ndarray, m: int, batch_size: int, seed: int, names: list[str],
                    threshold: float) -> dict:
    """A head fitted in closed form (its spec's `fit`, e.g. `pooled_logistic`) on the training
    scans' evaluation samples instead of SGD epochs; one history record (training BCE of the fit,
    validation metrics, and what `fit` returns)."""
    start = time.perf_counter()

    def samples():
        for first in range(0, len(train_scans), batch_size):
            chunk = train_scans[first : first + batch_size]
            yield data.batch(chunk, eval_positions(data.n_slices[chunk], m)).primary

    fitted = spec.fit(model, samples(), data.labels[train_scans], data.patient_id[train_scans].astype(str), seed)
    fit_preds = predict_scans(model, data, train_scans, m, batch_size, seed, feature_attention="count")
    eps = 1e-6
    p, y = np.clip(fit_preds["prob"], eps, 1 - eps), data.labels[train_scans]
    loss = float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
    preds = predict_scans(model, data, val_scans, m, batch_size, seed, feature_attention="count")
    val = classification_metrics(data.labels[val_scans], preds["prob"], names, threshold)
    return {"epoch": 1, "loss": loss, "samples": len(train_scans), "seconds": time.perf_counter() - start,
            **fitted, "val_macro_f1": val["macro_f1"], "val_macro_auc": val["macro_auc"],
            **attention_spread(preds)}


def write_oof(path: Path, data: CachedFeatures, scans: np.ndarray, fold: np.ndarray, preds: dict) -> Path:
    """oof.npz: one row per evaluated scan (no pickles; strings as unicode arrays); written atomically."""
    return write_predictions(path, {
        "scan_id": np.asarray([str(s) for s in data.scan_id[scans]], dtype=str),
        "patient_id": np.asarray([str(p) for p in data.patient_id[scans]], dtype=str),
        "cache_index": np.asarray(scans, np.int64),
        "fold": np.asarray(fold, np.int64),
        "labels": data.labels[scans].astype(np.float32),
    }, preds)


def run_training(
    config: dict,
    cache_path: str | Path,
    out_dir: str | Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_epoch: Callable[[int, int, dict], None] | None = None,
) -> dict:
    """Cross-validated training as configured; writes and returns run.json's content.

    `on_epoch(fold, epoch, record)` is called after each epoch with the history record (losses,
    val_macro_f1, val_macro_auc): the hook the dvclive logger (pipeline/training/live.py) uses.

    RUN_DIR is locked while written, marked incomplete until the last fold is written, and an
    interrupted run of the same settings resumes at its first unfinished fold
    (pipeline/training/rundir.py). SIGTERM/SIGINT raise `TrainingInterrupted` with a one-line
    message once RUN_DIR is whole again; a full disk raises `cache.store.DiskSpaceError`."""
    t = config["train"]
    if t.get("threads"):
        torch.set_num_threads(int(t["threads"]))
    with StopOnSignal() as stop:
        try:
            cache = FeatureCache(cache_path)
        except TrainingInterrupted as exc:
            raise TrainingInterrupted(exc.signum, f"stopped by {signal_name(exc.signum)} before training started; "
                                                  f"{out_dir} was not changed") from None
        try:
            check_provenance(cache, config)
            check_adaptation_overlap(cache)
            res = resolutions(config, cache)
            names = list(cache.label_names)
            if not names:
                raise TrainingError(f"cache {cache.path} has no label names (a folder-layout cache cannot be trained on)")
            device = resolve_device(t["device"])
            build_model(config, len(names))  # fail on a bad model config before loading the cache
            lock = OutputLock(out_dir, "drct train").acquire()  # one writer per run directory, as in `drct extract`
            try:
                return _train_locked(config, cache, cache_path, Path(out_dir), res, names, device, progress, log,
                                     on_epoch, stop)
            finally:
                lock.release()
        except TrainingInterrupted as exc:
            if exc.message.startswith(f"stopped by {signal_name(exc.signum)} "):
                raise
            raise TrainingInterrupted(exc.signum, f"stopped by {signal_name(exc.signum)} before training started; "
                                                  f"{out_dir} was not changed") from None
        finally:
            cache.close()


def run_key(config: dict, provenance: dict, names: list[str], scan_ids, fold_of: np.ndarray, folds_run: list[int]) -> str:
    """What a resumed run must share with the interrupted one: every setting that changes a fold's
    model (sampler, model, train but its output folder, thread count and fold choice, which
    `folds_run` covers; the evaluate threshold of the logged validation F1), the cache's
    provenance, the label names and the fold of every labelled scan."""
    train = {key: value for key, value in config["train"].items() if key not in ("out", "threads", "fold")}
    content = {"sampler": config["sampler"], "model": config["model"], "train": train,
               "evaluate": config.get("evaluate"), "provenance": provenance, "label_names": list(names),
               "scans": [str(s) for s in scan_ids], "fold_of": [int(f) for f in fold_of], "folds_run": list(folds_run)}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:32]


OOF_PREDICTIONS = ("prob", "prob_primary", "prob_aps", "sample_idx", "slice_attention", "feature_attention", "aps_idx")


def _resumable_folds(out: Path, folds_run: list[int], data: CachedFeatures, labelled: np.ndarray,
                     fold_of: np.ndarray) -> dict[int, tuple[np.ndarray, dict, list[dict]]]:
    """{fold: (validation scans, predictions, history)} of the interrupted run's finished folds:
    checkpoint and history written and the fold's rows in oof.npz, for exactly its validation scans."""
    finished = set(rundir.finished_folds(out)) & set(folds_run)
    if not finished or not (out / "oof.npz").is_file():
        return {}
    try:
        oof = read_oof(out / "oof.npz", ("scan_id", "fold", "cache_index", *OOF_PREDICTIONS))
    except OofError:
        return {}
    kept = {}
    for fold in sorted(finished):
        rows = np.flatnonzero(oof["fold"] == fold)
        val_scans = labelled[fold_of == fold]
        if not np.array_equal(oof["cache_index"][rows], val_scans) or \
                list(oof["scan_id"][rows]) != [str(s) for s in data.scan_id[val_scans]]:
            continue
        try:
            history = json.loads((out / f"fold_{fold}" / rundir.HISTORY).read_text())
        except (OSError, ValueError):
            continue
        kept[fold] = (val_scans, {key: oof[key][rows] for key in OOF_PREDICTIONS}, history)
    return kept


def _merged(completed: dict[int, tuple[np.ndarray, dict, list[dict]]]) -> tuple[np.ndarray, np.ndarray, dict]:
    """(scans, folds, predictions) of the finished folds, in scan (cache row) order."""
    folds = sorted(completed)
    scans = np.concatenate([completed[f][0] for f in folds])
    fold_ids = np.concatenate([np.full(len(completed[f][0]), f) for f in folds])
    order = np.argsort(scans, kind="stable")
    preds = {key: np.concatenate([np.asarray(completed[f][1][key]) for f in folds])[order] for key in OOF_PREDICTIONS}
    return scans[order], fold_ids[order], preds


def _train_locked(config: dict, cache: FeatureCache, cache_path, out: Path, res: dict, names: list[str],
                  device: torch.device, progress: bool, log: Callable[[str], None],
                  on_epoch: Callable[[int, int, dict], None] | None, stop: StopOnSignal) -> dict:
    """run_training's work once RUN_DIR's lock is held: folds, resume, signals, the run directory."""
    t = config["train"]
    m = int(config["sampler"]["m"])
    k = int(t["folds"])
    seed = int(t["seed"])
    data = CachedFeatures.from_cache(cache, res["primary"], res["aps"], device)
    labelled = data.labelled
    if len(labelled) == 0:
        raise TrainingError(f"cache {cache.path} has no scan with known labels")
    folds_file = t.get("folds_file")
    if folds_file:
        fold_of = read_folds_file(folds_file, data.scan_id[labelled], data.patient_id[labelled], k)
        split = patients_split_across_folds(data.patient_id[labelled], fold_of)
        if split:
            log(f"warning: train.folds_file puts scans of {len(split)} patient(s) in more than one fold "
                f"(e.g. {', '.join(split[:3])}): their validation scans have siblings in training")
    else:
        fold_of = assign_folds(data.patient_id[labelled], data.labels[labelled], k, seed)
    folds_run = list(range(k)) if t.get("fold") is None else [int(t["fold"])]
    if any(not 0 <= f < k for f in folds_run):
        raise TrainingError(f"train.fold = {t['fold']} is not in 0..{k - 1}")

    run_info = {
        "cache": str(cache_path),
        "provenance": cache.provenance,
        "weights_digest": cache.provenance.get("weights_digest"),
        "label_names": names,
        "model": str(config["model"]["name"]),
        "folds": k,
        "folds_run": folds_run,
        "resolutions": res,
        "seed": seed,
        "m": m,
        "m_key": int(config["model"]["m_key"]),
        "n_scans": len(labelled),
        "folds_file": str(folds_file) if folds_file else None,
        "deterministic": bool(t.get("deterministic", True)),
        "departures_from_paper": departures(config),
    }
    spec = head_spec(config)
    loss_fn = head_loss(config)  # the terms the head's spec declares (baselines: BCE, their usual loss)
    eval_batch = int(t.get("eval_batch_size") or 512)
    if int(t["epochs"]) < 1:
        raise TrainingError(f"train.epochs must be at least 1, got {t['epochs']}")
    threshold = float((config.get("evaluate") or {}).get("threshold", 0.5))  # for val_macro_f1 only
    train_phases = str(config["sampler"].get("train_phases", "all"))
    if train_phases not in TRAIN_PHASES:
        raise TrainingError(f"sampler.train_phases must be one of {', '.join(TRAIN_PHASES)}, not '{train_phases}'")
    run_info["train_phases"] = train_phases

    # Resume or start over (pipeline/training/rundir.py): only an interrupted run of the same key resumes.
    this_key = run_key(config, cache.provenance, names, data.scan_id[labelled], fold_of, folds_run)
    completed: dict[int, tuple[np.ndarray, dict, list[dict]]] = {}
    fold = None
    restore_determinism = deterministic_mode(False)  # a no-op restore until training starts
    try:
        with stop.deferred():
            marker = rundir.read_marker(out)
            if marker is not None:
                if marker.get("run_key") == this_key:
                    completed = _resumable_folds(out, folds_run, data, labelled, fold_of)
                else:
                    log(f"{out} holds an interrupted run with other settings or data: starting it over")
            state = {"run_key": this_key, "folds": k, "folds_run": folds_run, "state": "training",
                     "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            if completed:
                rundir.write_marker(out, state)
                rundir.remove_temporaries(out)
                todo = [f for f in folds_run if f not in completed]
                log(f"resuming {out} at fold {todo[0]}: fold(s) {rundir.folds_text(completed)} kept "
                    "from the interrupted run")
            else:
                rundir.start_fresh(out, state)
            atomic_write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
            atomic_write_text(out / "run.json", json.dumps(run_info, indent=1))
            if on_epoch is not None:  # the dvclive curves of the kept folds, as an uninterrupted run logs them
                for kept in sorted(completed):
                    for record in completed[kept][2]:
                        on_epoch(kept, int(record.get("epoch", 1)), record)
        restore_determinism = deterministic_mode(run_info["deterministic"])

        def logged(f: int, epoch: int, record: dict) -> None:
            with stop.deferred():
                if on_epoch is not None:
                    on_epoch(f, epoch, record)

        for fold in folds_run:
            if fold in completed:
                continue
            torch.manual_seed(seed * 1000 + fold)
            rng = np.random.default_rng([seed, fold])
            train_scans = labelled[fold_of != fold]
            val_scans = labelled[fold_of == fold]
            model = build_model(config, len(names))
            set_input_statistics(model, data, train_scans)
            model = model.to(device)
            if spec.fit is not None:
                history = [fit_closed_form(spec, model, data, train_scans, val_scans, m, eval_batch, seed, names,
                                           threshold)]
            else:
                history = train_fold(model, data, train_scans, val_scans, config, loss_fn, rng, names, threshold,
                                     progress, fold, logged)
            preds = predict_scans(model, data, val_scans, m, eval_batch, seed)
            with stop.deferred():  # the fold's files: checkpoint, history, then oof.npz (its commit point)
                fold_dir = out / f"fold_{fold}"
                save_checkpoint(fold_dir / rundir.CHECKPOINT, model, config, cache.provenance, names, fold)
                atomic_write_text(fold_dir / rundir.HISTORY, json.dumps(history, indent=1))
                finished = {**completed, fold: (val_scans, {key: preds[key] for key in OOF_PREDICTIONS}, history)}
                write_oof(out / "oof.npz", data, *_merged(finished))
                completed = finished
            log(f"fold {fold}: {len(train_scans)} train / {len(val_scans)} validation scans, "
                f"loss {history[-1]['loss']:.4f}, validation macro-F1 {history[-1]['val_macro_f1']:.4f}")
        with stop.deferred(raise_pending=False):  # every fold is written: finish whatever arrives now
            scans, folds, merged = _merged(completed)
            histories = {f: completed[f][2] for f in sorted(completed)}
            write_model_card(out, config, run_info, histories, data.labels[scans].astype(np.float64),
                             merged["prob"].astype(np.float64), folds)
            (out / rundir.INCOMPLETE).unlink(missing_ok=True)  # last: the run is complete
            store._fsync_path(out)
    except TrainingInterrupted as exc:
        name = signal_name(exc.signum)
        todo = [f for f in folds_run if f not in completed]
        if fold is None and not (out / rundir.INCOMPLETE).exists():
            raise TrainingInterrupted(exc.signum, f"stopped by {name} before training started; {out} was not changed") \
                from None
        where = f"during fold {fold}: fold {fold} discarded" if fold is not None and fold not in completed else \
            f"after fold {fold}" if fold is not None else "before the first fold"
        rundir.update_marker(out, state=f"stopped by {name} {where.split(':')[0]}")
        rundir.remove_temporaries(out)
        raise TrainingInterrupted(exc.signum, (
            f"stopped by {name} {where}, fold(s) {rundir.folds_text(completed)} kept; {out} is marked incomplete "
            f"({rundir.INCOMPLETE}): run the same command again to resume at fold {todo[0]}"
        )) from None
    except store.DiskSpaceError as exc:
        todo = [f for f in folds_run if f not in completed]
        rundir.update_marker(out, state=f"stopped by a full disk in fold {todo[0]}")
        rundir.remove_temporaries(out)
        raise store.DiskSpaceError(
            f"{exc}; fold(s) {rundir.folds_text(completed)} kept and {out} marked incomplete: free space and run "
            f"the same command again to resume at fold {todo[0]}"
        ) from None
    finally:
        restore_determinism()
    return run_info
