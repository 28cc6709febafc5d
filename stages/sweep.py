"""`drct sweep`: the paper's Fig. 6, macro-F1 against m_key with attention vs random APS selection.

Its own command (and DVC stage) rather than part of `drct interpret`, so that a head experiment
(`dvc exp run -S train.lr_primary=...`) does not pay for 2 x len(m_keys) extra trainings: the
sweep trains the config's heads from the feature cache at each m_key and selection, with its own
epochs, and is rerun by DVC only when the cache, the sweep's own settings (`interpret.*`) or
sampler.m change. Each point is the mean out-of-fold macro-F1 over folds with its std over folds
(the error bar).
"""

from __future__ import annotations

from pathlib import Path

import click

from stages.options import StageError, parse_settings, progress_option, set_option


@click.command("sweep")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML config whose heads are swept (defaults: configs/defaults.yaml).")
@click.option("--cache", "cache_path", type=click.Path(dir_okay=False), default=None,
              help="Feature cache [default: extract.out of the config].")
@click.option("--m-keys", default=None, metavar="N,N,...", help="m_key values [interpret.sweep_m_keys].")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs per sweep run [interpret.sweep_epochs].")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for sweep.json, mkey_sweep.{csv,png} and runs/.")
@set_option
@progress_option
def sweep(config_path, cache_path, m_keys, epochs, out_dir, settings, progress):
    """Train the heads at each m_key with attention and random APS selection (paper Fig. 6).

    \b
    Writes OUT/sweep.json (one point per m_key x selection: mean and std over folds of the
    out-of-fold macro-F1), OUT/mkey_sweep.csv (for `dvc plots`), OUT/mkey_sweep.png (error
    bars = std over folds) and the runs under OUT/runs/. Heads only: no CNN runs.
    """
    from cache.store import CacheError
    from pipeline.config import resolve_run_config
    from pipeline.sweep import parse_m_keys, run_sweep, write_sweep
    from pipeline.training.interrupt import TrainingInterrupted
    from pipeline.training.trainer import TrainingError

    try:
        keys = parse_m_keys(m_keys) if m_keys else None
        config, cache_path, _taken = resolve_run_config(config_path, parse_settings(settings), cache_path)
        keys = keys or parse_m_keys(config["interpret"]["sweep_m_keys"])
        epochs = epochs or config["interpret"].get("sweep_epochs")
        points = run_sweep(config, cache_path, Path(out_dir) / "runs", keys, epochs,
                           log=lambda s: click.echo(s, err=True), progress=progress)
    except (CacheError, TrainingError, ValueError, OSError) as exc:
        raise StageError(str(exc)) from None
    except TrainingInterrupted as exc:  # SIGTERM/SIGINT: one line (the run in progress is marked incomplete)
        click.echo(f"drct sweep: {exc.message}", err=True)
        raise SystemExit(exc.exit_code) from None
    path = write_sweep(points, out_dir, epochs)
    for p in points:
        click.echo(f"m_key {p['m_key']:3d} {p['selection']:9s} macro-F1 {p['macro_f1']:.4f} +- {p['macro_f1_std']:.4f}")
    click.echo(f"wrote {path}")
