"""`drct predict`: new scans straight from a DICOM folder, with a trained checkpoint.

`--run RUN_DIR` predicts with the ensemble of the run's fold models (mean of their
probabilities); `--checkpoint` with one of them.

DICOM folder (one scan per SeriesInstanceUID, no labels) -> feature cache OUT/features.h5 made
with the checkpoint's own extract settings (reused when run again: extraction resumes/skips
finished scans) -> predictions (predictions.csv, predictions.npz) -> per-scan reports.

A head only makes sense on vectors of the encoder it was trained on, so the checkpoint's
recorded provenance (encoder weights digest, resolutions, windows, aps_source, preprocessing
version) is compared with what the encoder here produces, before and after extraction, and a
mismatch is refused with the differing fields named.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import click
import numpy as np

from cache import csv_safe
from stages.options import StageError, progress_option


class PredictError(RuntimeError):
    """Inputs `drct predict` refuses; the message says what differs and what to do."""


def check_encoder_provenance(checkpoint_provenance: dict, extract_config: dict, digest: str) -> None:
    """Refuse when the encoder/preprocessing here would not reproduce the checkpoint's features."""
    from cache.provenance import config_provenance, provenance_differences

    differences = provenance_differences(checkpoint_provenance, config_provenance(extract_config))
    want = checkpoint_provenance.get("weights_digest")
    if want and digest != want:
        differences.append(f"weights_digest: checkpoint has {str(want)[:16]}..., the encoder here gives {digest[:16]}...")
    if differences:
        raise PredictError(
            "the checkpoint was trained on features of another encoder or preprocessing: "
            + "; ".join(d.replace("cache has", "checkpoint has").replace("config wants", "here") for d in differences)
            + ". Use the weights file the model was trained with (--weights) or a matching checkpoint."
        )


def run_checkpoints(run_dir: str | Path, allow_partial: bool = False) -> list[Path]:
    """The fold checkpoints of a `drct train` run directory, in fold order. An incomplete run (stopped,
    killed or still training; or a fold checkpoint missing) is refused naming the missing folds unless
    `allow_partial`, and a mixed one always (`pipeline.training.rundir.RunDir.checkpoints`)."""
    from pipeline.training.rundir import RunDir, RunError

    try:
        return RunDir(run_dir).checkpoints(allow_partial)
    except RunError as exc:
        raise PredictError(str(exc)) from None


def load_ensemble(checkpoints: list[Path]):
    """[(model, config, meta)] of the checkpoints; all must share labels, sampler.m and provenance."""
    from cache.provenance import CHECKED_FIELDS
    from pipeline.training.checkpoint import load_model

    members = [load_model(path) for path in checkpoints]
    _, config0, meta0 = members[0]
    for path, (_, config, meta) in zip(checkpoints[1:], members[1:]):
        if list(meta["label_names"]) != list(meta0["label_names"]):
            raise PredictError(f"{path}: other label names than {checkpoints[0]}")
        if int(config["sampler"]["m"]) != int(config0["sampler"]["m"]):
            raise PredictError(f"{path}: sampler.m differs from {checkpoints[0]}")
        for field in (*CHECKED_FIELDS, "weights_digest"):
            if meta["provenance"].get(field) != meta0["provenance"].get(field):
                raise PredictError(f"{path}: provenance field {field} differs from {checkpoints[0]}")
    return members


def remove_stale_lock(cache_path: Path) -> None:
    """Delete the finished extraction's CACHE.lock (kept by the writer), if no process holds it."""
    import fcntl
    import os

    from cache.writer import lock_path

    lock = lock_path(cache_path)
    if not lock.exists():
        return
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return
    finally:
        try:
            lock.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)


def ensemble_aps_idx(slice_attention: np.ndarray, per_fold: np.ndarray) -> np.ndarray:
    """The zoomed-in slices of a fold ensemble, (B, m_key): the m_key highest positions of the mean
    slice attention (the attention the report shows), in z order; -1 where no member has an APS
    (DrCT1, baselines). Each fold's own choice stays in predictions.npz as aps_idx_per_fold."""
    if (per_fold < 0).all():
        return per_fold[0]
    k = per_fold.shape[-1]
    top = np.argsort(-slice_attention, axis=1, kind="stable")[:, :k]
    return np.sort(top, axis=1).astype(np.int64)


