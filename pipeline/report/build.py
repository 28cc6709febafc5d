"""From model outputs to `ScanReport`s: the glue between a run (or `drct predict`) and the renderer.

A report needs, per scan: the deterministic evaluation sample (``sample_idx``), the model's slice
attention and feature attention over it, the probabilities, and where each sampled slice's DICOM
file is (the feature cache's slice table). `drct report` takes these from a run's ``oof.npz``
(out-of-fold outputs: every scan is reported by the model that did not train on it);
`drct predict` writes the same arrays for new scans. The pages call findings at the run's
per-class thresholds (RUN/thresholds.json, `drct evaluate --threshold-from oof`) where it has
them, as predictions.csv does; else at one threshold.

PHI: a scan is named by `display_label`: its scan id, unless that id is (or contains) the
PatientID -- CQ500's ids "CQ500-CT-n" are the PatientID -- in which case a stable pseudonym
``scan-<10 hex of sha256(scan id)>`` is used. PatientName, PatientID and PatientBirthDate are
read from the DICOM header only with ``show_phi`` (``--show-phi``) and then shown in a marked
section. DICOM paths are never written into a report (folder names often carry the patient).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from cache.store import FeatureCache
from pipeline.features.encoder import load_encoder
from pipeline.features.preprocess import preprocess_slice
from pipeline.interpret import top_positions
from pipeline.oof import OofError, check_sample_idx
from pipeline.report.heatmap import conv_maps, display_image, upsample, weighted_map
from pipeline.report.index import IndexRow, write_index
from pipeline.report.render import ScanReport, TopSlice, threshold_text, write_report
from pipeline.training.rundir import OOF, RUN_JSON, RunDir, RunError

BRAIN_WINDOW = (40.0, 80.0)
# A near-step window at -200 HU: 1 inside the head (tissue, bone), 0 in the air around it, so the
# highlight never colours the background (coarse conv maps spill over the skull at 7x7).
BODY_STEP = (-200.0, 1.0)
PHI_TAGS = ("PatientName", "PatientID", "PatientBirthDate")
# Slice attention counts as near uniform when no sampled slice gets UNIFORM_RATIO times the
# uniform share 1/m: the model then does not single out any slice (nothing learned to look at).
UNIFORM_RATIO = 1.5
NOT_LEARNED = "This model has not learned usable features"


def near_uniform(attention: np.ndarray) -> bool:
    attention = np.asarray(attention, np.float64)
    return bool(len(attention)) and float(attention.max()) * len(attention) < UNIFORM_RATIO


def trust_banner(provenance: dict, attention: np.ndarray) -> str | None:
    """The warning a page must carry when its model cannot have learned usable features: a random
    encoder (weights random:SEED) or slice attention near uniform (one scan: (m,); a batch: (n, m),
    warned when most scans are near uniform); None otherwise."""
    weights = str(provenance.get("weights") or "")
    if weights.startswith("random:"):
        return (f"{NOT_LEARNED}: the image encoder is an untrained VGG16 ({weights}), so its features carry no "
                "learned meaning. Probabilities and highlighted areas here are not evidence of disease.")
    attention = np.atleast_2d(np.asarray(attention, np.float64))
    if attention.size and np.mean([near_uniform(a) for a in attention]) > 0.5:
        return (f"{NOT_LEARNED}: its slice attention is near uniform (no slice gets {UNIFORM_RATIO:g}x the "
                "uniform share), so it does not single out any slice. Do not read the highlighted slices as findings.")
    return None


class ReportError(RuntimeError):
    """Inputs a report cannot be made from; the message says what to do."""


@dataclass
class ReportSource:
    """Everything the reports of a set of scans are made from (arrays indexed by scan)."""

    scan_id: np.ndarray              # (n,) str
    patient_id: np.ndarray           # (n,) str
    prob: np.ndarray                 # (n, C)
    sample_idx: np.ndarray           # (n, m) slice index within the scan (z order)
    slice_attention: np.ndarray      # (n, m)
    feature_attention: np.ndarray    # (n, m, 512)
    label_names: list[str]
    threshold: float | np.ndarray    # one for every class, or (C,) one per class
    cache: FeatureCache
    provenance: dict                 # the cache's provenance (weights, resolutions, windows, aps_source, digest)
    labels: np.ndarray | None = None  # (n, C) reference labels, NaN unknown
    info: dict = field(default_factory=dict)  # shown in the report's provenance table
    data_root: str | None = None     # override of the cache's data_root (DICOM moved)
    threshold_source: str | None = None  # where per-class thresholds came from (shown on the pages)

    def index_of(self, scan_id: str) -> int:
        hits = np.flatnonzero(self.scan_id == scan_id)
        if not len(hits):
            raise ReportError(f"scan {scan_id!r} is not among the {len(self.scan_id)} scans of this run")
        return int(hits[0])


def display_label(scan_id: str, patient_id: str, show_phi: bool = False) -> str:
    """The name a report gives a scan: the scan id, or a pseudonym where the id carries the PatientID."""
    scan_id, patient_id = str(scan_id), str(patient_id or "")
    if show_phi or not patient_id or (patient_id not in scan_id and scan_id not in patient_id):
        return scan_id
    return "scan-" + hashlib.sha256(scan_id.encode()).hexdigest()[:10]


def safe_stem(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)[:120] or "scan"


def read_phi(path: str | Path) -> dict:
    """PatientName, PatientID, PatientBirthDate of one DICOM file (only called with --show-phi)."""
    ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=list(PHI_TAGS))
    return {tag: str(ds.get(tag, "")) for tag in PHI_TAGS}


def _resolve(path_like: str, base: Path) -> Path:
    path = Path(path_like)
    if path.is_absolute() or path.exists():
        return path
    return base / path


def recorded_thresholds(run: RunDir | str | Path, names: Sequence[str]) -> tuple[np.ndarray | None, str | None]:
    """RUN/thresholds.json's per-class thresholds and the note the pages show about them; (None, None)
    if the run has none. An invalid file is a ValueError (`RunDir.thresholds`)."""
    from pipeline.calibration import THRESHOLDS_FILE

    run = run if isinstance(run, RunDir) else RunDir(run)
    values = run.thresholds(names)
    if values is None:
        return None, None
    return values, (f"per-class thresholds from {run.path / THRESHOLDS_FILE} "
                    "(F1-maximising on out-of-fold predictions)")


def load_run_source(run_dir: str | Path, cache_path: str | Path | None = None, threshold: float | None = None,
                    allow_partial: bool = False, log: Callable[[str], None] | None = None) -> ReportSource:
    """A run directory (run.json + oof.npz, see stages/train) -> ReportSource, read through `RunDir`.
    An incomplete or mixed run is refused (`RunDir.check`). Thresholds: `threshold`, else the
    run's thresholds.json, else evaluate.threshold of its config (0.5); `log` gets one line naming them."""
    run = RunDir(run_dir)
    try:
        run.check(allow_partial=allow_partial)
        run.require(RUN_JSON, OOF)
        meta = run.run_json
    except RunError as exc:
        raise ReportError(str(exc)) from None
    cache_file = run.cache_path(cache_path)
    cache = FeatureCache(cache_file)
    try:
        oof = run.oof(("sample_idx", "slice_attention", "feature_attention"))
        check_sample_idx(oof, cache.table.n_slices[[cache.index_of(str(s)) for s in oof["scan_id"]]], run.oof_path)
    except OofError as exc:
        raise ReportError(str(exc)) from None
    label_names = run.label_names or list(cache.label_names)
    source_note = None
    if threshold is None:
        try:
            threshold, source_note = recorded_thresholds(run, label_names)
        except ValueError as exc:
            raise ReportError(str(exc)) from None
    if threshold is None:
        threshold = run.threshold
    if log:
        log(f"report pages: {threshold_text(threshold, source_note, label_names)}")
    provenance = dict(cache.provenance)
    provenance.update(run.provenance)
    model = meta.get("model")
    info = {
        "run": str(run.path),
        "model": model if isinstance(model, str) else json.dumps(model),
        "predictions": "out-of-fold (each scan scored by the fold model that did not train on it)",
        "feature cache": str(cache_file),
    }
    info.update({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in provenance.items()})
    return ReportSource(
        scan_id=np.asarray(oof["scan_id"]).astype(str),
        patient_id=np.asarray(oof["patient_id"]).astype(str) if "patient_id" in oof else np.full(len(oof["scan_id"]), ""),
        prob=np.asarray(oof["prob"], np.float64),
        sample_idx=np.asarray(oof["sample_idx"], np.int64),
        slice_attention=np.asarray(oof["slice_attention"], np.float64),
        feature_attention=np.asarray(oof["feature_attention"], np.float32),
        label_names=label_names,
        threshold=threshold,
        cache=cache,
        provenance=provenance,
        labels=np.asarray(oof["labels"], np.float64) if "labels" in oof else None,
        info=info,
        threshold_source=source_note,
    )


