"""`drct interpret`: the interpretability evaluation of a trained run (paper IV, VI.A.4; Figs. 5-7).

Writes RUN_DIR/interpret.json (Algorithm 1 tasks with scan counts as in Table 5, per-disease
key-slice accuracy as in Table 6, the Fig. 7 histogram) and RUN_DIR/plots/*.csv (for
`dvc plots`) and *.png. With --sweep RUN_DIR..., also the Fig. 6 m_key sweep over runs trained
with different model.m_key / model.aps_selection (train them with `drct train -s model.m_key=N`).
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from pipeline.metrics import json_safe
from pipeline.oof import check_sample_idx
from pipeline.sweep import SELECTIONS, SweepError, macro_f1, parse_m_keys, run_sweep
from pipeline.training.rundir import OOF, RUN_JSON, RunDir, RunError
from stages.options import StageError, set_option


def _run_meta(run_dir: Path, allow_partial: bool = False) -> tuple[dict, dict]:
    """run.json and config.yaml of a run (`RunDir`); an incomplete or mixed run is refused
    (`RunDir.check`)."""
    run = _checked_run(run_dir, allow_partial)
    return run.run_json, run.config


def _checked_run(run_dir: str | Path, allow_partial: bool = False) -> RunDir:
    """The run, checked (`RunDir.check`) and holding run.json and oof.npz."""
    run = RunDir(run_dir)
    try:
        run.check(allow_partial=allow_partial)
        run.require(RUN_JSON, OOF)
        run.run_json  # noqa: B018 - read now: an unreadable run.json is refused here
    except RunError as exc:
        raise StageError(str(exc)) from None
    return run


def interpret_run(
    run_dir: str | Path, cache_path: str | Path | None = None, k: int = 5, out_dir: str | Path | None = None,
    allow_partial: bool = False,
) -> dict:
    """Compute interpret.json and the plots of one run into `out_dir` (default: the run dir);
    returns the JSON content."""
    from cache.store import FeatureCache
    from pipeline import interpret, plots

    run = _checked_run(run_dir, allow_partial)
    cache = FeatureCache(run.cache_path(cache_path))
    oof = run.oof(("sample_idx", "slice_attention"))
    names = run.label_names or list(cache.label_names)
    table = cache.table
    rows = np.array([cache.index_of(str(s)) for s in oof["scan_id"]], np.int64)
    check_sample_idx(oof, table.n_slices[rows], run.oof_path)
    sampled = interpret.sampled_slice_labels(table.slice_labels, table.offset[rows], oof["sample_idx"])
    attention = np.asarray(oof["slice_attention"], np.float64)
    labels = np.asarray(oof["labels"], np.float64)
    prob = np.asarray(oof["prob"], np.float64)
    result = interpret.interpret_arrays(attention, sampled, names, scan_labels=labels, k=k)
    result["model"] = run.run_json.get("model")
    result["macro_f1"] = macro_f1(labels, prob, run.threshold)
    out_dir = Path(out_dir or run_dir)
    plot_dir = out_dir / "plots"
    plots.write_pr_curves(plots.pr_curves(labels, prob, names), plot_dir / "pr_curves.csv", plot_dir / "pr_curves.png")
    hist = result["top_position_histogram"]
    plots.write_position_histogram(hist["counts"], plot_dir / "top5_positions.csv", plot_dir / "top5_positions.png", k)
    (out_dir / "interpret.json").write_text(json.dumps(json_safe(result), indent=2))
    return result


def sweep_point(run_dir: str | Path) -> dict:
    """One Fig. 6 point: the run's m_key, APS selection and out-of-fold macro-F1."""
    run_dir = Path(run_dir)
    meta, config = _run_meta(run_dir)
    model = config.get("model") or {}
    m_key = model.get("m_key", meta.get("m_key"))
    selection = model.get("aps_selection", meta.get("aps_selection", "attention"))
    if m_key is None:
        raise StageError(f"{run_dir}: no model.m_key in config.yaml or run.json")
    oof = RunDir(run_dir).oof()
    threshold = float((config.get("evaluate") or {}).get("threshold", 0.5))
    f1 = macro_f1(np.asarray(oof["labels"], np.float64), np.asarray(oof["prob"], np.float64), threshold)
    return {"m_key": int(m_key), "selection": str(selection), "macro_f1": f1, "run": str(run_dir)}