def _study_uid(path: Path) -> str:
    import pydicom

    try:
        return str(pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
                   .get("StudyInstanceUID", ""))
    except Exception:  # noqa: BLE001 - an unreadable header leaves the column empty
        return ""


def _relative_folder(folder: Path, root: Path) -> str:
    """`folder` relative to the DICOM folder: as given (a followed symlinked subfolder keeps its name
    under `root`), else resolved; absolute where it lies outside."""
    import os

    for a, b in ((Path(os.path.abspath(folder)), Path(os.path.abspath(root))), (folder.resolve(), root.resolve())):
        try:
            return str(a.relative_to(b)) or "."
        except ValueError:
            continue
    return str(folder)


def reject_rows(index, cache, *, keep_ids: bool) -> list:
    """Every file and scan left out, as `Reject`s with the cache's ids: the index's rejects (unreadable,
    not CT, too large or small, duplicate positions; "note:" rows for kept scans), then the ones
    met while decoding (bad pixel scaling, undecodable pixels; a scan none of whose slices decoded is
    a row of its own, its folder as the path), which only the cache records (/rejects), so that a rerun
    that reuses the cache lists them too."""
    from cache.writer import read_rejects_tables

    rejects = list(index.rejects)
    if not keep_ids:  # the pseudonyms `run_extraction` gave (the key beside the DICOM folder)
        from pipeline.pseudonym import key_path, load_or_create_key, pseudonymise_index

        rejects = pseudonymise_index(index, load_or_create_key(key_path(index.root, None))).rejects
    decoded, _ = read_rejects_tables(cache.file, with_index=False, data_root=cache.attrs.get("data_root") or None)
    return rejects + decoded


