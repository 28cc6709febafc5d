"""Analytic head anatomy and lesions for the synthetic head-CT phantom.

Why analytic: every tissue and lesion is a closed-form function of the patient coordinate of a
voxel, so a series can be sampled on any grid (any matrix size, slice thickness, gantry tilt)
without resampling a voxel volume, and the ground truth (which voxel is which lesion) comes out
of the same evaluation that paints the pixels. The head is built in a *head frame* (millimetres,
DICOM patient axes: +x patient left, +y posterior, +z superior, origin at the head centre); the
series geometry maps pixels to patient coordinates and a per-scan rigid transform maps those
into the head frame (slight rotation, off-centre position).

CT values follow the brief of the DrCT2 reproduction: air -1000, fat about -90, CSF about 5,
white matter about 28, grey matter about 38, acute blood 50-90, bone 700-1500 HU. Lesions are the
DrCT2 classes (paper, CQ500 and RSNA labels): intraparenchymal blob, intraventricular blood that
layers in the dependent (posterior) horns, subdural crescent, epidural lens, subarachnoid blood in
sulci, a calvarial fracture line, and mass effect / midline shift as a smooth displacement of the
midline structures and ventricles away from a large lesion. Confounders that are *not* lesions:
the dense superior sagittal sinus, pineal and choroid-plexus calcifications (paper, Figure 3),
a head rest, paranasal sinus air, skull base bone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter

# The nine DrCT2/CQ500 classes in pipeline.data.labels order; the phantom works in these and the
# RSNA writer maps them (ICH->any, EDH->epidural, ...).
CLASSES = ["ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "CalvarialFracture", "MassEffect", "MidlineShift"]
BLEEDS = ["IPH", "IVH", "SDH", "EDH", "SAH"]
PAINTED = ["IPH", "IVH", "SDH", "EDH", "SAH", "CalvarialFracture"]  # classes owning voxels
OWNER_CODE = {name: i + 1 for i, name in enumerate(PAINTED)}          # 0 = no lesion


@dataclass
class Lesion:
    """One lesion; `kind` is a painted class (see PAINTED) or 'Mass' (non-bleeding hypodense mass)."""

    kind: str
    center: np.ndarray            # head-frame mm (IPH/Mass), or unused for surface lesions
    radii: np.ndarray = field(default_factory=lambda: np.ones(3))
    hu: float = 70.0
    phi: float = 0.0              # azimuth of a surface lesion (rad, 0 = patient left)
    theta: float = 0.0            # elevation of a surface lesion (rad)
    width_phi: float = 0.5        # angular half extents (rad)
    width_theta: float = 0.3
    thickness: float = 8.0        # mm (SDH/EDH max thickness, fracture gap, IVH level)
    waves: np.ndarray = field(default_factory=lambda: np.zeros((3, 4)))  # lobulation: (dir xyz, phase)
    side: str = "both"            # IVH: left | right | both


@dataclass
class HeadSpec:
    """Everything that defines one phantom head (anatomy, lesions, acquisition contrast)."""

    center: np.ndarray            # head centre in patient coordinates (mm)
    rotation: np.ndarray          # 3x3, patient -> head frame (applied after subtracting center)
    axes: np.ndarray              # outer semi-axes a (LR), b (AP), c (SI) in mm
    harmonics: np.ndarray         # (e2, alpha, e3, beta): head-shape perturbation
    scalp: float
    skull: float
    csf_gap: float
    gm: float
    wm: float
    csf: float
    cortex: float
    ventricle: np.ndarray         # (half-gap x, semi-x, semi-y, semi-z, centre y, centre z)
    sulcal_waves: np.ndarray      # (3, 4): unit direction + phase of three plane waves
    sulcal_freq: float
    sulcal_width: float
    sulcal_depth: float
    noise: float                  # HU standard deviation of the (slightly correlated) noise
    blur: float                   # mm, in-plane point spread (Gaussian sigma)
    lesions: list[Lesion] = field(default_factory=list)
    shift: float = 0.0            # midline shift in mm (positive = towards patient left)
    shift_center: np.ndarray = field(default_factory=lambda: np.zeros(3))
    compress_side: int = 0        # +1: left ventricle compressed, -1: right, 0: none
    compress: float = 1.0
    calcifications: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))  # x, y, z, radius


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def rotation_matrix(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation about z (yaw), x (pitch), y (roll), radians."""
    cz, sz = np.cos(yaw), np.sin(yaw)
    cx, sx = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(roll), np.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return rz @ rx @ ry


