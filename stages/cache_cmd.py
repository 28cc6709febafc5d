"""`drct cache info|verify`: inspect and check a feature cache (or an unfinished extraction)."""

from __future__ import annotations

import click

from pipeline.config import ConfigError, load_config
from stages.options import StageError, set_option


def _target(path: str | None, config_path: str | None, settings=()) -> str:
    if path:
        return path
    from stages.options import parse_settings

    try:
        return str(load_config(config_path, parse_settings(settings))["extract"]["out"])
    except ConfigError as exc:
        raise StageError(str(exc)) from None


@click.group("cache")
def cache():
    """Inspect and check the HDF5 feature cache written by `drct extract`."""


@cache.command("info")
@click.argument("path", required=False)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Take PATH from extract.out of this config.")
@set_option
def info(path, config_path, settings):
    """Print provenance, scans, slices, positive classes, resolutions and file size of the cache at PATH
    (default: extract.out)."""
    from cache.store import CacheError
    from cache.verify import cache_info, resolve_target, verify_parts

    kind, target = resolve_target(_target(path, config_path, settings))
    if kind == "parts":
        report = verify_parts(target)
        click.echo("\n".join(report.notes + report.problems))
        return
    try:
        click.echo(cache_info(target))
    except (CacheError, OSError) as exc:
        raise StageError(str(exc)) from None


@cache.command("verify")
@click.argument("path", required=False)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Take PATH from extract.out of this config.")
@set_option
def verify(path, config_path, settings):
    """Check the cache at PATH (default: extract.out): structure, dtypes and shapes, contiguous
    offsets, counts, NaN/inf in the vectors, provenance attributes. On an unfinished extraction
    (PATH.parts) check every committed part and report progress. Exit status 1 on any problem."""
    from cache.verify import resolve_target, verify_cache, verify_parts

    kind, target = resolve_target(_target(path, config_path, settings))
    if kind == "missing":
        raise StageError(f"no feature cache or unfinished extraction at {target}")
    report = verify_parts(target) if kind == "parts" else verify_cache(target)
    for note in report.notes:
        click.echo(note)
    if report.ok:
        click.echo(f"OK: {target}")
        return
    for problem in report.problems:
        click.echo(f"problem: {problem}", err=True)
    click.echo(f"FAILED: {target} ({len(report.problems)} problems)", err=True)
    raise SystemExit(1)
