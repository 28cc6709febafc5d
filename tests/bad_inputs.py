"""A generated bad-input corpus: one small folder-layout DICOM tree holding every hostile case
of issues 11 and 16 next to good scans, so one extraction exercises them all.

`write_corpus(root)` returns {case name: path of the file or folder that carries the case}.
Scans (one SeriesInstanceUID each) are 3-4 slices of 16 px; the expected outcome of each case
is asserted in tests/test_bad_input.py.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pydicom
import pydicom.config
from dicom_fixtures import write_deflated_bomb, write_slice

from cache.writer import rejects_path

SIZE = 16
PHI = {"PatientName": "Doe^Jane", "PatientID": "MRN-4711-SECRET", "PatientBirthDate": "19610203"}


def pixels(k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed * 100 + k)
    stored = rng.integers(900, 1200, size=(SIZE, SIZE)).astype(np.int16)
    stored[2:6, 2:6] = 2500
    return stored


def retag(path: str | Path, **tags) -> str:
    """Rewrite tags of a written slice without value validation (so NaN, NUL, bytes get through)."""
    with pydicom.config.disable_value_validation():
        ds = pydicom.dcmread(path)
        for keyword, value in tags.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path)
    return str(path)


def series(folder: Path, uid: str, n: int = 3, seed: int = 0, patient_id: str = "P-ok", **kwargs) -> list[str]:
    """n good slices of one series (z = 0, 5, 10 ...)."""
    return [
        write_slice(folder / f"im{k}.dcm", pixels(k, seed), ipp=(0.0, 0.0, 5.0 * k), instance_number=k + 1,
                    series_uid=uid, study_uid=uid + ".0", patient_id=patient_id, **kwargs)
        for k in range(n)
    ]


def write_corpus(root: str | Path) -> dict[str, str]:
    root = Path(root)
    case: dict[str, str] = {}
    series(root / "good", "1.1.1", n=4, seed=1)
    case["good"] = "1.1.1"

    # 1. bad pixel scaling: each bad slice is rejected, the scan keeps its two good slices.
    scaling = root / "scaling"
    series(scaling, "1.1.2", n=2, seed=2)
    for k, (name, slope) in enumerate(
        [("slope_nan", "NaN"), ("slope_inf", "inf"), ("slope_1e300", "1e300"), ("slope_zero", "0")], start=2
    ):
        path = write_slice(scaling / f"{name}.dcm", pixels(k, 2), ipp=(0.0, 0.0, 5.0 * k), instance_number=k + 1,
                           series_uid="1.1.2", study_uid="1.1.2.0", patient_id="P-ok")
        case[name] = retag(path, RescaleSlope=slope)
    path = write_slice(scaling / "rows_mismatch.dcm", pixels(9, 2), ipp=(0.0, 0.0, 45.0), instance_number=10,
                       series_uid="1.1.2", study_uid="1.1.2.0", patient_id="P-ok")
    case["rows_mismatch"] = retag(path, Rows=SIZE + 1)
    case["scaling_scan"] = "1.1.2"

    # 1. an MR series: refused (unless dataset.allow_modalities lists MR).
    for path in series(root / "mr", "1.1.3", seed=3):
        retag(path, Modality="MR")
    case["mr_scan"] = "1.1.3"

    # 2. tag values: NUL, very long, non-UTF-8; the scans are kept.
    for path in series(root / "nul", "1.1.4", seed=4):
        retag(path, PatientID="AB\x00CD")
    case["nul_scan"] = "1.1.4"
    for path in series(root / "long", "1.1.5", seed=5):
        retag(path, PatientID="L" * 5000, SeriesDescription="x" * 10000)
    case["long_scan"] = "1.1.5"
    for path in series(root / "latin", "1.1.6", seed=6):
        retag(path, PatientID=b"caf\xe9\xff\xfe")
    case["non_utf8_scan"] = "1.1.6"

    # 6. PHI: a scan that carries name, id and birth date.
    for path in series(root / "phi", "1.1.7", seed=7, patient_id=PHI["PatientID"]):
        retag(path, PatientName=PHI["PatientName"], PatientBirthDate=PHI["PatientBirthDate"])
    case["phi_scan"] = "1.1.7"

    # 7. CSV injection: ids that a spreadsheet would run as formulas.
    series(root / "formula", "1.1.8", seed=8, patient_id='=HYPERLINK("http://evil","x")')
    case["formula_scan"] = "1.1.8"

    # Cases that already passed before issue 11 (kept so they stay passing).
    junk = root / "junk"
    junk.mkdir()
    (junk / "zero.dcm").write_bytes(b"")
    (junk / "text.dcm").write_text("just some text, not DICOM\n" * 20)
    (junk / "random.dcm").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (junk / "image.dcm").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 200)
    case.update({name: str(junk / f"{name}.dcm") for name in ("zero", "text", "random", "image")})
    odd = root / "odd"
    series(odd, "1.1.9", n=3, seed=9)
    case["no_pixels"] = retag(
        write_slice(odd / "nopix.dcm", pixels(5, 9), ipp=(0.0, 0.0, 25.0), series_uid="1.1.9", study_uid="1.1.9.0",
                    patient_id="P-ok", instance_number=6),
        PixelData=None,
    )
    truncated = write_slice(odd / "trunc.dcm", pixels(6, 9), ipp=(0.0, 0.0, 30.0), series_uid="1.1.9",
                            study_uid="1.1.9.0", patient_id="P-ok", instance_number=7, truncate_pixels=100)
    case["truncated"] = truncated
    case["rgb"] = retag(
        write_slice(odd / "rgb.dcm", pixels(7, 9), ipp=(0.0, 0.0, 35.0), series_uid="1.1.9", study_uid="1.1.9.0",
                    patient_id="P-ok", instance_number=8),
        SamplesPerPixel=3,
    )
    case["duplicate_position"] = write_slice(odd / "zz_dup.dcm", pixels(8, 9), ipp=(0.0, 0.0, 5.0),
                                             series_uid="1.1.9", study_uid="1.1.9.0", patient_id="P-ok",
                                             instance_number=9)
    case["odd_scan"] = "1.1.9"
    loop = root / "loop"
    loop.mkdir()
    os.symlink(loop / "b.dcm", loop / "a.dcm")
    os.symlink(loop / "a.dcm", loop / "b.dcm")
    case["symlink_loop"] = str(loop / "a.dcm")
    series(root / "ünïcødé sérïes", "1.1.10", seed=10)
    case["unicode_scan"] = "1.1.10"
    escape = series(root / "escape", "1.1.11", seed=11)
    for path in escape:
        retag(path, PatientID="../../../../tmp/escape", SeriesDescription="../../evil")
    case["escape_scan"] = "1.1.11"

    # Issue 16 (round three), items 6, 8 and 9 (asserted in tests/test_hostile_input.py).
    # 6. decompression bombs: a 0.5 MB deflated file claiming 16384 x 16384 (refused when indexing),
    #    and a 16 x 16 header over 64 MiB of deflated zeros (refused when decoding).
    case["bomb"] = write_deflated_bomb(root / "bomb" / "bomb.dcm", series_uid="1.1.12")
    case["bomb_scan"] = "1.1.12"
    case["bomb_stream"] = write_deflated_bomb(root / "bomb" / "stream.dcm", SIZE, SIZE, series_uid="1.1.13",
                                              pixel_bytes=64 << 20)
    case["bomb_stream_scan"] = "1.1.13"
    # 8. geometry: 1 x 1 images (rejected); mixed matrix sizes and mixed pixel spacing (kept, noted).
    tiny = [
        write_slice(root / "tiny" / f"im{k}.dcm", np.full((1, 1), 1000 + k, np.int16), ipp=(0.0, 0.0, 5.0 * k),
                    instance_number=k + 1, series_uid="1.1.14", study_uid="1.1.14.0", patient_id="P-ok")
        for k in range(3)
    ]
    case["tiny"] = tiny[0]
    case["tiny_scan"] = "1.1.14"
    mixed = series(root / "mixed_size", "1.1.15", n=3, seed=15)
    write_slice(root / "mixed_size" / "big.dcm", np.kron(pixels(3, 15), np.ones((2, 2), np.int16)),
                ipp=(0.0, 0.0, 15.0), instance_number=4, series_uid="1.1.15", study_uid="1.1.15.0", patient_id="P-ok")
    case["mixed_size"] = os.path.dirname(mixed[0])
    case["mixed_size_scan"] = "1.1.15"
    spacing = series(root / "mixed_spacing", "1.1.16", n=3, seed=16)
    retag(spacing[1], PixelSpacing=["0.8", "0.8"])
    case["mixed_spacing"] = os.path.dirname(spacing[0])
    case["mixed_spacing_scan"] = "1.1.16"
    # 9. a symlinked folder to a valid series outside the tree (followed), and a link back to the
    #    root (a loop: not walked twice).
    outside = root.parent / f"{root.name}_outside" / "series"
    series(outside, "1.1.17", seed=17)
    (root / "linked").symlink_to(outside, target_is_directory=True)
    case["linked_scan"] = "1.1.17"
    (root / "odd" / "back_to_root").symlink_to(root, target_is_directory=True)
    case["loop_folder"] = str(root / "odd" / "back_to_root")
    return case


def reject_rows(out: Path) -> list[dict]:
    """The rows of the rejects file beside cache `out` (shared by the bad-input test files)."""
    with open(rejects_path(out), newline="") as handle:
        return list(csv.DictReader(handle))
