"""The synthetic head-CT phantom: determinism, DICOM validity, label consistency, lesion HU,
both layouts, and a round trip through the scan-index readers."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

from pipeline.data.labels import CQ500_LABELS, RSNA_LABELS
from pipeline.pseudonym import KEY_NAME, load_or_create_key
from pipeline.synthetic.phantom import (
    CT_IMAGE_STORAGE,
    PhantomError,
    make_phantom,
    min_pixels,
    render_scan_series,
    sample_scan,
)
from pipeline.synthetic.phantom_anatomy import BLEEDS, CLASSES, OWNER_CODE

SIZE = 48
SCANS = 6


@pytest.fixture(scope="module")
def rsna(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rsna")
    make_phantom(out, "rsna", SCANS, seed=5, size=SIZE)
    return out


@pytest.fixture(scope="module")
def cq500(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cq500")
    make_phantom(out, "cq500", SCANS, seed=5, size=SIZE)
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def hu_of(ds) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_same_seed_same_files_and_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_phantom(a, "cq500", 2, seed=11, size=32)
    make_phantom(b, "cq500", 2, seed=11, size=32)
    make_phantom(c, "cq500", 2, seed=12, size=32)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 20
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "slice_labels.csv").read_bytes() != (c / "slice_labels.csv").read_bytes()
    # the pseudonym key too: a fresh `dvc repro` gives the same pseudonyms, so the same folds and
    # bootstrap draws (a random key per data stage changed the demo's metrics on every clone)
    assert load_or_create_key(a / KEY_NAME) == load_or_create_key(b / KEY_NAME) != load_or_create_key(c / KEY_NAME)
    assert (a / KEY_NAME).stat().st_mode & 0o777 == 0o600


def test_scan_stream_does_not_depend_on_number_of_scans():
    first = render_scan_series(sample_scan(3, 1, 32), sample_scan(3, 1, 32).series[0], 3)
    again = render_scan_series(sample_scan(3, 1, 32), sample_scan(3, 1, 32).series[0], 3)
    np.testing.assert_array_equal(first.hu, again.hu)
    np.testing.assert_array_equal(first.labels, again.labels)


def test_rsna_dicom_validity(rsna):
    files = sorted((rsna / "stage_2_train").glob("*.dcm"))
    truth = read_csv(rsna / "scans_truth.csv")
    assert len(files) == sum(int(row["n_slices"]) for row in truth)
    sizes = set()
    for path in files[::7]:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == CT_IMAGE_STORAGE and ds.Modality == "CT"
        assert ds.SOPInstanceUID == path.stem and len(path.stem) == 12
        assert (ds.BitsStored, ds.PixelRepresentation, ds.PhotometricInterpretation) == (16, 1, "MONOCHROME2")
        assert float(ds.RescaleSlope) == 1 and float(ds.RescaleIntercept) == -1024
        assert len(ds.ImagePositionPatient) == 3 and len(ds.ImageOrientationPatient) == 6
        assert float(ds.PixelSpacing[0]) > 0 and float(ds.SliceThickness) > 0 and ds.InstanceNumber >= 1
        assert ds.PatientID.startswith("ID_") and ds.StudyInstanceUID and ds.SeriesInstanceUID
        hu = hu_of(ds)
        assert hu.dtype == np.float64 and hu.min() >= -1024 and hu.max() <= 1700
        sizes.add(ds.Rows)
    assert sizes <= {SIZE * 15 // 16, SIZE, SIZE * 9 // 8}


def test_rsna_labels_any_is_or_and_match_truth(rsna):
    rows = read_csv(rsna / "stage_2_train.csv")
    labels: dict[str, dict[str, int]] = {}
    for row in rows:
        image, subtype = row["ID"].rsplit("_", 1)
        previous = labels.setdefault(image, {}).get(subtype)
        assert previous is None or previous == int(row["Label"])      # duplicates are exact
        labels[image][subtype] = int(row["Label"])
    assert all(set(v) == set(RSNA_LABELS) for v in labels.values())
    for v in labels.values():
        assert v["any"] == max(v[s] for s in RSNA_LABELS[1:])
    # scan truth = OR of its slices; several studies of one patient are possible
    by_series: dict[str, list[dict[str, int]]] = {}
    for path in (rsna / "stage_2_train").glob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(labels[path.stem])
    for row in read_csv(rsna / "scans_truth.csv"):
        for name in RSNA_LABELS:
            assert int(row[name]) == max(s[name] for s in by_series[row["scan_id"]])


def test_cq500_layout_reads_and_slice_labels(cq500):
    truth = {row["patient_id"]: row for row in read_csv(cq500 / "scans_truth.csv")}
    reads = read_csv(cq500 / "reads.csv")
    assert [r["name"] for r in reads] == [f"CQ500-CT-{k}" for k in range(SCANS)]
    agree = total = 0
    for read in reads:
        for cls in CQ500_LABELS:
            votes = sum(int(read[f"R{r}:{cls}"]) for r in (1, 2, 3))
            agree += int(votes >= 2) == int(truth[read["name"]][cls])
            total += 1
    assert agree / total > 0.95
    slice_labels = {row["SOPInstanceUID"]: row for row in read_csv(cq500 / "slice_labels.csv")}
    for row in truth.values():
        k = row["patient_id"].rsplit("-", 1)[1]
        folder = cq500 / f"CQ500CT{k} CQ500CT{k}" / "Unknown Study" / row["series_description"]
        files = sorted(folder.glob("CT*.dcm"))
        assert len(files) == int(row["n_slices"]) and files[0].name == "CT000000.dcm"
        per_slice = []
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert ds.PatientID == row["patient_id"] and ds.SeriesInstanceUID == row["scan_id"]
            lab = {c: int(slice_labels[ds.SOPInstanceUID][c]) for c in CQ500_LABELS}
            assert lab["ICH"] == max(lab[b] for b in BLEEDS)
            per_slice.append(lab)
        for cls in CQ500_LABELS:
            assert int(row[cls]) == max(s[cls] for s in per_slice)


def test_lesion_voxels_have_blood_hu_and_labels_follow_masks():
    seen = set()
    for index in range(12):
        scan = sample_scan(21, index, 64)
        r = render_scan_series(scan, scan.series[0], 21)
        need = min_pixels(r.spec.rows, r.spec.spacing)
        for name, code in OWNER_CODE.items():
            mask = r.owner == code
            col = CLASSES.index(name)
            np.testing.assert_array_equal(r.labels[:, col], mask.reshape(len(mask), -1).sum(1) >= need)
            for k in np.where(r.labels[:, col])[0]:
                values = r.hu[k][mask[k]]
                seen.add(name)
                if name == "CalvarialFracture":     # a soft-tissue gap inside bone
                    assert np.median(values) < 500
                elif name in ("IPH", "IVH", "SDH", "EDH"):
                    assert 40 <= np.median(values) <= 100, (name, index, k)
                else:                               # SAH: thin sulci, partial volume with CSF/brain
                    assert 25 <= np.median(values) <= 100
        np.testing.assert_array_equal(r.labels[:, 0], r.labels[:, 1:6].max(axis=1))
        assert (r.labels[:, CLASSES.index("MidlineShift")] <= r.labels[:, CLASSES.index("MassEffect")]).all()
        brain = r.hu[len(r.hu) // 2]
        assert brain.min() >= -1024 and brain.max() > 600          # skull present
    assert {"IPH", "SDH", "SAH"} <= seen


def test_prevalence_is_sensible():
    counts = np.zeros(len(CLASSES))
    n = 40
    for index in range(n):
        scan = sample_scan(0, index, 32)
        counts += render_scan_series(scan, scan.series[0], 0).labels.max(axis=0)
    assert counts[0] < n                                     # some negatives
    # bleeds and mass effect are frequent at any matrix; a 1-2 mm fracture gap needs finer pixels than 32 px
    assert (counts[:6] >= 0.1 * n).all() and counts[7] >= 0.1 * n, dict(zip(CLASSES, counts))
    assert (counts <= 0.8 * n).all(), dict(zip(CLASSES, counts))


def test_refuses_foreign_folder_and_bad_args(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(PhantomError, match="not empty"):
        make_phantom(tmp_path, "rsna", 1, size=32)
    with pytest.raises(PhantomError, match="layout"):
        make_phantom(tmp_path / "new", "folder", 1, size=32)


def test_cli_writes_and_prints_summary(tmp_path):
    from stages.phantom import phantom

    result = CliRunner().invoke(phantom, [str(tmp_path / "p"), "--layout", "rsna", "--scans", "1", "--size", "32",
                                          "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "phantom (rsna): 1 scans" in result.output and "intraventricular" in result.output
    assert (tmp_path / "p" / "stage_2_train.csv").is_file()
    bad = CliRunner().invoke(phantom, [str(tmp_path / "q"), "--scans", "0"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("x")
    refused = CliRunner().invoke(phantom, [str(tmp_path / "foreign"), "--scans", "1", "--size", "32", "--no-progress"])
    assert refused.exit_code == 2 and "is not empty and holds no phantom" in refused.output, refused.output
    assert (tmp_path / "foreign" / "keep.txt").read_text() == "x"


HAVE_INDEX = importlib.util.find_spec("pipeline.data.index") is not None


@pytest.mark.skipif(not HAVE_INDEX, reason="pipeline.data.index (the scan-index readers) not present")
@pytest.mark.parametrize("layout", ["rsna", "cq500"])
def test_round_trip_through_scan_index(layout, rsna, cq500):
    from pipeline.data.index import build_scan_index

    root = rsna if layout == "rsna" else cq500
    names = RSNA_LABELS if layout == "rsna" else CQ500_LABELS
    index = build_scan_index(root, layout, progress=False)
    truth = {row["scan_id"]: row for row in read_csv(root / "scans_truth.csv")}
    assert len(index.scans) == SCANS
    for scan in index.scans:
        series = scan.series_uid or scan.scan_id
        row = truth[series]
        assert len(scan.slices) == int(row["n_slices"])
        zs = [s.z for s in scan.slices]
        assert zs == sorted(zs)
        positions = [float(pydicom.dcmread(s.path, stop_before_pixels=True).ImagePositionPatient[2])
                     for s in scan.slices]
        assert positions == sorted(positions)                   # feet -> head, whatever the file order
        assert scan.labels is not None
        if layout == "rsna":
            assert [int(v) for v in scan.labels] == [int(row[n]) for n in names]
        else:   # majority of three readers: equals the truth for almost every label
            assert sum(int(v) != int(row[n]) for v, n in zip(scan.labels, names)) <= 1
