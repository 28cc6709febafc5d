"""`drct fingerprint`: write what the DVC pipeline's expensive stages depend on besides their data
(pipeline/fingerprint.py), so that `dvc exp show` lists two small files instead of every source."""

from __future__ import annotations

import click

from stages.options import StageError, load_stage_config


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="The stage-one config whose dataset, extract and adapt sections the cache is made with "
                   "(the demo: configs/stage_one.yaml) [configs/defaults.yaml].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="fingerprints", show_default=True,
              help="Folder for stage_one.json (adapt, extract) and heads.json (train, sweep).")
def fingerprint(config_path, out_dir):
    """Write the code and config fingerprints of the expensive DVC stages into OUT.

    \b
    stage_one.json  sha256 of every file `drct extract` and `drct adapt` can run (their import
                    closure, read with ast, registry entries included) and their dataset,
                    extract and adapt sections merged with the defaults
    heads.json      the same for `drct train` and `drct sweep`, and configs/defaults.yaml
    A file whose content is unchanged is not rewritten, so DVC reruns only the stages whose
    fingerprint changed: editing a head never reruns feature extraction.
    """
    from pipeline.fingerprint import MANIFESTS, write_manifests

    load_stage_config(config_path, {})  # a bad config is refused here as by the stages that read it
    try:
        written = write_manifests(out_dir, config_path)
    except OSError as exc:
        raise StageError(f"cannot write the fingerprints into {out_dir}: {exc.strerror or exc}") from None
    for name in MANIFESTS:
        click.echo(f"{written[name]}")