class HeatmapEncoder:
    """The frozen VGG16 of the run's cache, loaded once, checked against the recorded digest."""

    def __init__(self, provenance: dict):
        weights = provenance.get("weights")
        if not weights:
            raise ReportError("the run's provenance does not name the encoder weights; cannot draw heat maps")
        import torch

        torch.set_flush_denormal(True)
        self.encoder, digest = load_encoder(str(weights))
        want = provenance.get("weights_digest")
        if want and digest != want:
            raise ReportError(
                f"encoder weights {weights!r} now have digest {digest[:12]}..., but the features were made with "
                f"{str(want)[:12]}...: the heat maps would not match the model. Use the original weights file."
            )
        self.resolution = int(provenance["resolutions"][0])
        self.windows = provenance["windows"]
        self.aps_source = str(provenance.get("aps_source", "upsampled"))

    def __call__(self, hu_slices: list[np.ndarray], weights: np.ndarray, display_size: int) -> np.ndarray:
        import torch

        x = torch.stack(
            [preprocess_slice(hu, [self.resolution], self.windows, self.aps_source)[self.resolution] for hu in hu_slices]
        )
        maps = conv_maps(self.encoder, x)
        return np.stack([upsample(weighted_map(maps[i], weights[i]), display_size) for i in range(len(hu_slices))])


