"""CQ500 cohort rule (paper Table 1): every non-contrast axial series of a study is a scan,
thin and thick, grouped by patient; one series per patient as an option; bone kernels left out
unless asked for."""

from __future__ import annotations

import json

import pytest
from dicom_fixtures import write_series
from test_readers import write_reads

from pipeline.data.cq500 import build_cq500_index, cohort_summary, main
from pipeline.data.index import build_scan_index


@pytest.fixture(scope="module")
def cq500_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("cq500")
    p3 = root / "CQ500CT3 CQ500CT3" / "Unknown Study"
    common = {"patient_id": "CQ500-CT-3", "study_uid": "2.1"}
    write_series(p3 / "CT Plain", 6, series_uid="2.1.1", series_description="CT Plain", **common)
    write_series(p3 / "CT POST CONTRAST", 8, series_uid="2.1.2", series_description="CT POST CONTRAST", **common)
    write_series(p3 / "CT Plain THIN", 12, spacing=0.625, slice_thickness=0.625, series_uid="2.1.3",
                 series_description="CT Plain THIN", **common)
    write_series(p3 / "CT BONE", 6, series_uid="2.1.4", series_description="CT 5mm BONE", **common)
    write_series(p3 / "CT SAG MPR", 7, series_uid="2.1.5", series_description="SAG MPR", **common)
    p12 = root / "CQ500CT12 CQ500CT12" / "Unknown Study"
    write_series(p12 / "CT PRE CONTRAST THIN", 5, spacing=0.625, slice_thickness=0.625, series_uid="2.2.1",
                 series_description="PRE CONTRAST THIN", patient_id="CQ500-CT-12")
    write_series(p12 / "CT POST CONTRAST", 9, series_uid="2.2.2", series_description="POST CONTRAST",
                 patient_id="CQ500-CT-12")
    write_reads(root / "reads.csv", {"CQ500-CT-3": [{"ICH": 1}, {"ICH": 1}, {}], "CQ500-CT-12": [{}, {}, {}]})
    return root


def test_default_keeps_every_plain_axial_series_grouped_by_patient(cq500_tree):
    index = build_scan_index(cq500_tree, "cq500", progress=False)
    scans = {s.scan_id: s for s in index.scans}
    assert list(scans) == ["CQ500-CT-3", "CQ500-CT-3_s2", "CQ500-CT-12"]
    assert (scans["CQ500-CT-3"].series_uid, scans["CQ500-CT-3_s2"].series_uid) == ("2.1.1", "2.1.3")
    assert len(scans["CQ500-CT-3_s2"].slices) == 12  # the thin series too
    assert {scans["CQ500-CT-3"].patient_id, scans["CQ500-CT-3_s2"].patient_id} == {"CQ500-CT-3"}
    assert scans["CQ500-CT-3"].labels == scans["CQ500-CT-3_s2"].labels and scans["CQ500-CT-3"].labels[0] == 1.0
    left_out = {r.reason.split(" ")[1]: r.reason.split(":")[-1].strip() for r in index.rejects}
    assert left_out == {"2.1.2": "post-contrast series", "2.1.4": "bone/lung reconstruction or reformat",
                        "2.1.5": "bone/lung reconstruction or reformat", "2.2.2": "post-contrast series"}
    assert cohort_summary(index) == {"scans": 3, "patients": 2, "min_slices": 5, "max_slices": 12,
                                     "slices": 23, "series_left_out": 4}


def test_one_series_per_patient_option_and_bone_option(cq500_tree):
    one = build_scan_index(cq500_tree, "cq500", progress=False, cq500_series="one")
    assert [(s.scan_id, s.series_uid) for s in one.scans] == [("CQ500-CT-3", "2.1.1"), ("CQ500-CT-12", "2.2.1")]
    assert any("2.1.3" in r.reason and "not chosen" in r.reason for r in one.rejects)
    bone = build_cq500_index(cq500_tree, bone=True, progress=False)
    assert [(s.scan_id, s.series_uid) for s in bone.scans] == [
        ("CQ500-CT-3", "2.1.1"), ("CQ500-CT-3_s2", "2.1.4"), ("CQ500-CT-3_s3", "2.1.3"), ("CQ500-CT-12", "2.2.1")]
    with pytest.raises(ValueError, match="CQ500 series rule 'thick': expected one of all, one"):
        build_cq500_index(cq500_tree, series="thick")


def test_count_command_prints_the_cohort(cq500_tree, capsys):
    assert main([str(cq500_tree)]) == 0
    assert json.loads(capsys.readouterr().out)["scans"] == 3
    assert main([str(cq500_tree), "--series", "one"]) == 0
    assert json.loads(capsys.readouterr().out) == {"scans": 2, "patients": 2, "min_slices": 5, "max_slices": 6,
                                                   "slices": 11, "series_left_out": 5}
    with pytest.raises(SystemExit) as exc:
        main([str(cq500_tree / "nope")])
    assert exc.value.code == 2


def test_real_cq500_scans_one_series_each(real_data):
    """The seven real CQ500 studies hold one plain series each: both rules give the same 7 scans."""
    root, reads = real_data / "cq500", real_data / "cq500" / "reads_subset.csv"
    every = build_cq500_index(root, reads, progress=False)
    one = build_cq500_index(root, reads, progress=False, series="one")
    assert [s.scan_id for s in every.scans] == [s.scan_id for s in one.scans]
    assert cohort_summary(every) == {"scans": 7, "patients": 7, "min_slices": 30, "max_slices": 30,
                                     "slices": 210, "series_left_out": 0}
