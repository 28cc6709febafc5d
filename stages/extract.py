"""`drct extract`: stage one, DICOM tree -> frozen VGG16 vectors at every resolution -> HDF5 cache."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.config import ConfigError
from pipeline.data import layouts
from stages.options import (
    LayoutOption,
    StageError,
    SuggestingChoice,
    config_sets,
    did_you_mean,
    guess_layout,
    load_stage_config,
    set_option,
)


def _resolutions(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give a comma list of integers, e.g. 224,512") from None


@click.command("extract")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML config (defaults: configs/defaults.yaml).")
@click.option("--data", help="Root of the DICOM tree [dataset.data].")
@click.option("--layout", cls=LayoutOption, type=SuggestingChoice(layouts.names()),
              help="Dataset layout [dataset.layout]; if neither this nor the config sets it, guessed from the tree.")
@click.option("--labels", help="Label CSV; default: the layout's own file [dataset.labels].")
@click.option("--scan-labels", help="Scan-level label CSV (id column + one column per class) that gives or overrides "
                                    "scan labels, e.g. RSNA studies with only scan labels [dataset.scan_labels].")
@click.option("--out", help="The HDF5 feature cache to write [extract.out].")
@click.option("--resolutions", help="Comma list of input sizes, smallest first, e.g. 224,512 [extract.resolutions].")
@click.option("--weights", help="imagenet | path/to/vgg16_state_dict.pth | random:SEED [extract.weights].")
@click.option("--aps-source", type=click.Choice(["upsampled", "native"]), help="Larger-resolution input [extract.aps_source].")
@click.option("--device", help="auto | cpu | cuda | cuda:N [extract.device].")
@click.option("--scheduler", help="Address of an existing dask.distributed scheduler; default: a local cluster.")
@click.option("--workers", type=int, help="Local cluster worker processes (with CUDA: one per GPU); 0 = no dask [extract.workers].")
@click.option("--threads-per-worker", type=int, help="Tasks each dask worker runs at once [extract.threads_per_worker].")
@click.option("--encode-on", type=click.Choice(["workers", "client"]),
              help="workers: dask workers decode and encode; client: they decode, this process encodes [extract.encode_on].")
@click.option("--worker-timeout", type=float,
              help="Seconds with no dask worker before stopping with an error [extract.worker_timeout].")
@click.option("--tls-ca", type=click.Path(dir_okay=False), help="TLS CA file for a tls:// scheduler [extract.tls_ca].")
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="TLS client certificate file [extract.tls_cert].")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="TLS client key file [extract.tls_key].")
@click.option("--batch-size", type=int, help="Slices per forward pass [extract.batch_size].")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), help="auto = bf16 where fast [extract.precision].")
@click.option("--scans-per-commit", type=int, help="Scans per crash-safe commit unit [extract.scans_per_commit].")
@click.option("--keep-ids", is_flag=True, default=None,
              help="Store patient and scan ids verbatim (data already de-identified, e.g. RSNA, CQ500); "
                   "default: keyed pseudonyms [dataset.keep_ids].")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Progress bars with slices/s and ETA on stderr.")
@set_option
def extract(config_path, data, layout, labels, scan_labels, out, resolutions, weights, aps_source, device, scheduler,
            workers, threads_per_worker, encode_on, worker_timeout, tls_ca, tls_cert, tls_key, batch_size, precision,
            scans_per_commit, keep_ids, progress, settings):
    """Stage one: run the frozen VGG16 over every slice of every scan at every resolution.

    \b
    Each slice: HU -> three CT windows -> resized to each resolution -> ImageNet
    normalisation -> VGG16 conv layers -> global max pool -> 512 float16 values,
    stored in one HDF5 cache with its provenance (see `drct cache info`).

    \b
    Each dask worker (a local cluster by default, or --scheduler ADDRESS)
    decodes and encodes batches on its own device (its GPU, else the CPU,
    bf16 where fast) and sends back the vectors; this process writes the cache.
    Crash safe and resumable: scans are committed in small units beside OUT
    (OUT.parts/); run the same command again after a crash or kill and it
    continues where it stopped. A changed configuration is refused, naming the
    field. Undecodable slices or scans go to OUT's .rejects.csv with a reason.
    Patient and scan ids are stored as keyed pseudonyms unless --keep-ids (the key
    stays beside the data, never in the cache).
    """
    from cache.store import CacheError
    from pipeline.features.encoder import EncoderError
    from pipeline.features.extraction import run_extraction
    from pipeline.features.preprocess import PreprocessError
    from pipeline.pseudonym import PseudonymError
    from pipeline.run_summary import remove_stale, report_extract, start, summary_path

    started = start()
    overrides = {
        "dataset.data": data,
        "dataset.layout": layout,
        "dataset.labels": labels,
        "dataset.scan_labels": scan_labels,
        "dataset.keep_ids": keep_ids,
        "extract.out": out,
        "extract.resolutions": _resolutions(resolutions),
        "extract.weights": weights,
        "extract.aps_source": aps_source,
        "extract.device": device,
        "extract.scheduler": scheduler,
        "extract.workers": workers,
        "extract.batch_size": batch_size,
        "extract.precision": precision,
        "extract.scans_per_commit": scans_per_commit,
        "extract.threads_per_worker": threads_per_worker,
        "extract.encode_on": encode_on,
        "extract.worker_timeout": worker_timeout,
        "extract.tls_ca": tls_ca,
        "extract.tls_cert": tls_cert,
        "extract.tls_key": tls_key,
    }
    config = load_stage_config(config_path, overrides, settings)
    remove_stale(summary_path(config["extract"]["out"]))  # only a finished run leaves one
    dataset = config["dataset"]
    root = Path(dataset["data"])
    if not root.is_dir():
        raise StageError(f"data folder not found: {root} (give --data or dataset.data)")
    if layout is None and "dataset.layout" not in settings_keys(settings) and not config_sets(config_path, "dataset.layout"):
        dataset["layout"], why = guess_layout(root)
        click.echo(f"--layout not given: using --layout {dataset['layout']} ({why}); pass --layout to choose", err=True)
    elif dataset["layout"] not in layouts.names():
        raise StageError(f"dataset.layout {dataset['layout']!r} is not one of {', '.join(layouts.names())}"
                         f"{did_you_mean(dataset['layout'], layouts.names())}")
    index = _build_index(root, dataset["layout"], dataset.get("labels"), progress, dataset.get("scan_labels"),
                         dataset.get("cq500_series", "all"), bool(dataset.get("cq500_bone", False)),
                         dataset.get("allow_modalities"), image_limits(dataset))
    try:
        result = run_extraction(index, config, progress=progress)
    except (CacheError, EncoderError, PreprocessError, ConfigError, PseudonymError) as exc:
        raise StageError(str(exc)) from None
    report_extract(result, started, lambda line: click.echo(line, err=True))  # and OUT's .summary.json


def settings_keys(settings) -> set[str]:
    return {str(item).partition("=")[0].strip() for item in settings or ()}


def image_limits(dataset: dict):
    """The image sizes indexing accepts: dataset.max_pixels and dataset.min_size."""
    from pipeline.data.dicom_io import ImageLimits

    return ImageLimits.from_config(dataset)


def _build_index(root: Path, layout: str, labels, progress: bool, scan_labels=None, cq500_series: str = "all",
                 cq500_bone: bool = False, allow_modalities=None, limits=None):
    from pipeline.data.index import build_scan_index

    try:
        return build_scan_index(root, layout, labels, scan_labels_csv=scan_labels, progress=progress,
                                cq500_series=cq500_series, cq500_bone=cq500_bone, allow_modalities=allow_modalities,
                                limits=limits)
    except (ValueError, OSError, KeyError) as exc:
        raise StageError(f"cannot index the DICOM tree {root} as layout {layout!r}: {exc}") from None