def predict_folder(
    dicom_dir: str | Path,
    checkpoint: str | Path | list,
    out_dir: str | Path,
    *,
    weights: str | None = None,
    device: str = "auto",
    workers: int = 0,
    reports: bool = True,
    show_phi: bool = False,
    threshold: float | None = None,
    keep_ids: bool = False,
    progress: bool = False,
    log=print,
) -> dict:
    """Run the whole predict pipeline; returns {"predictions": csv path, "n_scans", "reports": summary}.

    `checkpoint`: one checkpoint, or a list (a run's folds): the prediction is then the ensemble,
    the mean of the members' probabilities (and of their slice and feature attentions, which are
    over the same deterministic slice sample)."""
    import torch

    from cache.store import FeatureCache
    from pipeline.config import load_config
    from pipeline.data.dicom_io import ImageLimits
    from pipeline.data.index import build_scan_index
    from pipeline.features.encoder import load_encoder
    from pipeline.features.extraction import run_extraction
    from pipeline.oof import write_predictions
    from pipeline.report.build import ReportSource, display_label, recorded_thresholds, write_reports
    from pipeline.report.render import threshold_text
    from pipeline.training.dataset import CachedFeatures
    from pipeline.training.rundir import RunDir
    from pipeline.training.trainer import predict_scans, resolutions

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = [Path(c) for c in checkpoint] if isinstance(checkpoint, (list, tuple)) else [Path(checkpoint)]
    members = load_ensemble(checkpoints)
    _, config, meta = members[0]
    ckpt_prov = dict(meta["provenance"])
    names = list(meta["label_names"])
    config = copy.deepcopy(config)
    ex = config["extract"]
    if weights:
        ex["weights"] = weights
    ex.update({"out": str(out_dir / "features.h5"), "device": device, "workers": int(workers), "scheduler": None})
    # New data: ids pseudonymised with the key beside this DICOM folder, unless --keep-ids.
    config["dataset"] = {**(config.get("dataset") or {}), "keep_ids": bool(keep_ids), "pseudonym_key": None}
    _, digest = load_encoder(ex["weights"])
    check_encoder_provenance(ckpt_prov, ex, digest)

    index = build_scan_index(dicom_dir, "folder", workers=None if workers else 1, progress=progress,
                             allow_modalities=(config.get("dataset") or {}).get("allow_modalities"),
                             limits=ImageLimits.from_config(config.get("dataset")))
    if not index.scans:
        raise PredictError(f"no usable DICOM series under {dicom_dir} ({len(index.rejects)} files rejected)")
    run_extraction(index, config, progress=progress, log=log)
    remove_stale_lock(out_dir / "features.h5")
    cache = FeatureCache(out_dir / "features.h5")
    check_encoder_provenance(ckpt_prov, ex, str(cache.provenance.get("weights_digest") or digest))

    res = resolutions(config, cache)
    data = CachedFeatures.from_cache(cache, res["primary"], res["aps"], "cpu")
    scans = np.arange(len(data))
    outputs = []
    with torch.inference_mode():
        for member, member_config, _ in members:
            outputs.append(predict_scans(member, data, scans, int(member_config["sampler"]["m"]),
                                         int(member_config["train"]["batch_size"])))
    preds = dict(outputs[0])
    for key in ("prob", "slice_attention", "feature_attention"):
        preds[key] = np.mean([np.asarray(o[key], np.float64) for o in outputs], axis=0)
    preds["aps_idx_per_fold"] = np.stack([np.asarray(o["aps_idx"], np.int64) for o in outputs])
    preds["aps_idx"] = ensemble_aps_idx(preds["slice_attention"], preds["aps_idx_per_fold"])
    threshold_source = None
    if threshold is None:  # per-class thresholds recorded by `drct evaluate RUN --threshold-from oof`
        threshold, threshold_source = recorded_thresholds(RunDir(checkpoints[0].parent.parent), names)
        if threshold is not None:
            log(threshold_text(threshold, threshold_source, names))
    if threshold is None:
        threshold = float((config.get("evaluate") or {}).get("threshold", 0.5))
    rejects = reject_rows(index, cache, keep_ids=keep_ids)
    table = cache.table
    labels = [display_label(s, p, show_phi) for s, p in zip(table.scan_id, table.patient_id)]
    root = Path(dicom_dir)
    csv_path = out_dir / "predictions.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv_safe.writer(handle)
        writer.writerow(["scan", "status", "source_folder", "study_uid", "n_slices", *names,
                         *(f"{n}_label" for n in names), "findings", "reason"])
        for i, label in enumerate(labels):
            first = Path(str(table.path[table.rows(i)][0]))
            first = first if first.is_absolute() else Path(cache.attrs.get("data_root") or root) / first
            called = preds["prob"][i] >= threshold
            writer.writerow([label, "predicted", _relative_folder(first.parent, root), _study_uid(first), int(table.n_slices[i]),
                             *(f"{p:.6f}" for p in preds["prob"][i]), *(int(c) for c in called),
                             ";".join(n for n, c in zip(names, called) if c), ""])
        shown = dict(zip(np.asarray(table.scan_id).astype(str), labels))
        for reject in rejects:
            path = Path(reject.path)
            folder, reason = (path, reject.reason) if path.is_dir() else (path.parent, f"{path.name}: {reject.reason}")
            scan = shown.get(reject.scan_id) or (display_label(reject.scan_id, "", show_phi) if reject.scan_id else "")
            writer.writerow([scan, "note" if reject.reason.startswith("note:") else "rejected",
                             _relative_folder(folder, root), "", "", *([""] * len(names)), *([""] * len(names)), "",
                             reason])
    write_predictions(out_dir / "predictions.npz", {"scan": np.asarray(labels, dtype=str)},
                      {key: preds[key] for key in ("prob", "sample_idx", "slice_attention", "feature_attention",
                                                   "aps_idx", "aps_idx_per_fold")})
    (out_dir / "predictions.json").write_text(json.dumps(
        {"checkpoints": [str(c) for c in checkpoints], "ensemble": "mean of the fold probabilities" if len(checkpoints) > 1
         else "single checkpoint", "label_names": names,
         "threshold": threshold if np.ndim(threshold) == 0 else dict(zip(names, map(float, threshold))),
         "scans": [{"scan": label, "prob": dict(zip(names, map(float, preds["prob"][i])))} for i, label in enumerate(labels)]},
        indent=2))
    summary = {"predictions": str(csv_path), "n_scans": len(labels),
               "rejects": sum(not r.reason.startswith("note:") for r in rejects)}
    if reports:
        provenance = {**dict(cache.provenance), "weights_digest": cache.provenance.get("weights_digest") or digest}
        source = ReportSource(
            scan_id=np.asarray(table.scan_id).astype(str),
            patient_id=np.asarray(table.patient_id).astype(str),
            prob=preds["prob"].astype(np.float64),
            sample_idx=preds["sample_idx"],
            slice_attention=preds["slice_attention"].astype(np.float64),
            feature_attention=preds["feature_attention"].astype(np.float32),
            label_names=names,
            threshold=threshold,  # the pages call findings as predictions.csv does
            threshold_source=threshold_source,
            cache=cache,
            provenance=provenance,
            info={"checkpoints": ", ".join(str(c) for c in checkpoints),
                  "ensemble": f"mean of {len(checkpoints)} fold models" if len(checkpoints) > 1 else "one checkpoint",
                  "model": str(config["model"].get("name")),
                  "predictions": "new scans (no reference labels)", "feature cache": str(cache.path),
                  **{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in provenance.items()}},
        )
        sizes = config.get("report") or load_config(None)["report"]
        summary["reports"] = write_reports(source, out_dir / "reports", show_phi=show_phi, sizes=sizes)
    return summary


