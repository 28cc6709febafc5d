"""MODEL_CARD.md, written into every run directory by `drct train`: what the model was trained on,
how it was validated, what it scored, what it is for and what it must not be used for.

A run directory travels (to `drct predict`, to a colleague); the card makes it self-describing
without the repository. Facts only come from the run (config, cache provenance, per-fold history,
out-of-fold predictions); the limits section adds warnings the facts imply (random encoder,
few scans, synthetic phantom data).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.training.atomic import atomic_write_text

INTENDED_USE = (
    "Research and reproduction of DrCT2 (weakly supervised brain-CT classification with zoom-in attention); "
    "as decision support, a second look that points a radiologist to slices. Not a medical device, "
    "not validated for clinical use, never a diagnosis on its own."
)


def _fmt(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{float(value):.4f}"


def limits(config: dict, info: dict) -> list[str]:
    """Warnings implied by the run's own facts."""
    notes = []
    weights = str((info.get("provenance") or {}).get("weights", ""))
    if weights.startswith("random:"):
        notes.append(f"The image encoder is an untrained VGG16 ({weights}): the model has not learned usable "
                     "features; its outputs are not evidence of disease (a pipeline demo).")
    layout = str((info.get("provenance") or {}).get("layout") or info.get("layout") or "")
    if "phantom" in str(info.get("cache", "")) or "phantom" in layout:
        notes.append("Trained on the synthetic phantom, not on patient data.")
    if int(info.get("n_scans", 0)) < 200:
        notes.append(f"Only {info.get('n_scans')} labelled scans: the metrics have wide uncertainty (see the std over folds).")
    if int(config["train"]["epochs"]) < 20:
        notes.append(f"{config['train']['epochs']} epochs per fold (the paper trains 100).")
    notes += [
        ("Validated by patient-grouped cross-validation on one dataset only; performance on other scanners, "
        "protocols or populations is unknown."),
        ("Classes and labels are those of the training data (RSNA subtypes or CQ500 reads); anything else "
        "(stroke, tumour, artefacts) is out of scope."),
        "Slice attention and activation maps show what the model used, not a lesion outline.",
    ]
    return notes


def calibration_lines(labels: np.ndarray, prob: np.ndarray, names: list[str]) -> list[str]:
    """The card's calibration table: expected calibration error and Brier score per class of the
    out-of-fold probabilities (pipeline/calibration.py; `drct evaluate` draws the reliability diagram)."""
    from pipeline.calibration import BINS, calibration_report

    if not len(labels):
        return []
    report = calibration_report(labels, prob, names)
    rows = [f"| {n} | {_fmt(r['ece'])} | {_fmt(r['brier'])} |" for n, r in report["per_class"].items()]
    return [
        "## Calibration",
        (f"Out-of-fold probabilities, {BINS} equal-width bins: expected calibration error (ECE) and Brier score "
         f"per class; macro ECE {_fmt(report['macro_ece'])}, macro Brier {_fmt(report['macro_brier'])}. "
         "`drct evaluate` draws the reliability diagram (metrics_reliability.png)."),
        "",
        "| class | ECE | Brier |",
        "| --- | --- | --- |",
        *rows,
    ]


def write_model_card(out_dir: str | Path, config: dict, info: dict, histories: dict[int, list[dict]],
                     labels: np.ndarray, prob: np.ndarray, fold: np.ndarray, threshold: float | None = None) -> Path:
    """Write OUT/MODEL_CARD.md from the run's config, run.json content, per-fold histories and
    out-of-fold labels/probabilities; returns its path."""
    from pipeline.metrics import classification_metrics

    out = Path(out_dir)
    names = list(info["label_names"])
    threshold = float(threshold if threshold is not None else (config.get("evaluate") or {}).get("threshold", 0.5))
    prov = info.get("provenance") or {}
    known = ~np.isnan(labels)
    prevalence = [f"{n} {int(np.nansum(labels[:, c]))}/{int(known[:, c].sum())}" for c, n in enumerate(names)]
    pooled = classification_metrics(labels, prob, names, threshold) if len(labels) else {}
    per_fold = []
    for k in sorted(histories):
        last = histories[k][-1] if histories[k] else {}
        per_fold.append(f"| {k} | {int((fold == k).sum())} | {_fmt(last.get('loss'))} | {_fmt(last.get('val_macro_f1'))} "
                        f"| {_fmt(last.get('val_macro_auc'))} |")
    m = config["model"]
    t = config["train"]
    lines = [
        f"# Model card: {info['model']} run",
        "",
        "Written by `drct train` with the run; `drct evaluate` adds metrics.json, `drct report` the per-scan pages.",
        "",
        "## Model",
        (f"- {info['model']} heads (DrCT2 paper: feature attention, BiGRU, slice attention"
        f"{', APS zoom-in on m_key slices and knowledge fusion' if info['model'] == 'drct2' else ''}) on cached VGG16 vectors"),
        (f"- m = {info['m']} sampled slices, m_key = {m['m_key']} ({m.get('aps_selection', 'attention')} selection), "
        f"loss {t['loss']}, {'AdamW' if float(t.get('weight_decay') or 0) else 'Adam'} lr {t['lr_primary']}/{t['lr_aps']}/{t['lr_fusion']}, {t['epochs']} epochs, batch {t['batch_size']}"),
        f"- prediction for new scans: `drct predict DICOM_DIR --run {out}` = mean probability of the {len(histories)} fold models",
        "",
        "## How this model departs from the paper",
        *([f"- {d['item']}: paper {d['paper']}; here {d['here']}" for d in info.get("departures_from_paper", [])]
          or ["- none: the paper's settings (the `drct2_paper` preset)"]),
        "",
        "## Data",
        f"- feature cache: `{info['cache']}` ({info['n_scans']} labelled scans)",
        (f"- encoder: {prov.get('encoder', 'vgg16')} weights `{prov.get('weights')}` (digest {str(prov.get('weights_digest'))[:16]}...), "
        f"resolutions {prov.get('resolutions')}, windows {prov.get('windows')}, APS input {prov.get('aps_source')}"),
        f"- classes (positive/known scans): {', '.join(prevalence)}",
        "",
        "## Validation",
        f"- {info['folds']}-fold cross-validation grouped by patient (seed {info['seed']}); folds run: {info['folds_run']}",
        ("- every scan is scored by the fold model that did not train on it (out-of-fold); the checkpoint of a "
        "fold is its last epoch (no selection on the validation fold)"),
        "",
        "| fold | validation scans | last train loss | validation macro-F1 | validation macro-AUC |",
        "| --- | --- | --- | --- | --- |",
        *per_fold,
        "",
        (f"Out-of-fold, all folds pooled, threshold {threshold:g}: macro-F1 {_fmt(pooled.get('macro_f1'))}, "
        f"macro precision {_fmt(pooled.get('macro_precision'))}, macro recall {_fmt(pooled.get('macro_recall'))}, "
        f"macro-AUC {_fmt(pooled.get('macro_auc'))}."),
        "",
        *calibration_lines(labels, prob, names),
        "",
        "## Intended use",
        INTENDED_USE,
        "",
        "## Limits",
        *[f"- {note}" for note in limits(config, info)],
        "",
    ]
    path = out / "MODEL_CARD.md"
    atomic_write_text(path, "\n".join(lines))
    return path
