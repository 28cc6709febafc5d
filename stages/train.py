"""`drct train`: stage two, the DrCT1/DrCT2 heads on cached VGG16 features only."""

from __future__ import annotations

import sys

import click

from pipeline.config import ConfigError, load_config


class StageError(click.ClickException):
    """A clean refusal: message on stderr, exit code 2, no traceback."""

    exit_code = 2


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML config (only what it changes from configs/defaults.yaml).")
@click.option("--cache", "cache_path", type=click.Path(dir_okay=False), default=None,
              help="Feature cache from `drct extract` [default: extract.out of the config].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Run directory to write [default: train.out].")
@click.option("--model", type=click.Choice(["drct1", "drct2"]), default=None,
              help="drct1 = primary network only; drct2 = primary + APS + fusion [model.name].")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs per fold [train.epochs].")
@click.option("--folds", type=click.IntRange(min=2), default=None,
              help="k of the patient-grouped k-fold cross-validation [train.folds].")
@click.option("--fold", type=click.IntRange(min=0), default=None, help="Train only this fold (0-based) [train.fold].")
@click.option("--seed", type=int, default=None, help="Seed of split, initialisation and sampling [train.seed].")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Any other config value, e.g. --set model.m_key=8 --set train.loss=bce (YAML value).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(config_path, cache_path, out_dir, model, epochs, folds, fold, seed, settings, quiet):
    """Train DrCT heads with patient-grouped k-fold cross-validation on a feature cache.

    The whole cache is loaded into memory once; each batch gathers the sampled slices' 224
    vectors (primary network) and the m_key selected slices' 512 vectors (APS "zoom in").
    The cache's provenance must match the config's extract section, else exit code 2.

    \b
    Writes OUT/config.yaml, OUT/run.json, OUT/fold_<k>/checkpoint.pt, OUT/fold_<k>/history.json
    and OUT/oof.npz (out-of-fold predictions, slice and feature attentions); then run
    `drct evaluate OUT`.

    \b
    Ablations (paper): --model drct1 (no APS, Table 3); --set model.aps_selection=random
    (Fig. 6); --set model.aps_resolution=first (APS on 224 vectors, Table 4);
    --set train.loss=bce (Table 2).
    """
    import yaml

    overrides = {
        "model.name": model,
        "train.epochs": epochs,
        "train.folds": folds,
        "train.fold": fold,
        "train.seed": seed,
    }
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise StageError(f"--set expects KEY=VALUE, got '{item}'")
        overrides[key.strip()] = yaml.safe_load(value)
    try:
        config = load_config(config_path, overrides)
    except ConfigError as exc:
        raise StageError(str(exc)) from None
    cache_path = cache_path or config["extract"]["out"]
    out_dir = out_dir or config["train"]["out"]

    from cache.store import CacheError
    from pipeline.training.folds import FoldError
    from pipeline.training.trainer import TrainingError, run_training

    try:
        info = run_training(config, cache_path, out_dir, progress=not quiet, log=lambda s: click.echo(s, err=True))
    except (CacheError, TrainingError, FoldError, ValueError) as exc:
        raise StageError(str(exc)) from None
    click.echo(f"trained {info['model']} on folds {info['folds_run']} of {info['folds']}; run in {out_dir}", file=sys.stdout)
