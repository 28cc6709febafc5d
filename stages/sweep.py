"""`drct sweep`: the paper's Fig. 6, macro-F1 against m_key with attention vs random APS selection.

Its own command (and DVC stage) rather than part of `drct interpret`, so that a head experiment
(`dvc exp run -S train.lr_primary=...`) does not pay for 2 x len(m_keys) extra trainings: the
sweep trains the config's heads from the feature cache at each m_key and selection, with its own
epochs, and is rerun by DVC only when the cache, the sweep's own settings (`interpret.*`) or
sampler.m change. Each point is the mean out-of-fold macro-F1 over folds with its std over folds
(the error bar).
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from pipeline.sweep import macro_f1, sweep_configs
from stages.options import StageError, parse_settings, progress_option, set_option


def fold_f1(run_dir: Path, threshold: float) -> tuple[float, float]:
    """(mean, sample std) over folds of the out-of-fold macro-F1 of a run."""
    with np.load(run_dir / "oof.npz") as oof:
        labels, prob, fold = (np.asarray(oof[k], np.float64) for k in ("labels", "prob", "fold"))
    scores = [macro_f1(labels[fold == f], prob[fold == f], threshold) for f in np.unique(fold)]
    return float(np.mean(scores)), float(np.std(scores, ddof=1)) if len(scores) > 1 else float("nan")


def run_sweep(config: dict, cache_path: str | Path, out_dir: str | Path, m_keys: list[int], epochs: int | None,
              selections=("attention", "random"), log=print, progress: bool = False) -> list[dict]:
    """Train the config's heads at each m_key x selection into OUT/runs/mkey<N>_<selection>/; returns the points."""
    from pipeline.training.trainer import run_training

    m = int(config["sampler"]["m"])
    bad = [k for k in m_keys if not 1 <= k <= m]
    if bad:
        raise StageError(f"m_key values {bad} are outside 1..sampler.m = {m}")
    threshold = float(config["evaluate"]["threshold"])
    from tqdm import tqdm

    points = []
    bar = tqdm(total=len(m_keys) * len(selections), unit="run", desc="sweep", disable=not progress)
    for m_key, selection, cfg in sweep_configs(config, m_keys, epochs, selections):
        run_dir = Path(out_dir) / "runs" / f"mkey{m_key}_{selection}"
        log(f"sweep: m_key={m_key} selection={selection} ({cfg['train']['epochs']} epochs) -> {run_dir}")
        run_training(cfg, cache_path, run_dir, progress=False, log=lambda _msg: None)
        mean, std = fold_f1(run_dir, threshold)
        points.append({"m_key": m_key, "selection": selection, "macro_f1": mean, "macro_f1_std": std,
                       "run": str(run_dir)})
        bar.update(1)
    bar.close()
    return points


def parse_m_keys(value) -> list[int]:
    try:
        keys = [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise StageError(f"m_key list {value!r}: give integers, e.g. 4,8,16") from None
    if not keys:
        raise StageError("give at least one m_key, e.g. --m-keys 4,8,16")
    return keys


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
    from pipeline.training.interrupt import TrainingInterrupted
    from pipeline.training.trainer import TrainingError
    from pipeline.config import resolve_run_config

    out = Path(out_dir)
    try:
        keys = parse_m_keys(m_keys) if m_keys else None
        config, cache_path, _taken = resolve_run_config(config_path, parse_settings(settings), cache_path)
        keys = keys or parse_m_keys(config["interpret"]["sweep_m_keys"])
        epochs = epochs or config["interpret"].get("sweep_epochs")
        points = run_sweep(config, cache_path, out, keys, epochs, log=lambda s: click.echo(s, err=True), progress=progress)
    except (CacheError, TrainingError, ValueError, OSError) as exc:
        raise StageError(str(exc)) from None
    except TrainingInterrupted as exc:  # SIGTERM/SIGINT: one line (the run in progress is marked incomplete)
        click.echo(f"drct sweep: {exc.message}", err=True)
        raise SystemExit(exc.exit_code) from None
    from pipeline import plots

    plots.write_mkey_sweep(points, out / "mkey_sweep.csv", out / "mkey_sweep.png")
    def finite(x):
        return float(x) if np.isfinite(x) else None

    summary = {f"{p['selection']}_mkey{p['m_key']}": {"macro_f1": finite(p["macro_f1"]),
                                                       "macro_f1_std": finite(p["macro_f1_std"])} for p in points}
    (out / "sweep.json").write_text(json.dumps({"points": summary, "epochs": epochs}, indent=1))
    for p in points:
        click.echo(f"m_key {p['m_key']:3d} {p['selection']:9s} macro-F1 {p['macro_f1']:.4f} +- {p['macro_f1_std']:.4f}")
    click.echo(f"wrote {out / 'sweep.json'}")
