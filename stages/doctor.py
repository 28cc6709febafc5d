"""`drct doctor`: a one-screen preflight (pipeline/doctor.py)."""

from __future__ import annotations

import sys

import click

from stages.options import load_stage_config, set_option


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML config of the run to check (e.g. configs/stage_one.yaml, configs/cq500.yaml) [configs/defaults.yaml].")
@click.option("--data", type=click.Path(), default=None, help="DICOM tree: estimate the cache size for it [dataset.data].")
@click.option("--cache", "cache_path", type=click.Path(dir_okay=False), default=None,
              help="Where the cache will be written: free disk there [extract.out].")
@click.option("--device", default="auto", show_default=True, help="Device the extraction would use.")
@click.option("--scheduler", default=None, help="dask.distributed scheduler address to try (as drct extract --scheduler).")
@set_option
def doctor(config_path, data, cache_path, device, scheduler, settings):
    """Print what a run will use and what is missing: CPU flags and the precision `auto` picks,
    torch build and CUDA devices, DICOM decoders and transfer syntaxes, ImageNet weights in the
    torch hub cache, free disk and the estimated cache size, DVC offline settings, the dask
    scheduler. Exit code 1 when the run would fail (FAIL lines), 0 otherwise (WARN lines cost time)."""
    from pipeline.doctor import format_checks, run_checks

    config = load_stage_config(config_path, {}, settings)
    data = data or (config.get("dataset") or {}).get("data")
    checks = run_checks(config, data=data, cache_path=cache_path, device=device, scheduler=scheduler)
    click.echo(format_checks(checks))
    if any(c.status == "fail" for c in checks):
        sys.exit(1)
