"""`drct export`: copy cached slice vectors out to .npz, Parquet or a standalone HDF5 subset."""

from __future__ import annotations

from pathlib import Path

import click

from stages.options import StageError, progress_option

MAX_ID_LIST_BYTES = 64 << 20  # about 2 million ids


def _read_id_list(path: Path) -> list[str]:
    """The ids of an @FILE, one a line. Messages name the file, never quote its content."""
    if not path.is_file():
        raise click.BadParameter(f"scan id list {path} not found", param_hint="--scans")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_ID_LIST_BYTES + 1)
    except OSError as exc:
        raise click.BadParameter(f"cannot read scan id list {path}: {exc.strerror or exc}", param_hint="--scans") from None
    if len(raw) > MAX_ID_LIST_BYTES:
        raise click.BadParameter(f"scan id list {path} is larger than {MAX_ID_LIST_BYTES >> 20} MiB: "
                                 "not a list of scan ids", param_hint="--scans")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise click.BadParameter(f"scan id list {path} is not UTF-8 text: not a list of scan ids",
                                 param_hint="--scans") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _split_ids(values: tuple[str, ...]) -> list[str] | None:
    """--scans may be repeated, comma separated, or @FILE (one id per line)."""
    if not values:
        return None
    ids: list[str] = []
    for value in values:
        if value.startswith("@"):
            ids.extend(_read_id_list(Path(value[1:])))
        else:
            ids.extend(part.strip() for part in value.split(",") if part.strip())
    if not ids:
        raise click.BadParameter("no scan ids given", param_hint="--scans")
    return ids


@click.command("export")
@click.argument("cache", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["npz", "parquet", "h5"]), required=True,
              help="npz: one numpy.load-able file; parquet: one row per slice (pyarrow); "
                   "h5: a standalone cache subset that every drct stage can read.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Output file; a manifest goes beside it as OUT.manifest.json.")
@click.option("--scans", multiple=True, metavar="IDS",
              help="Scan ids to export, comma separated, repeatable, or @FILE with one id per line "
                   "(default: every scan, in cache order).")
@click.option("--resolution", "resolutions", multiple=True, type=int, metavar="R",
              help="Resolution to export, repeatable (default: every cached resolution).")
@click.option("--overwrite", is_flag=True,
              help="Replace OUT if it is an earlier export of the same format (its manifest says so); "
                   "any other existing file is never replaced.")
@click.option("--batch-slices", default=8192, show_default=True, type=click.IntRange(min=1),
              help="Slices read per batch: bounds memory (2 KiB per slice and resolution).")
@progress_option
def export(cache: Path, fmt: str, out: Path, scans: tuple[str, ...], resolutions: tuple[int, ...],
           overwrite: bool, batch_slices: int, progress: bool) -> None:
    """Export the slice vectors of CACHE (chosen scans and resolutions) without changing a value.

    \b
    Vectors stay float16 in every format, so an export equals the cache bit for bit.
    Large exports stream: at most --batch-slices slices of vectors are in memory.
    An existing OUT is refused unless --overwrite, which replaces only an earlier
    export of the same format; nothing is written inside the cache's DICOM data root.
    The manifest lists scan ids in export order, per scan its slice count, offset,
    z positions, SOP instance UIDs and labels, plus label names, resolutions and
    the cache's provenance.

    \b
    Examples:
      drct export features/features.h5 --format parquet --out exports/all.parquet
      drct export features/features.h5 --format npz --out exports/two.npz --scans ID_a,ID_b --resolution 256
      drct export features/features.h5 --format h5 --out exports/subset.h5 --scans @ids.txt
    """
    from pipeline.export import cache_error_types, export_cache

    ids = _split_ids(scans)
    try:
        summary = export_cache(cache, out, fmt, scan_ids=ids, resolutions=list(resolutions) or None,
                               batch_slices=batch_slices, progress=progress, overwrite=overwrite)
    except cache_error_types() as exc:
        raise StageError(str(exc)) from None
    click.echo(
        f"exported {summary.n_scans} scans ({summary.n_slices} slices) at {summary.resolutions} "
        f"to {summary.out} ({summary.bytes / 2**20:.1f} MiB) in {summary.seconds:.1f} s "
        f"({summary.scans_per_second:.0f} scans/s)"
    )
    click.echo(f"manifest: {summary.manifest}")