def _slice_paths(source: ReportSource, i: int) -> tuple[list[Path], int, np.ndarray]:
    """DICOM paths, slice count and z in mm from the first slice (z order) of scan i."""
    cache = source.cache
    index = cache.index_of(str(source.scan_id[i]))
    table = cache.table
    rows = table.rows(index)
    root = Path(source.data_root or cache.attrs.get("data_root") or ".")
    paths = [_resolve(str(p), root) for p in table.path[rows]]
    z = np.asarray(table.z[rows], np.float64)
    z_mm = np.abs(z - z[0]) if len(z) else z
    return paths, int(table.n_slices[index]), z_mm


def build_scan_report(
    source: ReportSource,
    i: int,
    encoder: HeatmapEncoder,
    read_hu: Callable[[str], np.ndarray],
    show_phi: bool = False,
    thumb_size: int = 96,
    display_size: int = 256,
    k: int = 5,
) -> ScanReport:
    """The report of scan i of `source` (reads its m sampled DICOM slices, runs the encoder on the top k)."""
    paths, n_slices, z_mm = _slice_paths(source, i)
    sample = source.sample_idx[i]
    if sample.max() >= n_slices or sample.min() < 0:
        raise ReportError(f"scan {source.scan_id[i]!r}: sampled slice index out of range of its {n_slices} slices")
    hu = {}
    for idx in np.unique(sample):
        try:
            hu[int(idx)] = read_hu(str(paths[idx]))
        except Exception as exc:  # noqa: BLE001 - report which slice cannot be read, without its path
            raise ReportError(f"scan {display_label(source.scan_id[i], source.patient_id[i], show_phi)}: "
                              f"slice {int(idx) + 1} cannot be read ({type(exc).__name__}: {exc})") from None
    attention = source.slice_attention[i]
    thumbs = np.stack([display_image(hu[int(idx)], BRAIN_WINDOW, thumb_size) for idx in sample])
    top = top_positions(attention, k)
    heat = encoder([hu[int(sample[p])] for p in top], source.feature_attention[i][top].astype(np.float32), display_size)
    sample_mm = z_mm[sample] if len(z_mm) == n_slices and np.isfinite(z_mm).all() else None
    top_slices = [
        TopSlice(
            position=int(p),
            slice_index=int(sample[p]),
            attention=float(attention[p]),
            raw=display_image(hu[int(sample[p])], BRAIN_WINDOW, display_size),
            heat=heat[r] * display_image(hu[int(sample[p])], BODY_STEP, display_size),
            z_mm=None if sample_mm is None else float(sample_mm[p]),
        )
        for r, p in enumerate(top)
    ]
    phi = None
    if show_phi:
        try:
            phi = read_phi(paths[int(sample[0])])
        except Exception as exc:  # noqa: BLE001
            phi = {"error": f"header unreadable: {type(exc).__name__}"}
    return ScanReport(
        label=display_label(source.scan_id[i], source.patient_id[i], show_phi),
        attention=np.asarray(attention, np.float64),
        slice_index=np.asarray(sample),
        thumbnails=thumbs,
        top=top_slices,
        class_names=list(source.label_names),
        prob=np.asarray(source.prob[i], np.float64),
        threshold=source.threshold,
        threshold_source=source.threshold_source,
        truth=None if source.labels is None else np.asarray(source.labels[i], np.float64),
        provenance=dict(source.info),
        phi=phi,
        n_slices=n_slices,
        z_mm=sample_mm,
        banner=trust_banner(source.provenance, attention),
    )


