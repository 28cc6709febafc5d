"""The synthetic head-CT phantom dataset (`drct phantom`): the embedded default dataset, the demo
and the interpretability test bed.

Scans are drawn from a seeded random generator (one independent stream per scan, so scan k is
the same whatever the number of scans), rendered by `phantom_anatomy`, and written as real DICOM
(CT Image Storage, Explicit VR Little Endian, int16 with RescaleIntercept -1024) in one of the two
layouts the pipeline reads:

- rsna:  OUT/stage_2_train/ID_<9 hex>.dcm (flat, shuffled names) + OUT/stage_2_train.csv
         (`ID,Label`, six rows per image, slice-level labels; a few exact duplicate rows, as in the
         real file) + OUT/scans_truth.csv. Some patients have two studies (grouped folds matter).
- cq500: OUT/CQ500CT<n> CQ500CT<n>/Unknown Study/CT <description>/CT000000.dcm ... with a plain
         series ("CT Plain" or "CT 5mm") and for some patients a "CT POST CONTRAST" or a thin
         "CT Plain THIN" series; OUT/reads.csv with three readers who sometimes disagree;
         OUT/slice_labels.csv (SOPInstanceUID + nine classes, all series) + OUT/scans_truth.csv.

Ground truth is derived from the rendered voxels (a slice is positive for a class when at least
`min_pixels` of its pixels belong to that lesion), so labels and pixels can never disagree; ICH
('any') is the OR of the five bleed subtypes on every slice. Nothing depends on the clock: the
same seed gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cache import csv_safe
from pipeline.data.labels import CQ500_LABELS, RSNA_LABELS
from pipeline.pseudonym import KEY_NAME
from pipeline.synthetic.phantom_anatomy import (
    BLEEDS,
    CLASSES,
    OWNER_CODE,
    HeadSpec,
    Lesion,
    random_waves,
    render_series,
    rotation_matrix,
)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.8.498.1.7401"   # fixed: files must not depend on versions
MARKER = "phantom.json"
# RSNA subtype <- phantom class
RSNA_FROM_CLASS = {"any": "ICH", "epidural": "EDH", "intraparenchymal": "IPH", "intraventricular": "IVH",
                   "subarachnoid": "SAH", "subdural": "SDH"}
RSNA_CSV_ORDER = ["epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"]
READ_COLUMNS = ["ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "BleedLocation-Left", "BleedLocation-Right",
                "ChronicBleed", "Fracture", "CalvarialFracture", "OtherFracture", "MassEffect", "MidlineShift"]
assert CLASSES == CQ500_LABELS


class PhantomError(ValueError):
    """Bad phantom parameters or an output folder that must not be overwritten."""


@dataclass
class SeriesSpec:
    """Acquisition of one series of a scan."""

    description: str
    n_slices: int
    thickness: float
    rows: int
    spacing: float
    tilt: float = 0.0            # gantry tilt (rad)
    contrast: bool = False
    descending: bool = False     # acquisition (InstanceNumber / file) order head -> feet


@dataclass
class ScanSpec:
    index: int
    head: HeadSpec
    z_start: float               # patient z of the lowest slice (mm)
    series: list[SeriesSpec]
    lesion_sides: set[str] = field(default_factory=set)
    chronic: bool = False


@dataclass
class RenderedSeries:
    """Pixels and truth of one series: hu (n, rows, cols) int16 in z order, labels (n, 9) 0/1."""

    spec: SeriesSpec
    hu: np.ndarray
    owner: np.ndarray
    labels: np.ndarray
    positions: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray


# ----------------------------------------------------------------------------- scan sampling

def sample_scan(seed: int, index: int, size: int = 256, layout: str = "rsna") -> ScanSpec:
    """Draw one scan (head, lesions, series) from the stream (seed, index)."""
    rng = np.random.default_rng([seed, index, 7401])
    head = _sample_head(rng)
    sides = _sample_lesions(rng, head)
    rows = int(rng.choice([size * 15 // 16, size, size * 9 // 8], p=[0.3, 0.45, 0.25]))
    fov = rng.uniform(215.0, 250.0)
    spacing = fov / rows
    coverage = head.axes[2] * rng.uniform(1.38, 1.5)      # skull base to vertex
    n = int(rng.integers(20, 61))
    thickness = round(coverage / n, 3)
    tilt = float(np.deg2rad(rng.uniform(8, 20))) if rng.random() < 0.12 else 0.0
    z_start = float(head.center[2] - 0.5 * head.axes[2] + rng.uniform(-3, 3))
    plain = "CT Plain" if rng.random() < 0.6 else "CT 5mm"
    series = [SeriesSpec(plain, n, thickness, rows, spacing, tilt, descending=bool(rng.random() < 0.5))]
    if layout == "cq500":
        extra = rng.random()
        if extra < 0.15:
            series.append(SeriesSpec("CT POST CONTRAST", n, thickness, rows, spacing, tilt, contrast=True))
        elif extra < 0.3 and n <= 32:
            series.append(SeriesSpec("CT Plain THIN", 2 * n, round(thickness / 2, 3), rows, spacing, tilt))
    chronic = "SDH" in {lesion.kind for lesion in head.lesions} and rng.random() < 0.15
    return ScanSpec(index, head, z_start, series, sides, chronic)


def _sample_head(rng: np.random.Generator) -> HeadSpec:
    axes = np.array([rng.uniform(66, 78), rng.uniform(84, 98), rng.uniform(80, 94)])
    center = np.array([rng.uniform(-8, 8), rng.uniform(-8, 8), 0.0])
    rotation = rotation_matrix(*np.deg2rad(rng.uniform([-8, -6, -4], [8, 6, 4])))
    atrophy = rng.uniform(0, 1)
    return HeadSpec(
        center=center, rotation=rotation, axes=axes,
        harmonics=np.array([rng.uniform(0, 0.04), rng.uniform(0, 6.28), rng.uniform(0, 0.03), rng.uniform(0, 6.28)]),
        scalp=rng.uniform(4, 7), skull=rng.uniform(5, 8), csf_gap=rng.uniform(1, 2.5 + 2 * atrophy),
        gm=rng.uniform(35, 42), wm=rng.uniform(24, 31), csf=rng.uniform(2, 10), cortex=rng.uniform(3, 4.5),
        ventricle=np.array([rng.uniform(1.5, 3.0), 4 + 5 * atrophy * rng.uniform(0.5, 1), rng.uniform(24, 32),
                            rng.uniform(8, 12) + 4 * atrophy, rng.uniform(-4, 4), rng.uniform(8, 16)]),
        sulcal_waves=random_waves(rng), sulcal_freq=rng.uniform(24, 34),
        sulcal_width=rng.uniform(0.12, 0.2) + 0.1 * atrophy, sulcal_depth=rng.uniform(10, 16),
        noise=rng.uniform(3, 6.5), blur=rng.uniform(0.35, 0.8),
        calcifications=_calcifications(rng),
    )


def _calcifications(rng: np.random.Generator) -> np.ndarray:
    calcs = []
    if rng.random() < 0.5:    # pineal gland, midline behind the third ventricle
        calcs.append([0.0, 14.0, -8.0, rng.uniform(1.2, 2.5)])
    if rng.random() < 0.4:    # choroid plexus in the atria
        for side in (-1, 1):
            calcs.append([side * rng.uniform(14, 18), rng.uniform(22, 28), rng.uniform(6, 12), rng.uniform(1, 2.2)])
    return np.array(calcs, dtype=float).reshape(-1, 4)


def _surface_direction(rng: np.random.Generator, lateral: bool = True) -> tuple[float, float, str]:
    """Azimuth/elevation of a convexity lesion (mostly lateral: fronto-temporo-parietal)."""
    side = "left" if rng.random() < 0.5 else "right"
    base = 0.0 if side == "left" else np.pi
    spread = 0.9 if lateral else 1.4
    phi = base + rng.uniform(-spread, spread)
    theta = rng.uniform(-0.15, 0.7)
    return float(phi), float(theta), side


def _sample_lesions(rng: np.random.Generator, head: HeadSpec) -> set[str]:
    """Lesions with clinically plausible co-occurrence; sets the mass effect and returns bleed sides."""
    a, b, c = head.axes
    lesions: list[Lesion] = []
    sides: set[str] = set()
    mass_score = 0.0
    mass_at = np.zeros(3)
    mass_side = 0
    if rng.random() < 0.27:           # a negative scan (possibly with a non-bleeding mass below)
        kinds = []
    else:
        kinds = [k for k, p in (("IPH", 0.38), ("IVH", 0.28), ("SDH", 0.38), ("EDH", 0.28), ("SAH", 0.42))
                 if rng.random() < p]
        if not kinds:
            kinds = [str(rng.choice(BLEEDS))]
    if "IPH" in kinds and "IVH" not in kinds and rng.random() < 0.3:
        kinds.append("IVH")           # intraventricular extension of a parenchymal bleed
    for kind in kinds:
        if kind == "IPH":
            small = rng.random() < 0.35
            rad = rng.uniform(2.5, 6) if small else rng.uniform(6, 20)
            radii = rad * rng.uniform(0.7, 1.3, size=3)
            if small:
                radii[2] = rng.uniform(1.5, 4.0)     # visible on one or two slices
            for _ in range(50):
                center = rng.uniform(-1, 1, size=3) * np.array([0.55 * a, 0.6 * b, 0.5 * c])
                center[2] = abs(center[2]) * 0.9 - 0.1 * c
                if abs(center[0]) > 10 and np.sum((center / (np.array([a, b, c]) - 20)) ** 2) < 0.7:
                    break
            lesions.append(Lesion("IPH", center, radii, hu=rng.uniform(58, 85), waves=random_waves(rng)))
            sides.add("left" if center[0] > 0 else "right")
            score = float(np.prod(radii)) ** (1 / 3) / 3.0
            if score > mass_score:
                mass_score, mass_at, mass_side = score, center, int(np.sign(center[0]))
        elif kind == "IVH":
            side = str(rng.choice(["left", "right", "both"], p=[0.3, 0.3, 0.4]))
            level = rng.uniform(-5, 25)                   # fluid level (head y), higher = smaller layer
            zc = head.ventricle[5] + rng.uniform(-4, 4)
            zext = rng.uniform(3, 20)
            lesions.append(Lesion("IVH", np.array([0.0, level, zc]), np.array([1.0, 1.0, zext]),
                                  hu=rng.uniform(55, 80), side=side))
            sides.update(["left", "right"] if side == "both" else [side])
        elif kind in ("SDH", "EDH"):
            phi, theta, side = _surface_direction(rng)
            if kind == "SDH":
                thick = rng.uniform(3, 15)
                wphi, wth = rng.uniform(0.5, 1.1), rng.uniform(0.25, 0.8)
                hu = rng.uniform(52, 80)
                score = thick * wphi * 1.2
            else:
                thick = rng.uniform(7, 24)
                wphi, wth = rng.uniform(0.25, 0.5), rng.uniform(0.12, 0.4)
                hu = rng.uniform(60, 90)
                score = thick * wphi * 1.5
            lesions.append(Lesion(kind, np.zeros(3), hu=hu, phi=phi, theta=theta, width_phi=wphi,
                                  width_theta=wth, thickness=thick))
            sides.add(side)
            if score > mass_score:
                mass_score = score
                mass_at = np.array([np.cos(phi) * a * 0.8, np.sin(phi) * b * 0.8, np.sin(theta) * c * 0.8])
                mass_side = 1 if np.cos(phi) > 0 else -1
            if kind == "EDH" and rng.random() < 0.65:
                lesions.append(_fracture(rng, phi, theta))
        elif kind == "SAH":
            phi, theta, side = _surface_direction(rng, lateral=False)
            lesions.append(Lesion("SAH", np.zeros(3), hu=rng.uniform(50, 72), phi=phi, theta=theta,
                                  width_phi=rng.uniform(0.3, 1.0), width_theta=rng.uniform(0.15, 0.7)))
            sides.add(side)
    if not any(lesion.kind == "CalvarialFracture" for lesion in lesions) and rng.random() < 0.14:
        phi, theta, _ = _surface_direction(rng, lateral=False)
        lesions.append(_fracture(rng, phi, theta))
    if rng.random() < 0.08:           # non-bleeding hypodense mass (tumour/infarct oedema): mass effect only
        center = np.array([rng.choice([-1, 1]) * rng.uniform(25, 40), rng.uniform(-30, 30), rng.uniform(0, 25)])
        rad = rng.uniform(16, 26)
        lesions.insert(0, Lesion("Mass", center, rad * rng.uniform(0.8, 1.2, size=3), hu=rng.uniform(12, 20),
                                 waves=random_waves(rng)))
        if rad * 0.6 > mass_score:
            mass_score, mass_at, mass_side = rad * 0.6, center, int(np.sign(center[0]))
    # IVH layers after the rest so its voxels win in the ventricles; surface lesions above SAH
    order = {"Mass": 0, "SAH": 1, "IPH": 2, "IVH": 3, "SDH": 4, "EDH": 5, "CalvarialFracture": 6}
    head.lesions = sorted(lesions, key=lambda lesion: order[lesion.kind])
    if mass_score > 5.0:
        head.compress_side = mass_side
        head.compress = float(np.clip(1.0 - 0.035 * mass_score, 0.35, 0.85))
        head.shift = float(-mass_side * np.clip(0.8 * (mass_score - 5.0), 0.0, 15.0))
        head.shift_center = np.array([0.0, float(mass_at[1]) * 0.5, float(mass_at[2])])
    return sides


def _fracture(rng: np.random.Generator, phi: float, theta: float) -> Lesion:
    vertical = rng.random() < 0.6
    return Lesion("CalvarialFracture", np.zeros(3), phi=phi + rng.uniform(-0.15, 0.15), theta=theta,
                  width_phi=rng.uniform(0.05, 0.2) if vertical else rng.uniform(0.15, 0.45),
                  width_theta=rng.uniform(0.15, 0.5) if vertical else rng.uniform(0.05, 0.12),
                  thickness=rng.uniform(1.2, 2.6))


# ----------------------------------------------------------------------------- rendering

def min_pixels(rows: int, spacing: float) -> int:
    """Smallest lesion area (pixels) that makes a slice positive: about 6 mm^2."""
    return max(2, round(6.0 / spacing ** 2))


def render_scan_series(scan: ScanSpec, series: SeriesSpec, seed: int, which: int = 0) -> RenderedSeries:
    """Render one series of a scan and derive its slice labels (9 classes, CLASSES order)."""
    rng = np.random.default_rng([seed, scan.index, 9000 + which])
    n, rows, spacing = series.n_slices, series.rows, series.spacing
    row_dir = np.array([1.0, 0.0, 0.0])
    col_dir = np.array([0.0, np.cos(series.tilt), -np.sin(series.tilt)])
    half = (rows - 1) * spacing / 2.0
    z = scan.z_start + series.thickness / 2.0 + np.arange(n) * series.thickness
    # the image centre is the isocentre (x = y = 0) of each slice; the head sits near it
    positions = np.stack([np.full(n, -half), np.full(n, -half * col_dir[1]), z - half * col_dir[2]], axis=1)
    hu, owner, shift = render_series(scan.head, positions, row_dir, col_dir, rows, rows, spacing, rng,
                                     contrast=series.contrast)
    need = min_pixels(rows, spacing)
    labels = np.zeros((n, len(CLASSES)), dtype=np.int8)
    counts = {name: (owner == code).reshape(n, -1).sum(axis=1) for name, code in OWNER_CODE.items()}
    for name, count in counts.items():
        labels[:, CLASSES.index(name)] = count >= need
    labels[:, CLASSES.index("ICH")] = labels[:, [CLASSES.index(k) for k in BLEEDS]].max(axis=1)
    labels[:, CLASSES.index("MassEffect")] = shift >= 1.5
    labels[:, CLASSES.index("MidlineShift")] = (shift >= 2.5) & (abs(scan.head.shift) >= 4.5)
    return RenderedSeries(series, hu, owner, labels, positions, row_dir, col_dir)


# ----------------------------------------------------------------------------- DICOM

def _uid(*parts) -> str:
    return generate_uid(entropy_srcs=["drct-phantom", *map(str, parts)])


def _hex(n: int, *parts) -> str:
    return hashlib.sha256("|".join(map(str, ("drct-phantom", *parts))).encode()).hexdigest()[:n]


def _dataset(pixels: np.ndarray, position, row_dir, col_dir, series: SeriesSpec, instance: int,
             sop_uid: str, series_uid: str, study_uid: str, patient_id: str, series_number: int,
             for_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = "DRCT_PHANTOM_1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20190101"
    ds.Modality = "CT"
    ds.Manufacturer = "DRCT PHANTOM"
    ds.StudyDescription = "CT HEAD"
    ds.SeriesDescription = series.description
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.BodyPartExamined = "HEAD"
    ds.SliceThickness = f"{series.thickness:.3f}"
    ds.KVP = "120"
    ds.GantryDetectorTilt = f"{np.rad2deg(series.tilt):.2f}"
    ds.ConvolutionKernel = "H31s" if not series.contrast else "H30s"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    ds.ImageOrientationPatient = [f"{v + 0.0:.6f}" for v in np.round((*row_dir, *col_dir), 6)]
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{position[2]:.4f}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [f"{series.spacing:.6f}", f"{series.spacing:.6f}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = ["40", "400"] if instance % 7 == 0 else "40"
    ds.WindowWidth = ["80", "2000"] if instance % 7 == 0 else "80"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    stored = (pixels.astype(np.int32) + 1024).astype("<i2")
    ds.PixelData = stored.tobytes()
    return ds


def _write_series(rendered: RenderedSeries, folder: Path, names: list[str], sop_uids: list[str],
                  series_uid: str, study_uid: str, patient_id: str, series_number: int, for_uid: str) -> int:
    """Write a series; names/sop_uids are in z order; returns bytes written."""
    n = len(names)
    order = np.arange(n)[::-1] if rendered.spec.descending else np.arange(n)
    written = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # RSNA-style "ID_..." UIDs are not dotted, as in the real data
        for instance, k in enumerate(order, start=1):
            ds = _dataset(rendered.hu[k], rendered.positions[k], rendered.row_dir, rendered.col_dir,
                          rendered.spec, instance, sop_uids[k], series_uid, study_uid, patient_id,
                          series_number, for_uid)
            path = folder / names[k]
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
            written += path.stat().st_size
    return written


# ----------------------------------------------------------------------------- layouts

@dataclass
class PhantomSummary:
    layout: str
    scans: int
    patients: int
    series: int
    files: int
    bytes: int
    scan_counts: dict[str, int]        # scans positive per class (layout's class names)
    slice_counts: dict[str, int]       # slices positive per class (plain series)

    def format(self) -> str:
        lines = [(f"phantom ({self.layout}): {self.scans} scans, {self.patients} patients, {self.series} series, "
                  f"{self.files} files, {self.bytes / 2 ** 20:.1f} MiB"),
                 f"{'class':<18}{'scans':>7}{'slices':>8}"]
        for name, count in self.scan_counts.items():
            lines.append(f"{name:<18}{count:>7}{self.slice_counts[name]:>8}")
        return "\n".join(lines)


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file() and not force:
            raise PhantomError(f"output folder {out} is not empty and holds no phantom ({MARKER}); "
                               "choose another folder or pass --force to replace its contents")
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def make_phantom(out: str | Path, layout: str = "rsna", scans: int = 60, seed: int = 0, size: int = 256,
                 force: bool = False, progress=None) -> PhantomSummary:
    """Write a phantom dataset to `out` and return its summary.

    An existing phantom in `out` (recognised by its phantom.json marker) is replaced; any other
    non-empty folder is refused unless `force`. `progress(i, n)` is called after each scan.
    """
    if layout not in WRITERS:
        raise PhantomError(f"unknown phantom layout '{layout}' (choose one of {', '.join(WRITERS)})")
    if scans < 1:
        raise PhantomError(f"--scans must be at least 1, got {scans}")
    if not 32 <= size <= 1024:
        raise PhantomError(f"--size must be between 32 and 1024 pixels, got {size}")
    out = Path(out)
    _prepare_out(out, force)
    summary = WRITERS[layout](out, scans, seed, size, progress)
    params = {"layout": layout, "scans": scans, "seed": seed, "size": size,
              "summary": {"scan_counts": summary.scan_counts, "slice_counts": summary.slice_counts}}
    (out / MARKER).write_text(json.dumps(params, indent=2) + "\n")
    write_phantom_key(out, seed)
    return summary


def write_phantom_key(out: Path, seed: int) -> Path:
    """The pseudonym key beside the phantom (pipeline/pseudonym.py), derived from the seed.

    Patient pseudonyms order the patients for the folds and the bootstrap, so a fresh random key
    per `dvc repro` (DVC deletes data/phantom before the data stage) gave other folds and other
    metrics on every clone. Made-up data has no identity to protect, so its key is reproducible;
    real data keeps its random key beside it."""
    path = out / KEY_NAME
    path.write_text(hashlib.sha256(f"drct phantom pseudonym key {seed}".encode()).hexdigest() + "\n")
    path.chmod(0o600)
    return path


def _patients(rng: np.random.Generator, scans: int) -> list[int]:
    """Patient number of each scan: about one in eight scans is a follow-up of the previous patient."""
    patient, numbers = -1, []
    for k in range(scans):
        if k == 0 or rng.random() >= 0.12:
            patient += 1
        numbers.append(patient)
    return numbers


def _write_rsna(out: Path, scans: int, seed: int, size: int, progress) -> PhantomSummary:
    images = out / "stage_2_train"
    images.mkdir()
    rng = np.random.default_rng([seed, 31])
    patients = _patients(rng, scans)
    rows_csv, truth_rows, used = [], [], set()
    total_bytes = files = 0
    scan_counts = dict.fromkeys(RSNA_LABELS, 0)
    slice_counts = dict.fromkeys(RSNA_LABELS, 0)
    cols = [CLASSES.index(RSNA_FROM_CLASS[name]) for name in RSNA_LABELS]
    for k in range(scans):
        scan = sample_scan(seed, k, size, "rsna")
        rendered = render_scan_series(scan, scan.series[0], seed)
        patient_id = "ID_" + _hex(8, seed, "patient", patients[k])
        study_uid = "ID_" + _hex(10, seed, "study", k)
        series_uid = "ID_" + _hex(10, seed, "series", k)
        sop_ids = []
        for j in range(scan.series[0].n_slices):
            h = _hex(9, seed, "sop", k, j)
            salt = 0
            while h in used:
                salt += 1
                h = _hex(9, seed, "sop", k, j, salt)
            used.add(h)
            sop_ids.append("ID_" + h)
        names = [s + ".dcm" for s in sop_ids]
        total_bytes += _write_series(rendered, images, names, sop_ids, series_uid, study_uid, patient_id, 1,
                                     _uid(seed, "for", k))
        files += len(names)
        slice_labels = rendered.labels[:, cols]
        for sop, lab in zip(sop_ids, slice_labels):
            for name in RSNA_CSV_ORDER:
                rows_csv.append((f"{sop}_{name}", int(lab[RSNA_LABELS.index(name)])))
        scan_labels = slice_labels.max(axis=0)
        truth_rows.append([series_uid, patient_id, study_uid, len(sop_ids), *map(int, scan_labels)])
        for i, name in enumerate(RSNA_LABELS):
            scan_counts[name] += int(scan_labels[i])
            slice_counts[name] += int(slice_labels[:, i].sum())
        if progress:
            progress(k + 1, scans)
    # the real CSV is not in z order and holds a few exact duplicate rows
    image_order = rng.permutation(len(rows_csv) // 6)
    lines = [rows_csv[6 * i + j] for i in image_order for j in range(6)]
    dups = [lines[int(i)] for i in rng.choice(len(lines), size=max(1, len(lines) // 2000), replace=False)]
    with open(out / "stage_2_train.csv", "w", newline="") as handle:
        writer = csv_safe.writer(handle)
        writer.writerow(["ID", "Label"])
        writer.writerows(lines + dups)
    _write_truth(out, ["scan_id", "patient_id", "study_uid", "n_slices", *RSNA_LABELS], truth_rows)
    return PhantomSummary("rsna", scans, len(set(patients)), scans, files, total_bytes, scan_counts, slice_counts)


def _write_truth(out: Path, header: list[str], rows: list[list]) -> None:
    with open(out / "scans_truth.csv", "w", newline="") as handle:
        writer = csv_safe.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def reader_reads(truth: dict[str, int], rng: np.random.Generator, flip: float = 0.04) -> list[int]:
    """One radiologist's read (READ_COLUMNS order): the truth with each label flipped with
    probability `flip`; ICH then follows the reader's own subtype calls when any is positive."""
    values = {name: int(truth.get(name, 0)) for name in READ_COLUMNS}
    for name in READ_COLUMNS:
        if name != "OtherFracture" and rng.random() < flip:
            values[name] = 1 - values[name]
    if any(values[b] for b in BLEEDS):
        values["ICH"] = 1
    return [values[name] for name in READ_COLUMNS]


