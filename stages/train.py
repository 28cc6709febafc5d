"""`drct train`: stage two, the DrCT1/DrCT2 heads on cached VGG16 features only."""

from __future__ import annotations

import sys

import click

from pipeline.heads import registry
from pipeline.presets import PRESETS, preset_overrides
from stages.options import StageError, parse_settings, progress_option, set_option

__all__ = ["StageError", "train"]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML config (only what it changes from configs/defaults.yaml).")
@click.option("--cache", "cache_path", type=click.Path(dir_okay=False), default=None,
              help="Feature cache from `drct extract` [default: extract.out of the config].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Run directory to write [default: train.out].")
@click.option("--model", type=click.Choice(list(registry.names())), default=None,
              help="A head of pipeline/heads/registry.py: drct1 = primary network only; drct2 = primary + APS + "
                   "fusion; the others are baselines on the same cache, folds and sampler (each module's "
                   "docstring says what it is) [model.name].")
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
              help="Named settings over the config file (under --set): drct2_paper = the paper's DrCT2 "
                   "(eq. 3 on raw values, no input normalisation, plain Adam); see pipeline/presets.py.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs per fold [train.epochs].")
@click.option("--folds", type=click.IntRange(min=2), default=None,
              help="k of the patient-grouped k-fold cross-validation [train.folds].")
@click.option("--fold", type=click.IntRange(min=0), default=None, help="Train only this fold (0-based) [train.fold].")
@click.option("--seed", type=int, default=None, help="Seed of split, initialisation and sampling [train.seed].")
@click.option("--live", "live_dir", type=click.Path(file_okay=False), default=None,
              help="Also log per-epoch loss, validation macro-F1 and AUC per fold with dvclive into this folder.")
@set_option
@progress_option
def train(config_path, cache_path, out_dir, model, preset, epochs, folds, fold, seed, live_dir, settings, progress):
    """Train DrCT heads with patient-grouped k-fold cross-validation on a feature cache.

    The whole cache is loaded into memory once; each batch gathers the sampled slices' 224
    vectors (primary network) and the m_key selected slices' 512 vectors (APS "zoom in").
    Extraction settings (weights, resolutions, windows, aps_source) come from the cache unless the
    config file or --set gives them; given ones must match the cache's provenance, else exit code 2.

    \b
    Writes OUT/config.yaml, OUT/run.json, OUT/fold_<k>/checkpoint.pt, OUT/fold_<k>/history.json
    and OUT/oof.npz (out-of-fold predictions, slice and feature attentions); then run
    `drct evaluate OUT`. OUT.lock is held while writing (a second train into OUT stops).
    SIGTERM/SIGINT or a full disk stop it cleanly: finished folds are kept, OUT/incomplete.json
    marks the run (predict/evaluate/report/interpret refuse it unless --allow-partial), and the
    same command again resumes at the first unfinished fold.

    \b
    Ablations (paper): --model drct1 (no APS, Table 3); --set model.aps_selection=random
    (Fig. 6); --set model.aps_resolution=first (APS on 224 vectors, Table 4);
    --set train.loss=bce (Table 2). Baselines: the other --model
    choices; the paper's own DrCT2: --preset drct2_paper.
    """
    flags = {"model.name": model, "train.epochs": epochs, "train.folds": folds, "train.fold": fold, "train.seed": seed}
    overrides = {**parse_settings(settings), **preset_overrides(preset),
                 **{key: value for key, value in flags.items() if value is not None}}

    from cache.store import CacheError
    from pipeline.config import resolve_run_config
    from pipeline.run_summary import report_train, start
    from pipeline.training.folds import FoldError
    from pipeline.training.interrupt import TrainingInterrupted
    from pipeline.training.trainer import TrainingError, run_training

    logger = None
    try:
        config, cache_path, taken = resolve_run_config(config_path, overrides, cache_path)
        out_dir = out_dir or config["train"]["out"]
        started = start(out_dir)
        if taken:
            click.echo(f"extraction settings from the cache: {', '.join(taken)}", err=True)
        if live_dir:
            from pipeline.training.live import EpochLogger

            logger = EpochLogger(live_dir)
        info = run_training(config, cache_path, out_dir, progress=progress, log=lambda s: click.echo(s, err=True),
                            on_epoch=logger)
    except (CacheError, TrainingError, FoldError, ValueError, OSError) as exc:
        raise StageError(str(exc)) from None
    except TrainingInterrupted as exc:  # SIGTERM/SIGINT: one line, exit 128 + the signal number
        click.echo(f"drct train: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    finally:
        if logger is not None:
            logger.close()
    click.echo(f"trained {info['model']} on folds {info['folds_run']} of {info['folds']}; run in {out_dir}", file=sys.stdout)
    quiet = click.get_current_context().meta.get("drct.quiet")  # OUT/summary.json is written either way
    report_train(info, cache_path, out_dir, started, None if quiet else lambda s: click.echo(s, err=True), live_dir)
