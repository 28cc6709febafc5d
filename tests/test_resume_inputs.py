"""Issue 11, items 4 and 9: a resume notices changed inputs (edited, added, removed files and
scans), a crash right after the final rename doubles no reject, index-time rejects reach the
cache's /rejects, and caches side by side never share a rejects file."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from bad_inputs import pixels, retag, series
from dicom_fixtures import write_slice

from cache.store import FeatureCache
from cache.verify import verify_cache
from cache.writer import PartsWriter, read_rejects_tables, rejects_path
from pipeline.config import load_config
from pipeline.data.index import build_scan_index
from pipeline.features.extraction import run_extraction


def extract(out: Path, data: Path, messages: list | None = None, **settings):
    overrides = {
        "dataset.data": str(data), "dataset.layout": "folder", "extract.out": str(out), "dataset.keep_ids": True,
        "extract.resolutions": [32, 48], "extract.weights": "random:0", "extract.workers": 0,
        "extract.scans_per_commit": 2, "extract.batch_size": 8, "extract.precision": "fp32", "extract.device": "cpu",
    }
    overrides.update({f"extract.{k}": v for k, v in settings.items()})
    index = build_scan_index(data, "folder", progress=False)
    log = messages.append if messages is not None else (lambda m: None)
    return run_extraction(index, load_config(None, overrides), progress=False, log=log)


def touch_later(path: str | Path) -> None:
    """Make sure an edit shows in mtime even on coarse-clock file systems."""
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))


def rows_of(out: Path) -> list[tuple[str, str, str]]:
    with open(rejects_path(out), newline="") as handle:
        return [tuple(row) for row in csv.reader(handle)][1:]


def snapshot(out: Path) -> dict[str, tuple[int, bytes]]:
    with FeatureCache(out) as cache:
        return {sid: (int(cache.table.n_slices[i]), cache.features(sid, 48).tobytes())
                for i, sid in enumerate(cache.scan_ids)}


@pytest.fixture
def data(tmp_path) -> Path:
    root = tmp_path / "dicom"
    for k in range(4):
        series(root / f"scan{k}", f"2.2.{k}", n=3, seed=k)
    bad = write_slice(root / "scan1" / "nan.dcm", pixels(9, 1), ipp=(0.0, 0.0, 15.0), instance_number=4,
                      series_uid="2.2.1", study_uid="2.2.1.0", patient_id="P-ok")
    retag(bad, RescaleSlope="NaN")
    return root


def test_resume_re_extracts_changed_added_and_removed_inputs(data, tmp_path):
    out = tmp_path / "features.h5"
    extract(out, data)
    before = snapshot(out)
    assert before["2.2.1"][0] == 3 and any("nan.dcm" in row[1] for row in rows_of(out))
    messages: list[str] = []
    assert extract(out, data, messages).up_to_date

    # Fix the NaN file: the scan is extracted again and gets its fourth slice; the others are untouched.
    retag(data / "scan1" / "nan.dcm", RescaleSlope="1")
    touch_later(data / "scan1" / "nan.dcm")
    messages.clear()
    result = extract(out, data, messages)
    assert not result.up_to_date and result.n_slices == 4
    assert any("1 scans changed since they were extracted" in m for m in messages)
    after = snapshot(out)
    assert after["2.2.1"][0] == 4
    assert {k: v for k, v in after.items() if k != "2.2.1"} == {k: v for k, v in before.items() if k != "2.2.1"}
    assert not any("nan.dcm" in row[1] for row in rows_of(out))

    # A file added to scan 2, one removed from scan 3, scan 0 removed whole.
    write_slice(data / "scan2" / "extra.dcm", pixels(7, 2), ipp=(0.0, 0.0, 15.0), instance_number=4,
                series_uid="2.2.2", study_uid="2.2.2.0", patient_id="P-ok")
    (data / "scan3" / "im2.dcm").unlink()
    for path in (data / "scan0").iterdir():
        path.unlink()
    result = extract(out, data)
    assert result.n_slices == 4 + 2
    final = snapshot(out)
    assert {sid: n for sid, (n, _) in final.items()} == {"2.2.1": 4, "2.2.2": 4, "2.2.3": 2}
    assert final["2.2.1"] == after["2.2.1"]
    assert verify_cache(out).ok
    assert extract(out, data).up_to_date


def test_changed_scan_of_a_committed_unit_loses_nothing(data, tmp_path, monkeypatch):
    """A change between a crash and the resume: the re-extracted scan's part must not replace the
    part of its unit, which holds a scan that did not change."""
    out = tmp_path / "features.h5"
    reference = tmp_path / "reference.h5"
    with monkeypatch.context() as patch:
        patch.setattr(PartsWriter, "finish", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("crash")))
        with pytest.raises(RuntimeError, match="crash"):
            extract(out, data)
    retag(data / "scan0" / "im1.dcm", RescaleSlope="2")
    touch_later(data / "scan0" / "im1.dcm")
    extract(out, data)
    extract(reference, data)
    assert snapshot(out) == snapshot(reference)
    assert rows_of(out) == rows_of(reference)


def test_crash_after_the_final_rename_doubles_no_reject(data, tmp_path, monkeypatch):
    reference = tmp_path / "reference.h5"
    extract(reference, data)
    out = tmp_path / "features.h5"
    with monkeypatch.context() as patch:   # the kill lands after OUT's rename, before the parts are removed
        patch.setattr("cache.writer.shutil.rmtree", lambda *a, **k: None)
        extract(out, data)
    assert (Path(str(out) + ".parts")).is_dir()
    extract(out, data)
    assert not (Path(str(out) + ".parts")).exists()
    assert rows_of(out) == rows_of(reference) and len(set(rows_of(out))) == len(rows_of(out))
    with h5py.File(out, "r") as f, h5py.File(reference, "r") as g:
        assert read_rejects_tables(f) == read_rejects_tables(g)
    assert snapshot(out) == snapshot(reference)


def test_index_rejects_reach_the_cache(data, tmp_path):
    (data / "scan2" / "notes.dcm").write_text("not DICOM")
    write_slice(data / "scan2" / "scout.dcm", pixels(1, 2), series_uid="2.2.2", study_uid="2.2.2.0",
                image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), patient_id="P-ok")
    out = tmp_path / "features.h5"
    extract(out, data)
    extract(out, data)   # a rerun merges nothing twice
    with h5py.File(out, "r") as f:
        rejects, _ = read_rejects_tables(f)
        extraction_only, _ = read_rejects_tables(f, with_index=False)
    reasons = {Path(r.path).name: r.reason for r in rejects}
    assert "not a DICOM file" in reasons["notes.dcm"] and reasons["scout.dcm"] == "localizer/scout image"
    assert "bad pixel scaling" in reasons["nan.dcm"]
    assert [r.path for r in extraction_only] == ["scan1/nan.dcm"]   # the cache: relative to the data root
    assert str(data.resolve() / "scan1" / "nan.dcm") in rejects_path(out).read_text()   # the CSV: absolute
    assert len(rejects) == len(rows_of(out)) == 3


def test_caches_side_by_side_do_not_share_a_rejects_file(tmp_path):
    assert rejects_path(tmp_path / "c.h5") == tmp_path / "c.rejects.csv"
    assert rejects_path(tmp_path / "c.hdf5") == tmp_path / "c.hdf5.rejects.csv"
    assert len({rejects_path(tmp_path / name) for name in ("c.h5", "c.hdf5", "c.cache")}) == 3
    assert np.unique([str(rejects_path(tmp_path / n)) for n in ("a.h5", "b.h5")]).size == 2
