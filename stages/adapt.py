"""`drct adapt`: fine-tune VGG16's block 5 on slice labels of a separate set of scans (issue 8)."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.data import layouts
from stages.options import (
    LayoutOption,
    StageError,
    guess_layout,
    load_stage_config,
    progress_option,
    set_option,
)


@click.command("adapt")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML config (defaults: configs/defaults.yaml).")
@click.option("--data", help="DICOM tree with slice labels, NOT the scans stage two will train or validate on [adapt.data].")
@click.option("--layout", cls=LayoutOption, type=click.Choice(layouts.names()), help="Layout of --data [adapt.layout; guessed if unset].")
@click.option("--out", help="Adapted VGG16 state dict to write (+ OUT.json, OUT.work/) [adapt.out].")
@click.option("--weights", help="Source weights: imagenet | FILE | random:SEED [extract.weights].")
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs over the slices [adapt.epochs].")
@set_option
@progress_option
def adapt(config_path, data, layout, out, weights, epochs, settings, progress):
    """Make a lesion-aware encoder: train VGG16's block 5 + a linear slice classifier on slice labels.

    Blocks 1-4 stay frozen at the source weights; their maps at the primary resolution
    (extract.resolutions[0]) are computed once and cached in OUT.work/, so an epoch costs block 5
    only. OUT is a plain VGG16 state dict: extract it with `--weights OUT` (stage one stays
    frozen); the cache's provenance then records OUT.json (source digest, data, epochs, scans).

    \b
    Use scans the heads will never be validated on: another phantom seed, or RSNA for a CQ500
    target. `drct train` refuses a cache that shares scans with the adaptation set.
    With adapt.data null (the default) there is nothing to do: the command says so and exits 0.
    Resumable: a rerun continues after the last finished epoch.
    """
    config = load_stage_config(config_path, {"adapt.data": data, "adapt.layout": layout, "adapt.out": out,
                                             "extract.weights": weights, "adapt.epochs": epochs}, settings)
    ad = config["adapt"]
    out_path = Path(ad["out"])
    if not ad.get("data"):
        out_path.parent.mkdir(parents=True, exist_ok=True)
        Path(str(out_path) + ".off").write_text("adaptation is off (adapt.data is null); stage one uses extract.weights\n")
        click.echo("adapt: off (adapt.data is null): nothing to do", err=True)
        return
    root = Path(ad["data"])
    if not root.is_dir():
        raise StageError(f"adaptation data folder not found: {root} (give --data or adapt.data)")
    chosen = ad.get("layout") or guess_layout(root)[0]
    from pipeline.data.dicom_io import ImageLimits
    from pipeline.data.index import build_scan_index
    from pipeline.features.adapt import AdaptError, adapt_encoder
    from pipeline.features.encoder import EncoderError

    try:
        index = build_scan_index(root, chosen, ad.get("labels"), progress=progress,
                                 limits=ImageLimits.from_config(config.get("dataset")))
        record = adapt_encoder(config, index, out_path, progress=progress, log=lambda s: click.echo(s, err=True))
    except (AdaptError, EncoderError, ValueError, OSError) as exc:
        raise StageError(str(exc)) from None
    Path(str(out_path) + ".off").unlink(missing_ok=True)
    click.echo(f"adapted VGG16 from {record['adapted_from']} on {record['n_scans']} scans / {record['n_slices']} "
               f"slices of {root}, {record['epochs']} epochs -> {out_path} (extract with --weights {out_path})")
