"""Readers and HU conversion on small synthetic DICOM fixtures: one test per pitfall."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_fixtures import AXIAL, tilted_iop, write_series, write_slice

from pipeline.data.dicom_io import SliceError, is_localizer, read_header, read_hu, slice_position
from pipeline.data.index import build_scan_index
from pipeline.data.labels import CQ500_LABELS, RSNA_LABELS
from pipeline.data.rsna import read_rsna_labels
from pipeline.data.scan_index import write_rejects

KAGGLE_ORDER = ["epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"]


def reasons(index) -> list[str]:
    return [r.reason for r in index.rejects]


# ---------------------------------------------------------------- read_hu: pixel pitfalls


def test_hu_signed_with_ds_intercept_and_padding_clipped(tmp_path):
    raw = np.array([[-2000, -1024, 0, 40], [1064, 3000, 4095, 30000]], dtype=np.int16)
    path = write_slice(tmp_path / "a.dcm", raw, intercept="-1024.000000", slope="1.000000")
    hu = read_hu(path)
    assert hu.dtype == np.float32 and hu.shape == (2, 4)
    expected = np.array([[-1024, -1024, -1024, -984], [40, 1976, 3071, 3071]], dtype=np.float32)
    np.testing.assert_array_equal(hu, expected)


def test_hu_slope_is_applied_as_float(tmp_path):
    raw = np.array([[0, 100], [400, 1000]], dtype=np.int16)
    hu = read_hu(write_slice(tmp_path / "s.dcm", raw, intercept="-1000.5", slope="2.5"))
    np.testing.assert_allclose(hu, [[-1000.5, -750.5], [-0.5, 1499.5]])


def test_rsna_12bit_wrong_intercept_kaggle_fix(tmp_path):
    # stored values with intercept 0: the Kaggle fix adds 1000, wraps >= 4096, uses intercept -1000
    raw = np.array([[0, 24, 1000, 3095], [3096, 3500, 4095, 2000]], dtype=np.uint16)
    path = write_slice(tmp_path / "r.dcm", raw, bits_stored=12, pixel_representation=0, intercept="0")
    expected = np.array([[0, 24, 1000, 3071], [-1000, -596, -1, 2000]], dtype=np.float32)  # by hand
    np.testing.assert_array_equal(read_hu(path), expected)


def test_12bit_unsigned_with_correct_intercept_is_untouched(tmp_path):
    # the real RSNA study ID_515961ad20: BitsStored 12, unsigned, intercept -1024 -> plain rescale
    raw = np.array([[10, 1024], [2288, 4095]], dtype=np.uint16)
    path = write_slice(
        tmp_path / "u.dcm",
        raw,
        bits_stored=12,
        pixel_representation=0,
        intercept="-1024",
        implicit_vr=True,
        window_center=["00036", "00036"],
    )
    np.testing.assert_array_equal(read_hu(path), [[-1014, 0], [1264, 3071]])
    assert str(read_header(path).file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2"


def test_monochrome1_keeps_hu_when_rescaled_and_is_mirrored_without_rescale(tmp_path):
    raw = np.array([[0, 1000], [3000, 4095]], dtype=np.uint16)
    rescaled = write_slice(
        tmp_path / "m1.dcm",
        raw,
        bits_stored=12,
        pixel_representation=0,
        intercept="-1024",
        photometric="MONOCHROME1",
    )
    # the Modality LUT output is HU whatever the photometric interpretation (PS3.3 C.11.1)
    np.testing.assert_array_equal(read_hu(rescaled), [[-1024, -24], [1976, 3071]])
    bare = write_slice(
        tmp_path / "m1bare.dcm", raw, bits_stored=12, pixel_representation=0,
        intercept=None, slope=None, photometric="MONOCHROME1",
    )
    # no rescale: mirrored within the 12-bit stored range (4095 - raw), then clipped to the CT range
    np.testing.assert_array_equal(read_hu(bare), [[3071, 3071], [1095, 0]])


def test_odd_size_and_multivalued_window_center(tmp_path):
    raw = (np.arange(17 * 23).reshape(17, 23) % 100).astype(np.int16)
    path = write_slice(tmp_path / "odd.dcm", raw, window_center=["00036", "00040"])
    hu = read_hu(path)
    assert hu.shape == (17, 23)
    np.testing.assert_array_equal(hu, raw - 1024.0)


def test_truncated_pixel_data_raises_slice_error(tmp_path):
    path = write_slice(tmp_path / "t.dcm", np.zeros((16, 16), np.int16), truncate_pixels=100)
    with pytest.raises(SliceError, match="pixel data cannot be decoded"):
        read_hu(path)


def test_multiframe_raises_slice_error(tmp_path):
    path = write_slice(tmp_path / "mf.dcm", np.zeros((3, 8, 8), np.int16), frames=3)
    with pytest.raises(SliceError, match="multi-frame"):
        read_hu(path)


def test_non_dicom_file_raises_slice_error(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("this is not a DICOM file\n" * 20)
    with pytest.raises(SliceError, match="not a DICOM file"):
        read_header(path)
    with pytest.raises(SliceError, match="not a DICOM file"):
        read_hu(path)


# ---------------------------------------------------------------- header helpers


def test_slice_position_projects_on_the_tilted_normal(tmp_path):
    iop = tilted_iop(20.0)
    normal = np.array([0.0, np.sin(np.deg2rad(20)), np.cos(np.deg2rad(20))])  # cross(row, col) by hand
    ipp = 7.0 * normal + np.array([1.0, 0.0, 0.0]) + 30.0 * np.array(iop[3:])
    ds = pydicom.dcmread(write_slice(tmp_path / "p.dcm", np.zeros((4, 4), np.int16), ipp=ipp, iop=iop))
    assert slice_position(ds) == pytest.approx(7.0, abs=1e-4)
    ds2 = pydicom.dcmread(write_slice(tmp_path / "q.dcm", np.zeros((4, 4), np.int16), ipp=None))
    assert slice_position(ds2) is None


def test_is_localizer():
    ds = pydicom.Dataset()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert is_localizer(ds)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert not is_localizer(ds)
    ds.SeriesDescription = "Scout"
    assert is_localizer(ds)


# ---------------------------------------------------------------- ordering and rejects (folder layout)


def pixel_order(scan) -> list[int]:
    """The fixtures write value k+1 into slice k: read it back to check order independently."""
    return [int(read_hu(s.path)[0, 0]) + 1024 for s in scan.slices]


def test_folder_sorts_along_normal_under_gantry_tilt(tmp_path):
    iop = tilted_iop(20.0)
    normal = np.cross(iop[:3], iop[3:])
    column = np.array(iop[3:])
    # in-plane shifts chosen so that IPP[2] runs the other way than the position along the normal
    for k, name in zip(range(4), ["c.dcm", "a.dcm", "d.dcm", "b.dcm"]):
        ipp = normal * (5.0 * k) + column * (40.0 * k)
        write_slice(
            tmp_path / "s" / name, np.full((16, 16), k + 1, np.int16), ipp=ipp, iop=iop, instance_number=9 - k
        )
    index = build_scan_index(tmp_path, "folder")
    (scan,) = index.scans
    assert pixel_order(scan) == [1, 2, 3, 4]
    np.testing.assert_allclose([s.z for s in scan.slices], [0, 5, 10, 15], atol=1e-4)
    assert scan.labels is None and index.label_names == []
    assert all(Path(s.path).is_absolute() for s in scan.slices)


def test_missing_position_falls_back_to_instance_number(tmp_path):
    for k, number in enumerate([3, 1, 2]):
        write_slice(
            tmp_path / f"f{k}.dcm", np.full((16, 16), number, np.int16), ipp=None, instance_number=number
        )
    index = build_scan_index(tmp_path, "folder")
    (scan,) = index.scans
    assert pixel_order(scan) == [1, 2, 3]
    assert [s.z for s in scan.slices] == [1.0, 2.0, 3.0]
    assert any(r.startswith("note:") and "InstanceNumber" in r for r in reasons(index))


def test_duplicate_positions_localizer_and_non_dicom_are_rejected(tmp_path):
    paths = write_series(tmp_path / "ser", 4, series_uid="9.9.1")
    write_slice(
        tmp_path / "ser" / "zz_dup.dcm",
        np.full((16, 16), 2, np.int16),
        ipp=(-4.0, -4.0, 5.0),
        series_uid="9.9.1",
        instance_number=20,
    )
    write_slice(
        tmp_path / "ser" / "loc.dcm",
        np.zeros((16, 16), np.int16),
        series_uid="9.9.1",
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )
    write_slice(
        tmp_path / "ser" / "sag.dcm",
        np.zeros((16, 16), np.int16),
        series_uid="9.9.1",
        iop=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
        ipp=(3.0, 0.0, 0.0),
    )
    (tmp_path / "ser" / "junk.dcm").write_bytes(b"\x00" * 50)
    write_slice(tmp_path / "mf" / "multi.dcm", np.zeros((2, 8, 8), np.int16), frames=2, series_uid="9.9.2")
    index = build_scan_index(tmp_path, "folder")
    (scan,) = index.scans
    assert scan.scan_id == "9.9.1" and scan.patient_id == "P1"
    assert len(scan.slices) == 4 and pixel_order(scan) == [1, 2, 3, 4]
    assert {s.path for s in scan.slices} == set(paths)
    by_name = {Path(r.path).name: r.reason for r in index.rejects}
    assert by_name["zz_dup.dcm"].startswith("duplicate slice position")
    assert by_name["loc.dcm"] == "localizer/scout image"
    assert "orientation differs" in by_name["sag.dcm"]
    assert "not a DICOM file" in by_name["junk.dcm"]
    assert "multi-frame" in by_name["multi.dcm"]


def test_scan_left_with_no_slices_is_rejected(tmp_path):
    write_slice(
        tmp_path / "only_scout.dcm",
        np.zeros((16, 16), np.int16),
        series_uid="7.7",
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )
    index = build_scan_index(tmp_path, "folder")
    assert index.scans == []
    assert "no usable slices left in the scan" in reasons(index)
    write_rejects(index.rejects, tmp_path / "rejects.csv")
    with open(tmp_path / "rejects.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["reason"] for row in rows} == {"localizer/scout image", "no usable slices left in the scan"}


# ---------------------------------------------------------------- RSNA layout


def write_rsna_csv(
    path: Path, labels: dict[str, dict[str, int]], extra_rows: list[tuple[str, int]] = ()
) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ID", "Label"])
        for image_id, values in labels.items():
            for subtype in KAGGLE_ORDER:
                writer.writerow([f"{image_id}_{subtype}", values.get(subtype, 0)])
        writer.writerows(extra_rows)


def make_rsna(root: Path, flat: bool = False) -> dict[str, list[str]]:
    folder = root if flat else root / "stage_2_train"
    ids = {}
    for series, (study, patient, n) in {
        "ID_s1": ("ID_st1", "ID_p1", 3),
        "ID_s2": ("ID_st2", "ID_p2", 2),
    }.items():
        names = [f"ID_{series[-1]}{k:07x}.dcm" for k in range(n)]
        write_series(
            folder,
            n,
            names=names[::-1],
            series_uid=series,
            study_uid=study,
            patient_id=patient,
            omit=("InstanceNumber", "SliceThickness", "SeriesDescription"),
        )
        ids[series] = [Path(name).stem for name in names]
    return ids


@pytest.mark.parametrize("flat", [False, True])
def test_rsna_index_labels_and_order(tmp_path, flat):
    ids = make_rsna(tmp_path, flat)
    s1, s2 = ids["ID_s1"], ids["ID_s2"]
    labels = {
        s1[0]: {"subdural": 1, "any": 1},
        s1[1]: {},
        s1[2]: {"epidural": 1, "any": 1},
        s2[0]: {},
        s2[1]: {},
    }
    write_rsna_csv(tmp_path / "stage_2_train.csv", labels)
    index = build_scan_index(tmp_path, "rsna")
    assert index.label_names == RSNA_LABELS
    scans = {s.scan_id: s for s in index.scans}
    assert set(scans) == {"ID_s1", "ID_s2"}
    one = scans["ID_s1"]
    assert (one.patient_id, one.study_uid, one.series_uid) == ("ID_p1", "ID_st1", "ID_s1")
    # write_series wrote names reversed: the first name in `ids` lies at the top
    assert [Path(s.path).stem for s in one.slices] == s1[::-1]
    assert [s.sop_uid != "" for s in one.slices] == [True] * 3
    # RSNA_LABELS order: any, epidural, intraparenchymal, intraventricular, subarachnoid, subdural
    assert one.slices[2].labels == [1, 0, 0, 0, 0, 1]
    assert one.slices[0].labels == [1, 1, 0, 0, 0, 0]
    assert one.labels == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert scans["ID_s2"].labels == [0.0] * 6
    assert index.rejects == []


def test_rsna_duplicated_csv_rows(tmp_path):
    ids = make_rsna(tmp_path)
    s1 = ids["ID_s1"]
    labels = {i: {} for i in ids["ID_s1"] + ids["ID_s2"]}
    extra = [
        (f"{s1[0]}_any", 0),
        (f"{s1[0]}_epidural", 0),  # identical duplicates: silent
        (f"{s1[1]}_subarachnoid", 1),
        (f"{s1[1]}_any", 1),
    ]  # conflicting: max, noted
    write_rsna_csv(tmp_path / "labels.csv", labels, extra)
    table, notes = read_rsna_labels(tmp_path / "labels.csv")
    assert table[s1[0]] == [0] * 6
    assert table[s1[1]] == [1, 0, 0, 0, 1, 0]
    assert len(notes) == 2 and all("conflicting duplicate" in n.reason for n in notes)
    index = build_scan_index(tmp_path, "rsna", tmp_path / "labels.csv")
    scans = {s.scan_id: s for s in index.scans}
    assert scans["ID_s1"].labels == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_rsna_unknown_slices_and_scan_label_table(tmp_path):
    ids = make_rsna(tmp_path)
    s1 = ids["ID_s1"]
    write_rsna_csv(tmp_path / "part.csv", {s1[0]: {"any": 1, "subdural": 1}})
    index = build_scan_index(tmp_path, "rsna", tmp_path / "part.csv")
    assert [s.scan_id for s in index.scans] == ["ID_s1"]
    (one,) = index.scans
    assert one.labels == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert sum(s.labels is None for s in one.slices) == 2
    assert any("2 of 3 slices have no label rows" in r for r in reasons(index))
    assert any(r.scan_id == "ID_s2" and r.reason.startswith("no labels") for r in index.rejects)
    table = tmp_path / "scan_labels.csv"
    table.write_text("StudyInstanceUID," + ",".join(RSNA_LABELS) + "\nID_st2,1,0,0,1,0,0\n")
    index = build_scan_index(tmp_path, "rsna", tmp_path / "part.csv", scan_labels_csv=table)
    assert {s.scan_id: s.labels for s in index.scans}["ID_s2"] == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]


def test_rsna_missing_labels_file_is_a_clear_error(tmp_path):
    make_rsna(tmp_path)
    with pytest.raises(FileNotFoundError, match="stage_2_train.csv"):
        build_scan_index(tmp_path, "rsna")
    with pytest.raises(ValueError, match="unknown layout"):
        build_scan_index(tmp_path, "nifti")


# ---------------------------------------------------------------- CQ500 layout


def write_reads(path: Path, votes: dict[str, list[dict[str, int]]]) -> None:
    findings = [
        "ICH",
        "IPH",
        "IVH",
        "SDH",
        "EDH",
        "SAH",
        "BleedLocation-Left",
        "BleedLocation-Right",
        "ChronicBleed",
        "Fracture",
        "CalvarialFracture",
        "OtherFracture",
        "MassEffect",
        "MidlineShift",
    ]
    columns = ["name", "Category"] + [f"R{r}:{f}" for r in (1, 2, 3) for f in findings]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for name, readers in votes.items():
            row = {"name": name, "Category": "B1"}
            for r, reader in enumerate(readers, start=1):
                row.update({f"R{r}:{f}": reader.get(f, 0) for f in findings})
            writer.writerow(row)


def test_cq500_majority_and_series_choice(tmp_path):
    p3 = tmp_path / "CQ500CT3 CQ500CT3" / "Unknown Study"
    common = {"patient_id": "CQ500-CT-3", "study_uid": "2.1"}
    plain = write_series(p3 / "CT Plain", 6, series_uid="2.1.1", series_description="CT Plain", **common)
    write_series(
        p3 / "CT POST CONTRAST", 8, series_uid="2.1.2", series_description="CT POST CONTRAST", **common
    )
    write_series(
        p3 / "CT Plain THIN",
        12,
        spacing=0.625,
        slice_thickness=0.625,
        series_uid="2.1.3",
        series_description="CT Plain THIN",
        **common,
    )
    write_series(p3 / "CT BONE", 6, series_uid="2.1.4", series_description="CT 5mm BONE", **common)
    p12 = tmp_path / "CQ500CT12 CQ500CT12" / "Unknown Study"
    thin = write_series(
        p12 / "CT PRE CONTRAST THIN" / "deeper",
        5,
        spacing=0.625,
        slice_thickness=0.625,
        series_uid="2.2.1",
        series_description="PRE CONTRAST THIN",
        patient_id="CQ500-CT-12",
    )
    write_series(
        p12 / "CT POST CONTRAST",
        9,
        series_uid="2.2.2",
        series_description="POST CONTRAST",
        patient_id="CQ500-CT-12",
    )
    write_series(tmp_path / "CQ500CT77 CQ500CT77" / "s", 3, series_uid="2.3.1", patient_id="CQ500-CT-77")
    write_reads(
        tmp_path / "reads.csv",
        {
            "CQ500-CT-3": [
                {"ICH": 1, "SDH": 1, "EDH": 1},
                {"ICH": 1, "SDH": 1},
                {"ICH": 0, "EDH": 0, "MassEffect": 1},
            ],
            "CQ500-CT-12": [{}, {"ICH": 1}, {}],
            "CQ500-CT-5": [{}, {}, {}],
        },
    )
    index = build_scan_index(tmp_path, "cq500", cq500_series="one")  # the one-series rule (default: all)
    assert index.label_names == CQ500_LABELS
    scans = {s.scan_id: s for s in index.scans}
    assert list(scans) == ["CQ500-CT-3", "CQ500-CT-12"]
    three = scans["CQ500-CT-3"]
    assert three.series_uid == "2.1.1" and [s.path for s in three.slices] == plain
    assert three.patient_id == "CQ500-CT-3"
    # ICH 2/3, SDH 2/3, EDH 1/3, MassEffect 1/3
    assert three.labels == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    twelve = scans["CQ500-CT-12"]
    assert twelve.series_uid == "2.2.1" and [s.path for s in twelve.slices] == thin
    assert twelve.labels == [0.0] * 9
    rejected = {(r.scan_id, r.reason.split(":")[-1].strip()) for r in index.rejects}
    assert ("CQ500-CT-3", "post-contrast series") in rejected
    assert ("CQ500-CT-3", "bone/lung reconstruction or reformat") in rejected
    assert ("CQ500-CT-12", "post-contrast series") in rejected
    assert any(
        r.scan_id == "CQ500-CT-3" and "2.1.3" in r.reason and "not chosen" in r.reason for r in index.rejects
    )
    assert any(r.scan_id == "CQ500-CT-77" and "no row" in r.reason for r in index.rejects)
    assert any(r.scan_id == "CQ500-CT-5" and "no DICOM series" in r.reason for r in index.rejects)


def test_cq500_slice_labels_file(tmp_path):
    folder = tmp_path / "CQ500CT1 CQ500CT1" / "Unknown Study" / "CT Plain"
    paths = write_series(folder, 3, patient_id="CQ500-CT-1")
    write_reads(tmp_path / "reads.csv", {"CQ500-CT-1": [{"ICH": 1}, {"ICH": 1}, {}]})
    sops = {p: str(pydicom.dcmread(p).SOPInstanceUID) for p in paths}
    with open(tmp_path / "slice_labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["SOPInstanceUID", *CQ500_LABELS])
        for k, path in enumerate(paths):
            writer.writerow([sops[path], int(k == 1), *([0] * 8)])
    (scan,) = build_scan_index(tmp_path, "cq500").scans
    assert [s.labels[0] for s in scan.slices] == [0, 1, 0]
    assert scan.labels[0] == 1.0


def test_cq500_missing_reads_is_a_clear_error(tmp_path):
    write_series(tmp_path / "CQ500CT1 CQ500CT1" / "x", 2)
    with pytest.raises(FileNotFoundError, match="reads.csv"):
        build_scan_index(tmp_path, "cq500")


def test_axial_helper_is_axial():
    assert tuple(AXIAL) == tilted_iop(0.0)


def test_read_headers_pool_keeps_input_order(tmp_path):
    from pipeline.data.index import HEADER_BATCH, read_headers

    paths = write_series(tmp_path / "a", HEADER_BATCH + 10, size=4, series_uid="5.1")
    paths += write_series(tmp_path / "b", HEADER_BATCH, size=4, series_uid="5.2")
    (tmp_path / "bad.dcm").write_text("junk")
    paths.append(str(tmp_path / "bad.dcm"))
    pooled = read_headers(paths, workers=4, progress=True)
    serial = read_headers(paths, workers=1, progress=False)
    assert pooled == serial
    assert [h.path for h in pooled] == paths
    assert pooled[-1].error is not None and all(h.error is None for h in pooled[:-1])
    assert [h.instance_number for h in pooled[: HEADER_BATCH + 10]] == list(range(1, HEADER_BATCH + 11))
