"""The nine real head CTs (../shared/data/real): every one reads, orders and labels correctly.

Truth is independent of the readers: files.csv (per-file IPP/IOP, pixel min/max as recorded by
the data's curator), reads_subset.csv (the raw radiologist reads), study_labels_majority.csv,
study_labels_derived.csv and the negative study's stage_2_train-format rows.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.dicom_io import HU_MAX, HU_MIN, read_hu
from pipeline.data.index import build_scan_index
from pipeline.data.labels import CQ500_LABELS, RSNA_LABELS

# study_labels_majority.csv / scans.csv columns (RSNA names) -> CQ500 reads.csv findings
RSNA_TO_CQ500 = {
    "any": "ICH",
    "epidural": "EDH",
    "intraparenchymal": "IPH",
    "intraventricular": "IVH",
    "subarachnoid": "SAH",
    "subdural": "SDH",
}


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def expected_order(files: list[dict[str, str]], root: Path) -> dict[str, list[tuple[str, float]]]:
    """Per study: (absolute path, position along the normal) sorted, computed from files.csv alone."""
    studies: dict[str, list[tuple[str, float]]] = {}
    for row in files:
        ipp = np.array([float(v) for v in row["ImagePositionPatient"].split()])
        iop = np.array([float(v) for v in row["ImageOrientationPatient"].split()])
        normal = np.cross(iop[:3], iop[3:])
        normal /= np.linalg.norm(normal)
        studies.setdefault(row["study"], []).append(
            (str((root / row["path"]).resolve()), float(ipp @ normal))
        )
    return {study: sorted(items, key=lambda item: item[1]) for study, items in studies.items()}


@pytest.fixture(scope="module")
def cq500_index(real_data):
    return build_scan_index(real_data / "cq500", "cq500", real_data / "cq500" / "reads_subset.csv")


@pytest.fixture(scope="module")
def rsna_index(real_data):
    root = real_data / "rsna"
    return build_scan_index(
        root,
        "rsna",
        root / "stage_2_train_negative_study_derived.csv",
        scan_labels_csv=root / "study_labels_derived.csv",
    )


def test_cq500_seven_scans_in_normal_order(real_data, cq500_index):
    assert cq500_index.rejects == []
    truth = expected_order(rows(real_data / "cq500" / "files.csv"), real_data / "cq500")
    scans = {scan.scan_id: scan for scan in cq500_index.scans}
    assert sorted(scans) == sorted(truth)
    for study, expected in truth.items():
        scan = scans[study]
        assert len(scan.slices) == 30
        assert [s.path for s in scan.slices] == [path for path, _ in expected]
        z = np.array([s.z for s in scan.slices])
        np.testing.assert_allclose(z, [position for _, position in expected], atol=1e-3)
        assert np.all(np.diff(z) > 0)
        assert scan.patient_id == study


def test_cq500_file_names_are_not_z_order(cq500_index):
    # CT-427: CT000000.dcm is the top slice (InstanceNumber 32): the readers must not sort by name
    scan = next(s for s in cq500_index.scans if s.scan_id == "CQ500-CT-427")
    assert Path(scan.slices[-1].path).name == "CT000000.dcm"


def test_cq500_labels_are_the_reader_majority(real_data, cq500_index):
    reads = rows(real_data / "cq500" / "reads_subset.csv")
    majority = {row["name"]: row for row in rows(real_data / "cq500" / "study_labels_majority.csv")}
    scans = {scan.scan_id: scan for scan in cq500_index.scans}
    for row in reads:
        labels = scans[row["name"]].labels
        for k, finding in enumerate(CQ500_LABELS):
            votes = sum(int(row[f"R{r}:{finding}"]) for r in (1, 2, 3))
            assert labels[k] == float(votes >= 2), (row["name"], finding)
        for rsna_name, finding in RSNA_TO_CQ500.items():
            assert labels[CQ500_LABELS.index(finding)] == float(majority[row["name"]][rsna_name])
    # CT-181: readers disagree (EDH 0/1/1, SAH 1/0/1) and the majority says yes to both
    ct181 = scans["CQ500-CT-181"].labels
    assert ct181[CQ500_LABELS.index("EDH")] == 1.0 and ct181[CQ500_LABELS.index("SAH")] == 1.0


def test_rsna_two_scans_order_and_labels(real_data, rsna_index):
    root = real_data / "rsna"
    assert rsna_index.rejects == []
    files = rows(root / "files.csv")
    truth = expected_order(files, root)
    scans = {scan.study_uid: scan for scan in rsna_index.scans}
    assert sorted(scans) == sorted(truth) == ["ID_515961ad20", "ID_9fae411ae8"]
    series_of = {row["study"]: row["SeriesInstanceUID"] for row in files}
    for study, expected in truth.items():
        scan = scans[study]
        assert scan.scan_id == series_of[study]
        assert [s.path for s in scan.slices] == [path for path, _ in expected]
        z = np.array([s.z for s in scan.slices])
        np.testing.assert_allclose(z, [position for _, position in expected], atol=1e-3)
        assert np.all(np.diff(z) > 0)
    labels = {
        row["StudyInstanceUID"]: [float(row[name]) for name in RSNA_LABELS]
        for row in rows(root / "study_labels_derived.csv")
    }
    for study, scan in scans.items():
        assert scan.labels == labels[study]
    # per-slice labels: known (all 0) for the negative study only
    assert all(s.labels == [0] * 6 for s in scans["ID_515961ad20"].slices)
    assert all(s.labels is None for s in scans["ID_9fae411ae8"].slices)
    # the interleaved pairs 0.6 mm apart in ID_9fae411ae8 are distinct slices, not duplicates
    assert len(scans["ID_9fae411ae8"].slices) == 26
    assert np.min(np.diff([s.z for s in scans["ID_9fae411ae8"].slices])) < 1.0


def test_folder_layout_finds_all_nine_scans(real_data):
    index = build_scan_index(real_data, "folder")
    assert index.rejects == []
    assert sorted(len(scan.slices) for scan in index.scans) == [26, 26] + [30] * 7
    assert all(scan.labels is None for scan in index.scans)


def test_hu_of_every_real_file_matches_the_recorded_pixel_range(real_data):
    """All 262 files decode (JPEG Lossless, JPEG 2000, Implicit VR 12-bit, Explicit VR) to 512x512 HU
    whose min/max equal files.csv's raw pixel min/max rescaled and clipped."""
    seen_syntaxes = set()
    for part in ("cq500", "rsna"):
        for row in rows(real_data / part / "files.csv"):
            hu = read_hu(real_data / part / row["path"])
            assert hu.dtype == np.float32 and hu.shape == (int(row["Rows"]), int(row["Columns"]))
            slope, intercept = float(row["RescaleSlope"]), float(row["RescaleIntercept"])
            low = np.clip(float(row["pixel_min"]) * slope + intercept, HU_MIN, HU_MAX)
            high = np.clip(float(row["pixel_max"]) * slope + intercept, HU_MIN, HU_MAX)
            assert (float(hu.min()), float(hu.max())) == (low, high), row["path"]
            seen_syntaxes.add(row["TransferSyntaxUID"])
    assert seen_syntaxes == {
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
    }


def test_hu_values_are_anatomical(real_data, cq500_index, rsna_index):
    """Middle slice of each scan: air (padding clipped to -1024), brain-like soft tissue at 15-55 HU, bone."""
    for scan in cq500_index.scans + rsna_index.scans:
        hu = read_hu(scan.slices[len(scan.slices) // 2].path)
        assert HU_MIN <= hu.min() < -900, scan.scan_id
        soft = hu[(hu > 0) & (hu < 80)]
        assert soft.size > 5000, scan.scan_id
        assert 15 < float(np.median(soft)) < 55, scan.scan_id
        assert hu.max() > 700, scan.scan_id