def write_reports(
    source: ReportSource,
    out_dir: str | Path,
    scan_ids: Sequence[str] | None = None,
    show_phi: bool = False,
    read_hu: Callable[[str], np.ndarray] | None = None,
    progress: bool | Callable[[str], None] | None = None,
    sizes: dict | None = None,
) -> dict:
    """Write one HTML + PNG per scan and index.html; returns {"index": path, "scans": [...], "failed": [...]}.

    A scan whose report cannot be made (unreadable slice) is listed under "failed" with the reason;
    the others are still written. `sizes`: the config's ``report`` section (top_k, thumb_size, display_size).
    """
    sizes = sizes or {}
    options = {"k": int(sizes.get("top_k", 5)), "thumb_size": int(sizes.get("thumb_size", 96)),
               "display_size": int(sizes.get("display_size", 256))}
    if read_hu is None:
        from pipeline.data.dicom_io import read_hu as read_hu_default

        read_hu = read_hu_default
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    indices = list(range(len(source.scan_id))) if not scan_ids else [source.index_of(s) for s in scan_ids]
    encoder = HeatmapEncoder(source.provenance)
    rows, written, failed, used = [], [], [], set()
    bar = None
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=len(indices), unit="report", desc="reports")
    for i in indices:
        if bar is not None:
            bar.update(1)
        label = display_label(source.scan_id[i], source.patient_id[i], show_phi)
        try:
            report = build_scan_report(source, i, encoder, read_hu, show_phi=show_phi, **options)
        except ReportError as exc:
            failed.append({"scan": label, "reason": str(exc)})
            continue
        stem = safe_stem(label)
        while stem in used:
            stem += "_"
        used.add(stem)
        html_path, png_path = write_report(report, out_dir / "scans", stem)
        rows.append(IndexRow(label=label, href=f"scans/{html_path.name}", prob=report.prob, findings=report.findings,
                             truth=report.truth))
        written.append({"scan": label, "html": str(html_path), "png": str(png_path),
                        "top_positions": [t.position for t in report.top]})
        if callable(progress):
            progress(label)
    if bar is not None:
        bar.close()
    index = write_index(out_dir / "index.html", rows, source.label_names, source.threshold,
                        banner=trust_banner(source.provenance, source.slice_attention[indices]),
                        threshold_source=source.threshold_source)
    summary = {"index": str(index), "scans": written, "failed": failed}
    (out_dir / "reports.json").write_text(json.dumps(summary, indent=2))
    return summary