def _write_cq500(out: Path, scans: int, seed: int, size: int, progress) -> PhantomSummary:
    read_rows, slice_rows, truth_rows = [], [], []
    total_bytes = files = n_series = 0
    scan_counts = dict.fromkeys(CQ500_LABELS, 0)
    slice_counts = dict.fromkeys(CQ500_LABELS, 0)
    for k in range(scans):
        scan = sample_scan(seed, k, size, "cq500")
        name = f"CQ500-CT-{k}"
        study = out / f"CQ500CT{k} CQ500CT{k}" / "Unknown Study"
        study_uid = _uid(seed, "study", k)
        for_uid = _uid(seed, "for", k)
        for s, series in enumerate(scan.series):
            rendered = render_scan_series(scan, series, seed, which=s)
            folder = study / series.description
            folder.mkdir(parents=True)
            series_uid = _uid(seed, "series", k, s)
            sop_uids = [_uid(seed, "sop", k, s, j) for j in range(series.n_slices)]
            # CT000000.dcm ... numbered in acquisition order (head->feet for some series)
            order = np.arange(series.n_slices)[::-1] if series.descending else np.arange(series.n_slices)
            names = [""] * series.n_slices
            for idx, z_index in enumerate(order):
                names[z_index] = f"CT{idx:06d}.dcm"
            total_bytes += _write_series(rendered, folder, names, sop_uids, series_uid, study_uid, name, s + 1,
                                         for_uid)
            files += series.n_slices
            n_series += 1
            for sop, lab in zip(sop_uids, rendered.labels):
                slice_rows.append([sop, *map(int, lab)])
            if s == 0:
                scan_labels = rendered.labels.max(axis=0)
                truth_rows.append([series_uid, name, name, series.description, series.n_slices,
                                   *map(int, scan_labels)])
                for i, cls in enumerate(CQ500_LABELS):
                    scan_counts[cls] += int(scan_labels[i])
                    slice_counts[cls] += int(rendered.labels[:, i].sum())
        truth = dict(zip(CQ500_LABELS, map(int, scan_labels)))
        truth["BleedLocation-Left"] = int(truth["ICH"] and "left" in scan.lesion_sides)
        truth["BleedLocation-Right"] = int(truth["ICH"] and "right" in scan.lesion_sides)
        truth["ChronicBleed"] = int(scan.chronic and truth["SDH"])
        truth["Fracture"] = truth["CalvarialFracture"]
        rrng = np.random.default_rng([seed, k, 555])
        reads = [reader_reads(truth, rrng) for _ in range(3)]
        read_rows.append([name, "B1", *[v for read in reads for v in read]])
        if progress:
            progress(k + 1, scans)
    with open(out / "reads.csv", "w", newline="") as handle:
        writer = csv_safe.writer(handle)
        writer.writerow(["name", "Category", *[f"{r}:{c}" for r in ("R1", "R2", "R3") for c in READ_COLUMNS]])
        writer.writerows(read_rows)
    with open(out / "slice_labels.csv", "w", newline="") as handle:
        writer = csv_safe.writer(handle)
        writer.writerow(["SOPInstanceUID", *CQ500_LABELS])
        writer.writerows(slice_rows)
    _write_truth(out, ["scan_id", "patient_id", "name", "series_description", "n_slices", *CQ500_LABELS],
                 truth_rows)
    return PhantomSummary("cq500", scans, scans, n_series, files, total_bytes, scan_counts, slice_counts)


# The layouts the phantom writes (pipeline/data/layouts.py's PHANTOM_LAYOUTS: what `drct phantom` offers).
WRITERS = {"rsna": _write_rsna, "cq500": _write_cq500}
