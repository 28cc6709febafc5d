"""`drct phantom`: write the synthetic head-CT dataset (the embedded demo and test bed)."""

from __future__ import annotations

import click

from pipeline.data import layouts
from stages.options import StageError, SuggestingChoice, load_stage_config, progress_option, set_option


@click.command()
@click.argument("out", required=False, type=click.Path(file_okay=False))
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML config (defaults: configs/defaults.yaml).")
@click.option("--layout", type=SuggestingChoice(layouts.phantom_names()),  # the registered layouts it writes
              help="Folder layout to write [phantom.layout].")
@click.option("--scans", type=click.IntRange(min=1), help="Number of scans [phantom.scans].")
@click.option("--seed", type=int, help="Random seed; the same seed gives identical files [phantom.seed].")
@click.option("--size", type=click.IntRange(32, 1024), help="Nominal image matrix in pixels [phantom.size].")
@click.option("--force", is_flag=True, help="Replace the contents of a non-empty OUT that holds no phantom.")
@set_option
@progress_option
def phantom(out, config_path, layout, scans, seed, size, force, settings, progress):
    """Write synthetic head CTs as real DICOM into OUT [dataset.data].

    \b
    Heads (scalp, skull, brain, ventricles, sulci) with the DrCT2 classes as lesions:
    intraparenchymal, intraventricular, subdural, epidural and subarachnoid blood,
    calvarial fracture, mass effect and midline shift; 20-60 slices per scan.
    \b
    --layout rsna:  OUT/stage_2_train/ID_*.dcm + stage_2_train.csv (slice labels)
    --layout cq500: OUT/CQ500CT<n> CQ500CT<n>/Unknown Study/CT <series>/CT*.dcm
                    + reads.csv (three readers) + slice_labels.csv
    Both write scans_truth.csv (scan-level truth) and phantom.json. A previous
    phantom in OUT is replaced; other non-empty folders need --force.
    """
    from pipeline.synthetic.phantom import PhantomError, make_phantom

    overrides = {"phantom.layout": layout, "phantom.scans": scans, "phantom.seed": seed, "phantom.size": size}
    config = load_stage_config(config_path, overrides, settings)
    settings = config["phantom"]
    out = out or config["dataset"]["data"]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=int(settings["scans"]), unit="scan", desc="phantom")

    def advance(done: int, total: int) -> None:
        if bar is not None:
            bar.update(done - bar.n)

    try:
        summary = make_phantom(out, layout=settings["layout"], scans=int(settings["scans"]),
                               seed=int(settings["seed"]), size=int(settings.get("size", 256)),
                               force=force, progress=advance)
    except PhantomError as exc:
        raise StageError(str(exc)) from None
    finally:
        if bar is not None:
            bar.close()
    click.echo(f"wrote {out}")
    click.echo(summary.format())
