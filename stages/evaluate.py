"""`drct evaluate`: metrics of a training run's out-of-fold predictions."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from pipeline.metrics import cross_validation_metrics, json_safe, paired_ttest
from pipeline.oof import REQUIRED, OofError, read_oof
from pipeline.training.rundir import RunError, check_run


class StageError(click.ClickException):
    exit_code = 2


def evaluate_run(run_dir: str | Path, threshold: float | None = None, allow_partial: bool = False) -> dict:
    """Metrics of RUN_DIR/oof.npz (see `pipeline.metrics.cross_validation_metrics`): pooled
    out-of-fold macro P/R/F1/AUC with the fold mean and std beside them, per class, per fold.
    An incomplete or mixed run is refused (`pipeline.training.rundir.check_run`)."""
    run_dir = Path(run_dir)
    try:
        state = check_run(run_dir, allow_partial=allow_partial)
    except RunError as exc:
        raise StageError(str(exc)) from None
    oof_path, run_path = run_dir / "oof.npz", run_dir / "run.json"
    for path in (oof_path, run_path):
        if not path.is_file():
            raise StageError(f"{path} not found: is {run_dir} a `drct train` run directory?")
    info = json.loads(run_path.read_text())
    if threshold is None:
        import yaml

        config_path = run_dir / "config.yaml"
        config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
        threshold = float(((config or {}).get("evaluate") or {}).get("threshold", 0.5))
    try:
        oof = read_oof(oof_path, (*REQUIRED, "prob_primary", "prob_aps"))
    except OofError as exc:
        raise StageError(str(exc)) from None
    labels, prob, fold = oof["labels"], oof["prob"], oof["fold"]
    prob_primary, prob_aps = oof["prob_primary"], oof["prob_aps"]
    names = list(info["label_names"])
    metrics = cross_validation_metrics(labels, prob, fold, names, threshold)
    metrics["model"] = info.get("model")
    if state.partial:
        metrics["missing_folds"] = state.missing
    metrics["primary"] = {
        k: v for k, v in cross_validation_metrics(labels, prob_primary, fold, names, threshold).items()
        if k.startswith("macro_")
    }
    if np.isfinite(prob_aps).all():
        metrics["aps"] = {
            k: v for k, v in cross_validation_metrics(labels, prob_aps, fold, names, threshold).items()
            if k.startswith("macro_")
        }
    return metrics


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--compare", "other", type=click.Path(file_okay=False), default=None,
              help="Another run directory (same folds): add a paired t-test across folds to the JSON.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None,
              help="Decision threshold [evaluate.threshold of the run's config; 0.5 is our default, the paper states none].")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Metrics file [default: RUN_DIR/metrics.json].")
@click.option("--allow-partial", is_flag=True,
              help="Evaluate an incomplete run (stopped before its last fold) on its finished folds.")
def evaluate(run_dir, other, threshold, out_path, allow_partial):
    """Write RUN_DIR/metrics.json from RUN_DIR/oof.npz.

    \b
    macro_f1, macro_precision, macro_recall, macro_auc: the headline, computed over all
    out-of-fold predictions pooled (every scan predicted once, by the fold that held it out);
    beside each, *_fold_mean and *_fold_std (mean and sample std of the per-fold figures).
    A macro average leaves out classes without a positive scan in the evaluated set
    (classes_left_out; folds_leaving_out names the folds that lacked a class).
    per_class {name: {precision, recall, f1, auc, support, *_fold_mean, *_fold_std}}; per_fold;
    primary/aps: the branches' own macro figures, same definitions.
    With --compare OTHER: paired t-tests (scipy ttest_rel) across folds of each macro metric,
    RUN_DIR minus OTHER (how the paper compares DrCT1 and DrCT2).
    """
    metrics = evaluate_run(run_dir, threshold, allow_partial)
    if metrics.get("missing_folds") is not None:
        click.echo(f"partial run: fold(s) {', '.join(map(str, metrics['missing_folds']))} missing; "
                   "metrics over the finished folds only", err=True)
    if other:
        other_metrics = evaluate_run(other, threshold, allow_partial)
        try:
            metrics["compare"] = {
                "other_run": str(other),
                "tests": {key: paired_ttest(metrics, other_metrics, key) for key in ("macro_f1", "macro_precision", "macro_recall", "macro_auc")},
            }
        except ValueError as exc:
            raise StageError(f"cannot compare {run_dir} with {other}: {exc}") from None
    path = Path(out_path) if out_path else Path(run_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(metrics), indent=1))
    click.echo(
        f"{metrics.get('model')}: pooled out-of-fold macro-F1 {metrics['macro_f1']:.4f} "
        f"(fold mean {metrics['macro_f1_fold_mean']:.4f} +- {metrics['macro_f1_fold_std']:.4f}), "
        f"precision {metrics['macro_precision']:.4f}, recall {metrics['macro_recall']:.4f} over {metrics['n_folds']} fold(s) -> {path}"
    )
    if metrics["folds_leaving_out"]:
        left = "; ".join(f"{name} in fold(s) {', '.join(map(str, folds))}" for name, folds in metrics["folds_leaving_out"].items())
        click.echo(f"classes without positives, left out of those folds' macro averages: {left}")
    if "compare" in metrics:
        test = metrics["compare"]["tests"]["macro_f1"]
        click.echo(f"paired t-test macro-F1 vs {other}: diff {test['mean_difference']:+.4f}, t={test['statistic']:.3f}, p={test['pvalue']:.4g}")
