"""`drct predict`: new scans straight from a DICOM folder, with a trained checkpoint.

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


class PredictError(RuntimeError):
    """Inputs `drct predict` refuses; the message says what differs and what to do."""


def check_encoder_provenance(checkpoint_provenance: dict, extract_config: dict, digest: str) -> None:
    """Refuse when the encoder/preprocessing here would not reproduce the checkpoint's features."""
    from pipeline.features.provenance import config_provenance, provenance_differences

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


def predict_folder(
    dicom_dir: str | Path,
    checkpoint: str | Path,
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
    """Run the whole predict pipeline; returns {"predictions": csv path, "n_scans", "reports": summary}."""
    import torch

    from cache.store import FeatureCache
    from pipeline.config import load_config
    from pipeline.data.index import build_scan_index
    from pipeline.features.encoder import load_encoder
    from pipeline.features.extraction import run_extraction
    from pipeline.report.build import ReportSource, display_label, write_reports
    from pipeline.training.checkpoint import load_model
    from pipeline.training.dataset import CachedFeatures
    from pipeline.training.trainer import predict_scans, resolutions

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, config, meta = load_model(checkpoint)
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
                             allow_modalities=(config.get("dataset") or {}).get("allow_modalities"))
    if not index.scans:
        raise PredictError(f"no usable DICOM series under {dicom_dir} ({len(index.rejects)} files rejected)")
    run_extraction(index, config, progress=progress, log=log)
    cache = FeatureCache(out_dir / "features.h5")
    check_encoder_provenance(ckpt_prov, ex, str(cache.provenance.get("weights_digest") or digest))

    res = resolutions(config, cache)
    data = CachedFeatures.from_cache(cache, res["primary"], res["aps"], "cpu")
    scans = np.arange(len(data))
    with torch.inference_mode():
        preds = predict_scans(model, data, scans, int(config["sampler"]["m"]), int(config["train"]["batch_size"]))
    table = cache.table
    labels = [display_label(s, p, show_phi) for s, p in zip(table.scan_id, table.patient_id)]
    csv_path = out_dir / "predictions.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv_safe.writer(handle)
        writer.writerow(["scan", "n_slices", *names])
        for i, label in enumerate(labels):
            writer.writerow([label, int(table.n_slices[i]), *(f"{p:.6f}" for p in preds["prob"][i])])
    np.savez(
        out_dir / "predictions.npz",
        scan=np.asarray(labels, dtype=str),
        prob=preds["prob"].astype(np.float32),
        sample_idx=preds["sample_idx"].astype(np.int64),
        slice_attention=preds["slice_attention"].astype(np.float32),
        feature_attention=preds["feature_attention"].astype(np.float16),
        aps_idx=preds["aps_idx"].astype(np.int64),
    )
    if threshold is None:
        threshold = float((config.get("evaluate") or {}).get("threshold", 0.5))
    (out_dir / "predictions.json").write_text(json.dumps(
        {"checkpoint": str(checkpoint), "label_names": names, "threshold": threshold,
         "scans": [{"scan": label, "prob": dict(zip(names, map(float, preds["prob"][i])))} for i, label in enumerate(labels)]},
        indent=2))
    summary = {"predictions": str(csv_path), "n_scans": len(labels), "rejects": len(index.rejects)}
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
            threshold=threshold,
            cache=cache,
            provenance=provenance,
            info={"checkpoint": str(checkpoint), "model": str(config["model"].get("name")),
                  "predictions": "new scans (no reference labels)", "feature cache": str(cache.path),
                  **{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in provenance.items()}},
        )
        sizes = config.get("report") or load_config(None)["report"]
        summary["reports"] = write_reports(source, out_dir / "reports", show_phi=show_phi, sizes=sizes)
    return summary


@click.command("predict")
@click.argument("dicom_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="A trained fold checkpoint (RUN_DIR/fold_<k>/checkpoint.pt).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--weights", default=None, help="Encoder weights to use instead of the checkpoint's spec (must give the same digest).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N for the encoder.")
@click.option("--workers", type=int, default=0, show_default=True, help="DICOM decoding processes; 0 = in this process.")
@click.option("--threshold", type=float, default=None, help="Decision threshold (default: the checkpoint's evaluate.threshold).")
@click.option("--no-reports", is_flag=True, help="Predictions only, no HTML/PNG reports.")
@click.option("--show-phi", is_flag=True, help="Show patient identifiers in reports and CSV (off by default).")
@click.option("--keep-ids", is_flag=True, help="Keep scan and patient ids verbatim (de-identified data); default: keyed pseudonyms.")
def predict(dicom_dir, checkpoint, out_dir, weights, device, workers, threshold, no_reports, show_phi, keep_ids):
    """Predict new scans from a folder of DICOM series (one scan per SeriesInstanceUID).

    \b
    Writes OUT/features.h5 (feature cache, reused on a rerun), OUT/predictions.csv (one row per
    scan: scan, n_slices, one probability column per class), predictions.json/.npz (with slice
    and feature attention) and OUT/reports/index.html + one report per scan. A checkpoint whose
    encoder provenance (weights digest, resolutions, windows, aps_source, preprocessing) does
    not match the encoder here is refused.
    """
    from cache.store import CacheError
    from pipeline.features.encoder import EncoderError
    from pipeline.report.build import ReportError
    from pipeline.training.checkpoint import CheckpointError

    try:
        summary = predict_folder(dicom_dir, checkpoint, out_dir, weights=weights, device=device, workers=workers,
                                 reports=not no_reports, show_phi=show_phi, threshold=threshold, keep_ids=keep_ids,
                                 log=lambda msg: click.echo(msg, err=True))
    except (PredictError, CheckpointError, CacheError, EncoderError, ReportError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{summary['n_scans']} scans -> {summary['predictions']}")
    if "reports" in summary:
        click.echo(f"reports: {summary['reports']['index']}")
