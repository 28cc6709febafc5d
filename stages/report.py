"""`drct report`: per-scan decision-support pages (paper Figure 2) for the scans of a trained run."""

from __future__ import annotations

import sys

import click

from stages.options import StageError, load_stage_config, progress_option, set_option


@click.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for index.html and scans/*.html|png.")
@click.option("--scan", "scans", multiple=True, metavar="ID", help="Scan id to report (repeatable); default: every scan.")
@click.option("--cache", "cache_path", type=click.Path(dir_okay=False), default=None, help="Feature cache (default: the one in run.json).")
@click.option("--data-root", default=None, help="Where the DICOM tree is now, if it moved since extraction.")
@click.option("--threshold", type=float, default=None,
              help="Decision threshold for every class (default: the run's per-class thresholds.json, "
                   "else evaluate.threshold of the run).")
@click.option("--show-phi", is_flag=True, help="Show PatientName/PatientID/PatientBirthDate and real scan ids (off by default).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML config for the report section (top_k, thumb_size, display_size).")
@click.option("--allow-partial", is_flag=True,
              help="Report an incomplete run (stopped before its last fold): the scans of its finished folds.")
@set_option
@progress_option
def report(run_dir, out_dir, scans, cache_path, data_root, threshold, show_phi, config_path, allow_partial, settings,
           progress):
    """Write a self-contained HTML page and a PNG per scan, plus a sortable index.html.

    \b
    Each report shows all m sampled slices with the slice-attention histogram, the five
    highest-attention slices large with the suspicious area highlighted (VGG16 conv maps
    weighted by the model's feature attention), the predicted diseases with probabilities,
    and the model/cache provenance. Probabilities are the run's out-of-fold predictions.
    Patient identifiers are hidden unless --show-phi: scan ids that carry the PatientID
    (e.g. CQ500-CT-n) are replaced by a pseudonym scan-<sha256 prefix>.
    """
    from cache.store import CacheError
    from pipeline.features.encoder import EncoderError
    from pipeline.report.build import ReportError, load_run_source, write_reports

    try:
        source = load_run_source(run_dir, cache_path=cache_path, threshold=threshold, allow_partial=allow_partial,
                                 log=lambda msg: click.echo(msg, err=True))
        source.data_root = data_root
        sizes = load_stage_config(config_path, {}, settings)["report"]
        summary = write_reports(source, out_dir, scan_ids=list(scans), show_phi=show_phi, sizes=sizes,
                                progress=progress)
    except (ReportError, CacheError, EncoderError, FileNotFoundError) as exc:
        raise StageError(str(exc)) from None
    for fail in summary["failed"]:
        click.echo(f"skipped {fail['scan']}: {fail['reason']}", err=True)
    click.echo(f"{len(summary['scans'])} reports, index: {summary['index']}")
    if not summary["scans"] and summary["failed"]:
        sys.exit(1)