def train_sweep(run_dir: str | Path, m_keys: list[int], epochs: int | None = None,
                selections: tuple[str, ...] = SELECTIONS, log=print,
                out_dir: str | Path | None = None) -> list[Path]:
    """Fig. 6 by training: `pipeline.sweep.run_sweep` on RUN_DIR's configuration and cache
    (optionally with fewer epochs) into OUT_DIR/sweep/mkey<N>_<selection>/ (OUT_DIR defaults to
    RUN_DIR); returns the run dirs."""
    from pipeline.training.trainer import TrainingError

    run_dir = Path(run_dir)
    meta, config = _run_meta(run_dir)
    if not config:
        raise StageError(f"{run_dir}/config.yaml missing: cannot retrain the run's configuration")
    try:
        points = run_sweep(config, meta["cache"], Path(out_dir or run_dir) / "sweep", m_keys, epochs, selections, log=log)
    except TrainingError as exc:
        raise StageError(str(exc)) from None
    return [Path(p["run"]) for p in points]


@click.command("interpret")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--cache", "cache_path", type=click.Path(dir_okay=False), default=None, help="Feature cache (default: the run's).")
@click.option("--sweep", "sweep", multiple=True, type=click.Path(file_okay=False),
              help="Further run dirs trained at other model.m_key / model.aps_selection (repeatable): Fig. 6 sweep.")
@click.option("--train-sweep", "train_m_keys", default=None, metavar="N,N,...",
              help="Fig. 6 by training: retrain this run's config at each m_key with attention and random "
                   "selection into RUN_DIR/sweep/ (e.g. 4,8,16,28), then plot the sweep.")
@click.option("--sweep-epochs", type=int, default=None, help="Epochs per sweep run (default: the run's train.epochs).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for interpret.json, plots/ and sweep/ (default: RUN_DIR). DVC needs it outside "
                   "the train stage's run dir.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML config for report.top_k (the k of Algorithm 1).")
@click.option("--allow-partial", is_flag=True,
              help="Evaluate an incomplete run (stopped before its last fold) on its finished folds.")
@set_option
def interpret_cmd(run_dir, cache_path, sweep, train_m_keys, sweep_epochs, out_dir, config_path, allow_partial, settings):
    """Key-slice evaluation of a run: Algorithm 1, Tables 5-6, Figs. 5-7.

    \b
    Writes OUT/interpret.json and OUT/plots/{pr_curves,top5_positions}.{csv,png} (OUT: --out or RUN_DIR);
    with --sweep (existing runs) or --train-sweep (trains them) also OUT/plots/mkey_sweep.{csv,png}
    and interpret.json["mkey_sweep"] (one point per run: m_key, selection, out-of-fold Macro-F1).
    The slice-level tasks need slice labels (RSNA layout, phantom); on CQ500 they report 0 scans.
    """
    from cache.store import CacheError
    from pipeline.oof import OofError
    from pipeline.training.interrupt import TrainingInterrupted

    try:
        from stages.options import load_stage_config

        out_dir = Path(out_dir or run_dir)
        top_k = int(load_stage_config(config_path, {}, settings)["report"]["top_k"])
        result = interpret_run(run_dir, cache_path, k=top_k, out_dir=out_dir, allow_partial=allow_partial)
        if train_m_keys:
            m_keys = parse_m_keys(train_m_keys, "--train-sweep")
            sweep = (*sweep, *(str(d) for d in train_sweep(run_dir, m_keys, sweep_epochs, log=click.echo, out_dir=out_dir)))
        if sweep:
            from pipeline import plots

            points = [sweep_point(d) for d in (run_dir, *sweep)]
            plot_dir = out_dir / "plots"
            plots.write_mkey_sweep(points, plot_dir / "mkey_sweep.csv", plot_dir / "mkey_sweep.png")
            result["mkey_sweep"] = points
            (out_dir / "interpret.json").write_text(json.dumps(json_safe(result), indent=2))
    except (CacheError, OofError, SweepError) as exc:
        raise StageError(str(exc)) from None
    except TrainingInterrupted as exc:  # --train-sweep stopped by SIGTERM/SIGINT: one line
        click.echo(f"drct interpret: {exc.message}", err=True)
        raise SystemExit(exc.exit_code) from None
    for task, value in result["tasks"].items():
        acc = "n/a" if value["accuracy"] is None else f"{100 * value['accuracy']:.2f}%"
        click.echo(f"{task:14s} {value['n_scans']:6d} scans  {acc}")
    for name, value in result["per_disease"].items():
        acc = "n/a" if value["accuracy"] is None else f"{100 * value['accuracy']:.2f}%"
        click.echo(f"  {name:18s} {value['amount']:7d} slices  {acc}")
    click.echo(f"wrote {out_dir / 'interpret.json'}")
