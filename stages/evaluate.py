"""`drct evaluate`: metrics of a training run's out-of-fold predictions (pipeline/evaluation.py)."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.evaluation import (
    THRESHOLD_SOURCES,
    EvaluationError,
    compare_runs,
    format_details,
    write_evaluation,
)
from pipeline.evaluation import evaluate_run as _evaluate_run
from pipeline.metrics import RESAMPLES
from pipeline.training.rundir import RunDir, RunError
from stages.options import StageError


def evaluate_run(run_dir: str | Path, threshold: float | None = None, allow_partial: bool = False, **options) -> dict:
    """The details of RUN_DIR (`pipeline.evaluation.evaluate_run`); an incomplete or mixed run is
    refused (`pipeline.training.rundir.RunDir.check`) unless `allow_partial`."""
    try:
        state = RunDir(run_dir).check(allow_partial=allow_partial)
        details = _evaluate_run(run_dir, threshold, **options)
    except (RunError, EvaluationError, ValueError, OSError) as exc:
        raise StageError(str(exc)) from None
    if state.partial:
        details["missing_folds"] = state.missing
    return details


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--compare", "other", type=click.Path(file_okay=False), default=None,
              help="Another run on the same cache and folds: paired patient-bootstrap interval and p-value of each "
                   "headline difference, and the paired t-test over folds (the paper's test).")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None,
              help="Decision threshold for every class [evaluate.threshold of the run's config; 0.5 is our default, "
                   "the paper states none].")
@click.option("--threshold-from", "threshold_from", type=click.Choice(THRESHOLD_SOURCES), default=None,
              help="oof: per class, the threshold maximising F1 on the out-of-fold predictions, recorded in "
                   "RUN_DIR/thresholds.json (drct predict then uses it); the figures score each fold at the "
                   "thresholds picked on the other folds.")
@click.option("--reads", type=click.Path(dir_okay=False, exists=True), default=None,
              help="CQ500 reads.csv: every figure against each reader (R1, R2, R3) and the majority, with the "
                   "readers' agreement (Cohen's and Fleiss' kappa) as the ceiling.")
@click.option("--pseudonym-key", type=click.Path(dir_okay=False, exists=True), default=None,
              help="With --reads on a run with pseudonymised ids: the key file [default: beside reads.csv].")
@click.option("--resamples", type=click.IntRange(min=100), default=RESAMPLES, show_default=True,
              help="Patient-bootstrap resamples.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Metrics file [default: RUN_DIR/metrics.json]; the details and the reliability diagram go beside it.")
@click.option("--allow-partial", is_flag=True,
              help="Evaluate an incomplete run (stopped before its last fold) on its finished folds.")
def evaluate(run_dir, other, threshold, threshold_from, reads, pseudonym_key, resamples, seed, out_path, allow_partial):
    """Evaluate RUN_DIR/oof.npz: the headline to RUN_DIR/metrics.json, everything else beside it.

    \b
    metrics.json (what `dvc exp show` lists): pooled out-of-fold macro_precision, macro_recall,
    macro_f1, macro_auc, macro_ap, each with its 95 % patient-bootstrap interval
    (<key>_ci_low, <key>_ci_high; 2,000 resamples of patients, seeded), and n.
    metrics_details.json: the same per class, fold mean and std, every fold, the primary and APS
    branches, calibration (ECE, Brier score, reliability bins per class), training-curve
    summaries, thresholds, readers (--reads) and the comparison (--compare); printed below.
    metrics_reliability.png: the reliability diagram, one panel per class.
    A macro average leaves out classes without a positive scan in the evaluated set.
    """
    options = {"threshold_from": threshold_from, "resamples": resamples, "seed": seed, "reads": reads,
               "pseudonym_key": pseudonym_key}
    details = evaluate_run(run_dir, threshold, allow_partial, **options)
    if details.get("missing_folds") is not None:
        click.echo(f"partial run: fold(s) {', '.join(map(str, details['missing_folds']))} missing; "
                   "metrics over the finished folds only", err=True)
    if other:
        other_details = evaluate_run(other, threshold, allow_partial, **{**options, "threshold_from": None, "reads": None})
        try:
            details["compare"] = compare_runs(run_dir, other, details, other_details, resamples, seed)
        except (EvaluationError, ValueError) as exc:
            raise StageError(f"cannot compare {run_dir} with {other}: {exc}") from None
    paths = write_evaluation(details, Path(out_path) if out_path else Path(run_dir) / "metrics.json")
    click.echo(format_details(details))
    if details["folds_leaving_out"]:
        left = "; ".join(f"{name} in fold(s) {', '.join(map(str, folds))}" for name, folds in details["folds_leaving_out"].items())
        click.echo(f"classes without positives, left out of those folds' macro averages: {left}")
    click.echo(f"headline -> {paths['metrics']}; details -> {paths['details']}; reliability diagram -> {paths['reliability']}")