def random_waves(rng: np.random.Generator, n: int = 3) -> np.ndarray:
    dirs = rng.normal(size=(n, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return np.concatenate([dirs, rng.uniform(0, 2 * np.pi, size=(n, 1))], axis=1)


def _wave_field(waves: np.ndarray, x, y, z, freq: float):
    """Sum of plane waves: a smooth random field used for sulci and lesion lobulation."""
    total = 0.0
    for dx, dy, dz, phase in np.asarray(waves).tolist():
        total = total + np.cos(freq * (dx * x + dy * y + dz * z) + phase)
    return total


def shift_field(spec: HeadSpec, x, y, z):
    """Lateral displacement (mm) of brain structures at head-frame points: a smooth bump centred
    on the compressing lesion, so the midline and ventricles bow away from it (mass effect)."""
    if spec.shift == 0.0:
        return np.zeros_like(x)
    _, cy, cz = (float(v) for v in spec.shift_center)   # centred on the midline (x = 0)
    g = np.exp(-((x / 45.0) ** 2 + ((y - cy) / 60.0) ** 2 + ((z - cz) / 35.0) ** 2) / 2.0)
    return (float(spec.shift) * g).astype(np.float32)


def render_chunk(spec: HeadSpec, points: np.ndarray, contrast: bool = False):
    """HU (float32, before blur/noise) and lesion owner codes for patient points (..., 3)."""
    # float32 throughout: numpy float64 scalars would silently promote every array (NEP 50)
    p = (points - spec.center.astype(np.float32)) @ spec.rotation.T.astype(np.float32)
    x, y, z = (np.ascontiguousarray(p[..., i]) for i in range(3))
    a, b, c = (float(v) for v in spec.axes)
    r = np.sqrt(x * x + y * y + z * z) + 1e-3
    phi = np.arctan2(y, x)
    e2, al, e3, be = (float(v) for v in spec.harmonics)
    rho = np.sqrt((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2)
    rho = rho / (1.0 + e2 * np.cos(2 * phi + al) + e3 * np.cos(3 * phi + be))
    rho = np.maximum(rho, 1e-4)
    depth = r / rho - r                     # radial depth below the skin (mm), negative outside
    inner = depth - spec.scalp - spec.skull  # depth below the inner table
    hu = np.full(x.shape, -1000.0, dtype=np.float32)
    owner = np.zeros(x.shape, dtype=np.int8)

    # head rest: a plastic cradle under the occiput
    rest = (depth < -6.0) & (depth > -11.0) & (y > 0.35 * b) & (np.abs(z) < 0.9 * c)
    hu[rest] = 60.0
    # scalp: skin then fat
    scalp = (depth >= 0) & (depth < spec.scalp)
    hu[scalp] = np.where(depth[scalp] < 1.5, 35.0, -90.0)
    # calvarium: dense outer and inner tables around a less dense diploe
    skull = (depth >= spec.scalp) & (inner < 0)
    frac = (depth[skull] - spec.scalp) / spec.skull
    hu[skull] = np.where((frac > 0.3) & (frac < 0.7), 650.0, 1350.0)
    # skull base: the lowest slices are mostly bone except the posterior fossa
    zn = z / c
    fossa = ((x / (0.5 * a)) ** 2 + ((y - 0.35 * b) / (0.45 * b)) ** 2 < 1) \
        | (((np.abs(x) - 0.5 * a) / (0.28 * a)) ** 2 + ((y + 0.15 * b) / (0.35 * b)) ** 2 < 1)
    base = (inner >= 0) & (zn < -0.36) & ~(fossa & (zn > -0.46 - 0.1 * (y > 0)))
    hu[base] = 900.0
    # paranasal (frontal) sinus air with a bony rim, low and anterior
    sinus = ((x / 14.0) ** 2 + ((y + b - spec.scalp - spec.skull - 4) / 7.0) ** 2 + ((zn + 0.3) / 0.12) ** 2) < 1
    hu[sinus & (depth > spec.scalp)] = -1000.0

    brain_all = (inner >= 0) & ~base
    hu[brain_all & (inner < spec.csf_gap)] = spec.csf
    brain = brain_all & (inner >= spec.csf_gap)
    bdepth = inner - spec.csf_gap
    hu[brain] = np.where(bdepth[brain] < spec.cortex, spec.gm, spec.wm)

    dx = shift_field(spec, x, y, z)
    xs = x - dx                             # structure coordinates: midline bowed by the shift
    # deep grey nuclei
    for side in (-1.0, 1.0):
        nuc = ((xs - side * 20.0) / 8.0) ** 2 + ((y + 2.0) / 14.0) ** 2 + ((z + 4.0) / 10.0) ** 2 < 1
        hu[nuc & brain] = spec.gm + 2.0

    # sulci: zero level set of a random smooth field on the cortex, tapering with depth
    u = np.stack([x / r, y / r, z / r])
    sfield = _wave_field(spec.sulcal_waves, u[0], u[1], u[2], spec.sulcal_freq)
    width = spec.sulcal_width * np.clip(1.0 - bdepth / spec.sulcal_depth, 0.0, 1.0)
    if spec.compress_side:
        # effacement: sulci on the side of the mass are squeezed shut
        eff = np.clip(spec.compress_side * x / 20.0, 0.0, 1.0) * np.exp(-(((z - spec.shift_center[2]) / 40) ** 2))
        width = width * (1.0 - 0.8 * eff)
    sulci = brain & (np.abs(sfield) < width)
    hu[sulci] = spec.csf
    # interhemispheric fissure with the falx
    fiss = brain & (np.abs(xs) < 1.6) & ((zn > 0.12) | (np.abs(y) > 32.0)) & (zn > -0.3)
    hu[fiss] = spec.csf
    hu[brain & (np.abs(xs) < 0.5) & (zn > 0.12)] = 48.0

    # ventricles (lateral: arched ellipsoids; third; fourth)
    gx, sx, sy, sz, vy, vz = (float(v) for v in spec.ventricle)
    vent = np.zeros(x.shape, dtype=bool)
    for side in (-1.0, 1.0):
        k = spec.compress if side == spec.compress_side else 1.0
        arch = vz + 10.0 * (1.0 - ((y - vy) / sy) ** 2) - 8.0
        widen = 1.0 + 0.6 * np.clip((y - vy) / sy, 0.0, 1.0)   # atria are wider
        lat = ((xs - side * (gx + sx * widen)) / (sx * widen * k)) ** 2 + ((y - vy) / sy) ** 2 \
            + ((z - arch) / (sz * k)) ** 2 < 1
        vent |= lat & ((xs * side) > 0.5)
    vent |= (np.abs(xs) < 2.0) & (np.abs(y - vy) < 10.0) & (np.abs(z - (vz - 18.0)) < 7.0)
    vent |= ((xs / 6.0) ** 2 + ((y - 0.45 * b) / 5.0) ** 2 + ((zn + 0.36) / 0.06) ** 2) < 1
    vent &= brain
    hu[vent] = spec.csf

    # superior sagittal sinus: dense venous blood under the vault in the midline (not a lesion)
    sss = (np.abs(xs) < 3.5) & (inner >= 0) & (inner < 5.0) & (zn > -0.1) & ~base
    hu[sss] = 200.0 if contrast else 52.0
    if contrast:
        hu[brain & ~vent & ~sulci] += 6.0
        # middle cerebral arteries in the sylvian fissures
        mca = (np.abs(np.abs(xs) - 30.0) < 25.0) & (np.abs(y + 10.0) < 2.0) & (np.abs(z + 0.2 * c) < 2.0)
        hu[mca & brain] = 180.0
    for cx_, cy_, cz_, rad in spec.calcifications.tolist():
        calc = ((xs - cx_) ** 2 + (y - cy_) ** 2 + (z - cz_) ** 2) < rad * rad
        hu[calc & brain] = 220.0

    # lesions, in clinical layering order; owner records what finally covers each voxel
    for lesion in spec.lesions:
        _paint(lesion, spec, hu, owner, x, y, z, xs, r, phi, inner, brain, vent, sulci, bdepth, skull, depth)
    return hu, owner


def _angles(lesion: Lesion, phi, z, r):
    dphi = np.remainder(phi - np.float32(lesion.phi + np.pi), np.float32(2 * np.pi)) - np.float32(np.pi)
    dth = np.arcsin(np.clip(z / r, -1, 1)) - np.float32(lesion.theta)
    return np.sqrt((dphi / float(lesion.width_phi)) ** 2 + (dth / float(lesion.width_theta)) ** 2)


def _paint(lesion, spec, hu, owner, x, y, z, xs, r, phi, inner, brain, vent, sulci, bdepth, skull, depth):
    kind = lesion.kind
    if kind in ("IPH", "Mass"):
        cx, cy, cz = (float(v) for v in lesion.center)
        rx, ry, rz = (float(v) for v in lesion.radii)
        q = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2
        lobes = 1.0 + 0.18 * _wave_field(lesion.waves, (x - cx) / rx, (y - cy) / ry, (z - cz) / rz, 2.5) / 3
        q = q / lobes ** 2
        if kind == "Mass":
            m = (q < 1.0) & brain
            hu[m] = lesion.hu
            return
        edema = (q < 1.6) & (q >= 1.0) & brain & ~vent
        hu[edema] = np.minimum(hu[edema], spec.wm - 8.0)
        m = (q < 1.0) & brain
        hu[m] = lesion.hu
        owner[m] = OWNER_CODE["IPH"]
    elif kind == "IVH":
        m = vent & (y > lesion.center[1])          # blood settles in the dependent (posterior) horns
        if lesion.side == "left":
            m &= xs > 0
        elif lesion.side == "right":
            m &= xs < 0
        m &= np.abs(z - lesion.center[2]) < lesion.radii[2]
        hu[m] = lesion.hu
        owner[m] = OWNER_CODE["IVH"]
    elif kind in ("SDH", "EDH"):
        w = _angles(lesion, phi, z, r)
        if kind == "SDH":   # crescent: nearly uniform thickness, tapering at the ends
            t = lesion.thickness * np.sqrt(np.clip(1.0 - w ** 4, 0.0, 1.0))
        else:               # lens: biconvex, thickest in the middle
            t = lesion.thickness * np.clip(1.0 - w ** 2, 0.0, 1.0)
        m = (inner >= 0) & (inner < t) & (t > 0.6) & (brain | (inner < spec.csf_gap + t))
        m &= ~(skull)
        hu[m] = lesion.hu
        owner[m] = OWNER_CODE[kind]
    elif kind == "SAH":
        w = _angles(lesion, phi, z, r)
        region = w < 1.0
        near = brain & (bdepth < spec.sulcal_depth) & region
        # blood distends the sulci it fills and coats the fissure / cortical surface
        wide = near & (np.abs(_wave_field(spec.sulcal_waves, x / r, y / r, z / r, spec.sulcal_freq))
                       < spec.sulcal_width * 2.5 * np.clip(1.0 - bdepth / spec.sulcal_depth, 0.0, 1.0))
        m = wide | (region & (inner >= 0) & (inner < spec.csf_gap) & ~skull)
        m |= region & brain & (np.abs(xs) < 1.6) & (z / spec.axes[2] > -0.3)
        hu[m] = lesion.hu
        owner[m] = OWNER_CODE["SAH"]
    elif kind == "CalvarialFracture":
        w = _angles(lesion, phi, z, r)
        # a gap along a great circle through the lesion centre, limited in length
        normal = np.array([-np.sin(lesion.phi), np.cos(lesion.phi), 0.0]) if lesion.width_theta > lesion.width_phi \
            else np.array([-np.sin(lesion.theta) * np.cos(lesion.phi), -np.sin(lesion.theta) * np.sin(lesion.phi),
                           np.cos(lesion.theta)])
        dist = np.abs(normal[0] * x + normal[1] * y + normal[2] * z)
        m = skull & (w < 1.0) & (dist < lesion.thickness / 2.0)
        hu[m] = 45.0
        owner[m] = OWNER_CODE["CalvarialFracture"]
        # soft-tissue swelling over the fracture (scalp haematoma, not an ICH)
        swell = (depth >= 0) & (depth < spec.scalp + 0.1) & (w < 0.8)
        hu[swell] = 55.0


def render_series(spec: HeadSpec, positions: np.ndarray, row_dir: np.ndarray, col_dir: np.ndarray,
                  rows: int, cols: int, spacing: float, rng: np.random.Generator,
                  contrast: bool = False, chunk: int = 8):
    """Sample the head on a series grid.

    Returns (hu int16 (n, rows, cols), owner int8 (n, rows, cols), max |midline displacement| per
    slice over brain voxels (n,) in mm). Pixel (i, j) of slice k lies at
    positions[k] + j*spacing*row_dir + i*spacing*col_dir (DICOM ImageOrientationPatient convention).
    """
    n = len(positions)
    jj = (np.arange(cols, dtype=np.float32) * spacing)[None, :, None] * row_dir[None, None, :]
    ii = (np.arange(rows, dtype=np.float32) * spacing)[:, None, None] * col_dir[None, None, :]
    plane = (ii + jj).astype(np.float32)                       # (rows, cols, 3)
    hu = np.empty((n, rows, cols), dtype=np.float32)
    owner = np.empty((n, rows, cols), dtype=np.int8)
    shift = np.zeros(n, dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        pts = plane[None] + positions[start:stop, None, None, :].astype(np.float32)
        h, o = render_chunk(spec, pts, contrast=contrast)
        hu[start:stop] = h
        owner[start:stop] = o
        if spec.shift:
            p = (pts - spec.center) @ spec.rotation.T
            d = np.abs(shift_field(spec, p[..., 0], p[..., 1], p[..., 2]))
            inside = (h > 0) & (h < 100)
            shift[start:stop] = np.where(inside, d, 0).reshape(stop - start, -1).max(axis=1)
    # point spread of the scanner, then slightly correlated quantum noise
    if spec.blur > 0:   # blur is in mm: the same scanner looks sharper on a coarser matrix
        sigma = spec.blur / spacing
        hu = gaussian_filter(hu, sigma=(0, sigma, sigma), mode="nearest")
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    noise = gaussian_filter(noise, sigma=(0, 0.6, 0.6)) * (spec.noise / 0.47)
    hu += noise
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), owner, shift
