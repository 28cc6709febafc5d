"""The evaluation of a training run (`drct evaluate`): a short headline and a details file.

* **Headline** (``metrics.json``, the DVC metrics file, one column each in ``dvc exp show``): the
  pooled out-of-fold macro precision, recall, F1, ROC AUC and average precision, each with its 95 %
  patient-bootstrap interval (``<key>_ci_low``, ``<key>_ci_high``), and ``n`` (scans).
* **Details** (``<stem>_details.json`` beside it, which DVC does not read as metrics): the same
  figures per class with intervals, the fold mean and std of every figure, every fold's own
  figures, the primary and APS branches, calibration (reliability bins, ECE, Brier score per class),
  the per-fold training-curve summaries from ``fold_<k>/history.json``, the thresholds, the reader
  evaluation (CQ500) and the comparison with another run. `format_details` prints it.
* **Reliability diagram** (``<stem>_reliability.png``), one panel per class.

Intervals: `pipeline.metrics.bootstrap_intervals` (patients resampled with replacement, 2,000
resamples, seeded). Comparison of two runs on the same scans: `pipeline.metrics.paired_bootstrap`
(paired interval and p-value of the difference) and the paper's paired t-test over folds
(`pipeline.metrics.paired_ttest`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.calibration import (
    calibration_report,
    cross_fitted_thresholds,
    oof_thresholds,
    write_reliability_png,
    write_thresholds,
)
from pipeline.metrics import (
    BOOT_MACRO,
    MACRO_KEYS,
    RESAMPLES,
    bootstrap_intervals,
    cross_validation_metrics,
    json_safe,
    paired_bootstrap,
    paired_ttest,
)
from pipeline.oof import OofError
from pipeline.training.rundir import RunDir, RunError

HEADLINE = ("macro_precision", "macro_recall", "macro_f1", "macro_auc", "macro_ap")
THRESHOLD_SOURCES = ("oof",)


class EvaluationError(ValueError):
    """A run that cannot be evaluated; the message says why and what to do."""


@dataclass
class RunPredictions:
    run_dir: Path
    names: list[str]
    scan_id: np.ndarray
    patient_id: np.ndarray
    fold: np.ndarray
    labels: np.ndarray
    prob: np.ndarray
    prob_primary: np.ndarray
    prob_aps: np.ndarray
    info: dict
    config: dict
    threshold: float = 0.5           # evaluate.threshold of the run's config


def load_run(run_dir: str | Path) -> RunPredictions:
    """RUN_DIR/oof.npz, run.json and config.yaml, checked (`RunDir`, pipeline.oof.read_oof)."""
    run = RunDir(run_dir)
    try:
        info, names = run.run_json, run.label_names
        oof = run.oof(("prob_primary", "prob_aps"))
    except (RunError, OofError) as exc:
        raise EvaluationError(str(exc)) from None
    n = len(oof["scan_id"])
    patients = oof["patient_id"].astype(str) if "patient_id" in oof else oof["scan_id"].astype(str)
    return RunPredictions(run.path, names, oof["scan_id"].astype(str), patients,
                          np.asarray(oof["fold"]), np.asarray(oof["labels"], np.float64),
                          np.asarray(oof["prob"], np.float64), np.asarray(oof["prob_primary"], np.float64),
                          np.asarray(oof["prob_aps"], np.float64).reshape(n, -1), info, run.config, run.threshold)


def training_curves(run_dir: str | Path) -> dict:
    """Per fold, from fold_<k>/history.json: epochs, the last epoch's loss, validation macro-F1 and
    AUC, and the best validation macro-F1 with its epoch (a summary; the curves are dvclive's)."""
    run = RunDir(run_dir)
    out = {}
    for k, folder in run.folds.items():
        history = run.history(k)
        if not history:
            continue
        f1 = [h.get("val_macro_f1") for h in history]
        finite = [(v, h.get("epoch", i + 1)) for i, (v, h) in enumerate(zip(f1, history)) if v is not None and np.isfinite(v)]
        best = max(finite, key=lambda t: t[0]) if finite else (None, None)
        last = history[-1]
        out[folder.name] = {"epochs": len(history), "last_loss": last.get("loss"),
                            "last_val_macro_f1": last.get("val_macro_f1"), "last_val_macro_auc": last.get("val_macro_auc"),
                            "best_val_macro_f1": best[0], "best_epoch": best[1]}
    return out


def _branch(run: RunPredictions, prob: np.ndarray, threshold) -> dict:
    cv = cross_validation_metrics(run.labels, prob, run.fold, run.names, threshold)
    return {k: v for k, v in cv.items() if k.startswith("macro_")}


def evaluate_run(run_dir: str | Path, threshold: float | None = None, threshold_from: str | None = None,
                 resamples: int = RESAMPLES, seed: int = 0, reads: str | Path | None = None,
                 pseudonym_key: str | Path | None = None) -> dict:
    """The details of RUN_DIR's out-of-fold predictions (see the module docstring); `headline()` of
    it is the metrics file. `threshold` (default: evaluate.threshold of the run's config, 0.5) is one
    number for every class; `threshold_from="oof"` picks each class's F1-maximising threshold instead,
    records it in RUN_DIR/thresholds.json for `drct predict`, and scores each fold at the thresholds
    picked on the other folds. `reads`: a CQ500 reads.csv, for the per-reader evaluation."""
    run = load_run(run_dir)
    if threshold_from is not None and threshold_from not in THRESHOLD_SOURCES:
        raise EvaluationError(f"--threshold-from {threshold_from!r}: choose one of {', '.join(THRESHOLD_SOURCES)}")
    if threshold is None:
        threshold = run.threshold
    recorded = None
    if threshold_from == "oof":
        recorded = oof_thresholds(run.labels, run.prob, default=threshold)
        used = cross_fitted_thresholds(run.labels, run.prob, run.fold, default=threshold)
        path = write_thresholds(run.run_dir, run.names, recorded)
        threshold_info = {"source": "oof", "file": str(path), "default": float(threshold),
                          "per_class": dict(zip(run.names, recorded.tolist())),
                          "figures_at": "each fold's scans at the thresholds picked on the other folds (cross-fitted)"}
    else:
        used = float(threshold)
        threshold_info = {"source": "fixed", "value": float(threshold)}
    cv = cross_validation_metrics(run.labels, run.prob, run.fold, run.names, used)
    boot = bootstrap_intervals(run.labels, run.prob, run.patient_id, run.names, used, resamples, seed=seed)
    details: dict = {
        "model": run.info.get("model"), "run": str(run.run_dir), "n": cv["n"], "n_patients": boot["n_patients"],
        "n_folds": cv["n_folds"], "threshold": threshold_info,
        "bootstrap": {"unit": "patient", "resamples": boot["resamples"], "level": boot["level"], "seed": boot["seed"],
                      "interval": "percentile"},
    }
    for key in BOOT_MACRO:
        details[key] = boot[key]
        if key in MACRO_KEYS:
            details[key].update(fold_mean=cv[f"{key}_fold_mean"], fold_std=cv[f"{key}_fold_std"])
    details["classes_left_out"] = cv["classes_left_out"]
    details["folds_leaving_out"] = cv["folds_leaving_out"]
    details["per_class"] = {}
    for name in run.names:
        entry = {"support": cv["per_class"][name]["support"]}
        for key, figure in boot["per_class"][name].items():
            entry[key] = dict(figure)
            if f"{key}_fold_mean" in cv["per_class"][name]:
                entry[key].update(fold_mean=cv["per_class"][name][f"{key}_fold_mean"],
                                  fold_std=cv["per_class"][name][f"{key}_fold_std"])
        if recorded is not None:
            entry["threshold"] = float(recorded[run.names.index(name)])
        details["per_class"][name] = entry
    details["per_fold"] = [{k: v for k, v in f.items()} for f in cv["per_fold"]]
    details["primary"] = _branch(run, run.prob_primary, used)
    if np.isfinite(run.prob_aps).all() and run.prob_aps.shape == run.prob.shape:
        details["aps"] = _branch(run, run.prob_aps, used)
    details["calibration"] = calibration_report(run.labels, run.prob, run.names)
    details["training_curves"] = training_curves(run.run_dir)
    if reads is not None:
        from pipeline.readers import reader_evaluation

        details["readers"] = reader_evaluation(run, reads, used if np.ndim(used) < 2 else recorded, pseudonym_key)
    return details


def headline(details: dict) -> dict:
    """The metrics file: HEADLINE figures with their intervals, plus n."""
    out: dict = {}
    for key in HEADLINE:
        out[key] = details[key]["value"]
        out[f"{key}_ci_low"] = details[key]["ci_low"]
        out[f"{key}_ci_high"] = details[key]["ci_high"]
    out["n"] = details["n"]
    return out


def compare_runs(run_a: str | Path, run_b: str | Path, details_a: dict, details_b: dict,
                 resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """RUN_A minus RUN_B on the same scans: the paired patient bootstrap of each headline figure
    (interval and p-value of the difference) and the paired t-test over folds of each macro figure."""
    a, b = load_run(run_a), load_run(run_b)
    if set(a.scan_id) != set(b.scan_id):
        only_a, only_b = len(set(a.scan_id) - set(b.scan_id)), len(set(b.scan_id) - set(a.scan_id))
        raise EvaluationError(f"the runs were not scored on the same scans ({only_a} only in {run_a}, {only_b} only in "
                              f"{run_b}): a paired comparison needs the same cache")
    order = {s: i for i, s in enumerate(b.scan_id)}
    rows_b = np.array([order[s] for s in a.scan_id])
    if not np.array_equal(np.nan_to_num(a.labels, nan=-1), np.nan_to_num(b.labels[rows_b], nan=-1)):
        raise EvaluationError("the runs' labels differ on the same scans: not the same cache or label file")
    threshold_a, threshold_b = _thresholds_used(a, details_a), _thresholds_used(b, details_b)
    if np.ndim(threshold_b) == 2:
        threshold_b = threshold_b[rows_b]
    same = np.array_equal(np.broadcast_to(threshold_a, a.prob.shape), np.broadcast_to(threshold_b, a.prob.shape))
    boot = paired_bootstrap((a.labels, a.prob), (b.labels[rows_b], b.prob[rows_b]), a.patient_id, threshold_a,
                            resamples=resamples, seed=seed, threshold_b=threshold_b)
    threshold_note = "both runs at the same thresholds" if same else "each run at its own thresholds"
    tests = {}
    for key in MACRO_KEYS:
        try:
            tests[key] = paired_ttest(details_a, details_b, key)
        except ValueError as exc:
            raise EvaluationError(f"cannot compare {run_a} with {run_b}: {exc}") from None
    return {"other_run": str(run_b), "thresholds": threshold_note,
            "paired_bootstrap": boot, "fold_ttest": tests}


def _thresholds_used(run: RunPredictions, details: dict):
    info = details["threshold"]
    if info["source"] == "fixed":
        return float(info["value"])
    return cross_fitted_thresholds(run.labels, run.prob, run.fold, default=info["default"])


def write_evaluation(details: dict, out_path: str | Path) -> dict[str, Path]:
    """OUT (the headline), OUT_details.json and OUT_reliability.png; returns the three paths."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out_path, "details": details_path(out_path), "reliability": reliability_path(out_path)}
    out_path.write_text(json.dumps(json_safe(headline(details)), indent=1))
    paths["details"].write_text(json.dumps(json_safe(details), indent=1))
    write_reliability_png(details["calibration"], paths["reliability"])
    return paths


def details_path(metrics_path: str | Path) -> Path:
    p = Path(metrics_path)
    return p.with_name(f"{p.stem}_details.json")


def reliability_path(metrics_path: str | Path) -> Path:
    p = Path(metrics_path)
    return p.with_name(f"{p.stem}_reliability.png")


def _f(value, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _ci(figure: dict) -> str:
    return f"{_f(figure['value'])} [{_f(figure['ci_low'])}, {_f(figure['ci_high'])}]"


def format_details(details: dict) -> str:
    """The details as text, one screen per section: headline, per class, per fold, calibration,
    training curves, readers, comparison."""
    boot = details["bootstrap"]
    lines = [(f"{details.get('model')}: {details['n']} scans of {details['n_patients']} patients, "
             f"{details['n_folds']} fold(s); pooled out-of-fold, 95 % patient-bootstrap intervals "
             f"({boot['resamples']} resamples, seed {boot['seed']})")]
    t = details["threshold"]
    lines.append(f"threshold: {t['value']:g}" if t["source"] == "fixed" else
                 "thresholds (F1-maximising on out-of-fold, recorded in thresholds.json): "
                 + ", ".join(f"{n} {v:.3f}" for n, v in t["per_class"].items()) + f"; figures: {t['figures_at']}")
    lines.append("")
    lines.append(f"{'':16s} {'value [95% CI]':>24s} {'fold mean +- std':>18s}")
    for key in HEADLINE:
        fig = details[key]
        folds = f"{_f(fig.get('fold_mean'))} +- {_f(fig.get('fold_std'))}" if "fold_mean" in fig else ""
        lines.append(f"{key:16s} {_ci(fig):>24s} {folds:>18s}")
    lines += ["", f"{'class':18s} {'n+':>4s} " + " ".join(f"{k:>22s}" for k in ("precision", "recall", "f1", "auc", "ap"))
              + f" {'ECE':>6s} {'Brier':>6s}"]
    calibration = details["calibration"]["per_class"]
    for name, entry in details["per_class"].items():
        cal = calibration.get(name, {})
        lines.append(f"{name:18s} {entry['support']:4d} " + " ".join(f"{_ci(entry[k]):>22s}" for k in ("precision", "recall", "f1", "auc", "ap"))
                     + f" {_f(cal.get('ece')):>6s} {_f(cal.get('brier')):>6s}")
    lines.append(f"macro ECE {_f(details['calibration']['macro_ece'])}, macro Brier {_f(details['calibration']['macro_brier'])}")
    lines += ["", "fold  scans  macro_f1 macro_auc  (left out: classes without positives)"]
    for f in details["per_fold"]:
        lines.append(f"{f['fold']:4d} {f['n']:6d} {_f(f['macro_f1']):>9s} {_f(f['macro_auc']):>9s}"
                     + (f"  ({', '.join(f['classes_left_out'])})" if f["classes_left_out"] else ""))
    for branch in ("primary", "aps"):
        if branch in details:
            b = details[branch]
            lines.append(f"{branch} branch: macro_f1 {_f(b['macro_f1'])}, macro_auc {_f(b['macro_auc'])}")
    if details.get("training_curves"):
        lines += ["", "fold    epochs last_loss last_val_f1 best_val_f1 (epoch)"]
        for name, c in details["training_curves"].items():
            lines.append(f"{name:8s} {c['epochs']:5d} {_f(c['last_loss'], 4):>9s} {_f(c['last_val_macro_f1']):>11s} "
                         f"{_f(c['best_val_macro_f1']):>11s} ({c['best_epoch']})")
    if "readers" in details:
        from pipeline.readers import format_readers

        lines += ["", format_readers(details["readers"])]
    if "compare" in details:
        c = details["compare"]
        lines += ["", (f"compared with {c['other_run']} ({c['thresholds']}): difference this - other, "
                      f"paired patient bootstrap ({c['paired_bootstrap']['resamples']} resamples) and paired t-test over folds")]
        for key in HEADLINE:
            d = c["paired_bootstrap"]["metrics"][key]
            line = (f"{key:16s} {_f(d['difference']):>7s} [{_f(d['ci_low'])}, {_f(d['ci_high'])}] "
                    f"bootstrap p={d['pvalue']:.4g}")
            if key in c["fold_ttest"]:
                test = c["fold_ttest"][key]
                line += f"; folds {len(test['folds'])}: diff {_f(test['mean_difference'])}, t={_f(test['statistic'])}, p={test['pvalue']:.4g}"
            lines.append(line)
    return "\n".join(lines)