@click.command("predict")
@click.argument("dicom_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--run", "run_dir", type=click.Path(file_okay=False), default=None,
              help="A `drct train` run directory: predict with the ensemble of its fold checkpoints (mean probability).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Or one fold checkpoint (RUN_DIR/fold_<k>/checkpoint.pt) alone.")
@click.option("--allow-partial", is_flag=True,
              help="With --run: use an incomplete run (stopped before its last fold) with its finished folds.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--weights", default=None, help="Encoder weights to use instead of the checkpoint's spec, e.g. a local "
                                              "vgg16 .pth on an offline machine (must give the same digest).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N for the encoder.")
@click.option("--workers", type=int, default=0, show_default=True, help="DICOM decoding processes; 0 = in this process.")
@click.option("--threshold", type=float, default=None, help="Decision threshold (default: the checkpoint's evaluate.threshold).")
@click.option("--no-reports", is_flag=True, help="Predictions only, no HTML/PNG reports.")
@click.option("--show-phi", is_flag=True, help="Show patient identifiers in reports and CSV (off by default).")
@progress_option
@click.option("--keep-ids", is_flag=True, help="Keep scan and patient ids verbatim (de-identified data); default: keyed pseudonyms.")
def predict(dicom_dir, run_dir, checkpoint, allow_partial, out_dir, weights, device, workers, threshold, no_reports,
            show_phi, progress, keep_ids):
    """Predict new scans from a folder of DICOM series (one scan per SeriesInstanceUID).

    \b
    With --run RUN_DIR the prediction is the ensemble of the run's fold models: the mean of
    their probabilities (and attentions); with --checkpoint, that one model. Writes
    OUT/features.h5 (feature cache, reused on a rerun), OUT/predictions.csv (one row per scan:
    scan, status=predicted, source_folder (relative to DICOM_DIR), study_uid, n_slices, one
    probability column per class, <class>_label 0/1 at the threshold, findings; then one row
    per file or scan left out, at indexing or while decoding: status=rejected and the reason,
    or status=note for a remark on a kept scan), predictions.json/.npz (with slice and
    feature attention) and OUT/reports/index.html + one report per scan. A checkpoint whose
    encoder provenance (weights digest, resolutions, windows, aps_source, preprocessing) does
    not match the encoder here is refused, and so is an incomplete run (RUN_DIR/incomplete.json:
    stopped before its last fold; the missing folds are named) unless --allow-partial, or a run
    whose fold checkpoints differ in model, label names or extraction settings.
    """
    from cache.store import CacheError
    from pipeline.features.encoder import EncoderError
    from pipeline.report.build import ReportError
    from pipeline.training.checkpoint import CheckpointError

    if bool(run_dir) == bool(checkpoint):
        raise StageError("give --run RUN_DIR (fold ensemble) or --checkpoint CKPT (one model)")
    try:
        checkpoints = run_checkpoints(run_dir, allow_partial) if run_dir else checkpoint
        summary = predict_folder(dicom_dir, checkpoints, out_dir, weights=weights, device=device, workers=workers,
                                 reports=not no_reports, show_phi=show_phi, threshold=threshold, progress=progress,
                                 keep_ids=keep_ids,
                                 log=lambda msg: click.echo(msg, err=True))
    except (PredictError, CheckpointError, CacheError, EncoderError, ReportError, FileNotFoundError, ValueError) as exc:
        raise StageError(str(exc)) from None
    click.echo(f"{summary['n_scans']} scans ({summary['rejects']} files or scans rejected) -> {summary['predictions']}")
    if "reports" in summary:
        click.echo(f"reports: {summary['reports']['index']}")
