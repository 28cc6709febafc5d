"""`drct evaluate`: metrics of a training run's out-of-fold predictions."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from pipeline.metrics import cross_validation_metrics, json_safe, paired_ttest
from pipeline.oof import REQUIRED, OofError, read_oof


class StageError(click.ClickException):
    exit_code = 2


def evaluate_run(run_dir: str | Path, threshold: float | None = None) -> dict:
    """Metrics of RUN_DIR/oof.npz: macro P/R/F1/AUC as mean and std over folds, per class, per fold."""
    run_dir = Path(run_dir)
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
              help="Decision threshold [evaluate.threshold of the run's config, paper 0.5].")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Metrics file [default: RUN_DIR/metrics.json].")
def evaluate(run_dir, other, threshold, out_path):
    """Write RUN_DIR/metrics.json from RUN_DIR/oof.npz.

    \b
    macro_f1, macro_precision, macro_recall, macro_auc: mean over folds, plus *_std
    (sample std over folds); per_class {name: {precision, recall, f1, auc}}; per_fold; pooled
    (all out-of-fold predictions together); primary/aps: the branches' own macro figures.
    With --compare OTHER: paired t-tests (scipy ttest_rel) across folds of each macro metric,
    RUN_DIR minus OTHER (how the paper compares DrCT1 and DrCT2).
    """
    metrics = evaluate_run(run_dir, threshold)
    if other:
        other_metrics = evaluate_run(other, threshold)
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
        f"{metrics.get('model')}: macro-F1 {metrics['macro_f1']:.4f} +- {metrics['macro_f1_std'] if metrics['n_folds'] > 1 else float('nan'):.4f}, "
        f"precision {metrics['macro_precision']:.4f}, recall {metrics['macro_recall']:.4f} over {metrics['n_folds']} fold(s) -> {path}"
    )
    if "compare" in metrics:
        test = metrics["compare"]["tests"]["macro_f1"]
        click.echo(f"paired t-test macro-F1 vs {other}: diff {test['mean_difference']:+.4f}, t={test['statistic']:.3f}, p={test['pvalue']:.4g}")
