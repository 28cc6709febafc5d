"""`drct cache info|verify` and the commit-unit writer, on small caches built directly (no CNN):
corruptions are named, unfinished extractions are reported, merges follow scan-index order."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cache.store import FeatureCache, write_cache
from cache.verify import cache_info, verify_cache, verify_parts
from cache.writer import PartsWriter, ResumeRefused, ScanFeatures, Unit, parts_dir, rejects_path
from pipeline.data.scan_index import Reject
from stages.cli import main

LABELS = ["any", "subdural"]
PROVENANCE = {
    "encoder": "vgg16", "weights": "random:0", "weights_digest": "ab" * 32, "resolutions": [32, 48],
    "windows": [[40.0, 80.0], [80.0, 200.0], [600.0, 2800.0]], "aps_source": "upsampled",
    "preprocess_version": 1, "software_version": "0.1.0", "precision": "fp32",
}


def scan(i: int, n: int, rng: np.random.Generator) -> ScanFeatures:
    return ScanFeatures(
        scan_id=f"S{i}", patient_id=f"P{i // 2}", labels=[1.0, float(i % 2)],
        z=[5.0 * k for k in range(n)], sop_uids=[f"1.2.{i}.{k}" for k in range(n)],
        paths=[f"/data/S{i}/{k}.dcm" for k in range(n)],
        slice_labels=[[1, k % 2] if i == 0 else None for k in range(n)],
        features={r: rng.random((n, 512)).astype(np.float16) for r in (32, 48)},
    )


def manifest(**changes) -> dict:
    provenance = {**PROVENANCE, **changes.pop("provenance", {})}
    return {"provenance": provenance, "label_names": LABELS, "layout": "rsna", "data_root": "/data",
            "n_scans": 5, **changes}


SIZES = [3, 1, 4, 2, 5]


@pytest.fixture
def scans():
    rng = np.random.default_rng(0)
    return [scan(i, n, rng) for i, n in enumerate(SIZES)]


def commit_units(out, scans, order=(2, 0)):
    """Commit units (scans 0-1) and (scans 2-3) in the given order, leaving scan 4 undone."""
    with PartsWriter(out, manifest()) as writer:
        for first in order:
            unit = Unit(first_index=first, scans=scans[first : first + 2],
                        rejects=[Reject(path=f"/data/S{first}/bad.dcm", reason="pixels not decodable", scan_id=f"S{first}")])
            writer.commit(unit)
        return writer


@pytest.fixture
def finished(tmp_path, scans):
    out = tmp_path / "features.h5"
    commit_units(out, scans)
    with PartsWriter(out, manifest()) as writer:
        assert writer.done == {"S0", "S1", "S2", "S3"}
        writer.commit(Unit(first_index=4, scans=scans[4:], rejected_scan_ids=["S5"],
                           rejects=[Reject(path="/data/S5", reason="scan rejected", scan_id="S5")]))
        writer.finish([f"S{i}" for i in range(6)], [Reject(path="/data/x.txt", reason="not DICOM")])
    return out


def test_merge_follows_scan_order_and_keeps_every_row(finished, scans):
    with FeatureCache(finished) as cache:
        assert cache.scan_ids == ["S0", "S1", "S2", "S3", "S4"]
        assert list(cache.table.n_slices) == SIZES
        assert list(cache.table.offset) == [0, 3, 4, 8, 10]
        for i, s in enumerate(scans):
            for r in (32, 48):
                np.testing.assert_array_equal(cache.features(i, r), s.features[r])
        assert list(cache.table.path[:2]) == ["S0/0.dcm", "S0/1.dcm"]              # relative to data_root
        np.testing.assert_array_equal(cache.table.slice_labels[:3], [[1, 0], [1, 1], [1, 0]])
        assert (cache.table.slice_labels[3:] == -1).all()
        assert cache.provenance["weights_digest"] == "ab" * 32
    rows = rejects_path(finished).read_text().splitlines()
    assert rows[0] == "scan_id,path,reason" and rows[1] == ",/data/x.txt,not DICOM"
    assert [r.split(",")[0] for r in rows[2:]] == ["S0", "S2", "S5"]
    assert not parts_dir(finished).exists()


def test_verify_and_info_of_a_good_cache(finished):
    report = verify_cache(finished)
    assert report.ok, report.problems
    assert "5 scans, 15 slices" in report.notes[0]
    text = cache_info(finished)
    for expected in ("vgg16", "random:0", "ab" * 32, "upsampled", "scans        5 (3 patients)",
                     "slices       15 (per scan: min 1, median 3, max 5)", "32, 48 px",
                     "positive scans (5 labelled): any 5, subdural 2", "positive slices (3 labelled): any 3, subdural 1",
                     "rejects      3 at extraction (1 whole scans)", "KiB"):
        assert expected in text, expected
    result = CliRunner().invoke(main, ["cache", "verify", str(finished)])
    assert result.exit_code == 0 and "OK" in result.output
    result = CliRunner().invoke(main, ["cache", "info", str(finished)])
    assert result.exit_code == 0 and "weights_digest" in result.output


def test_verify_names_nan_and_structural_damage(finished, tmp_path):
    with h5py.File(finished, "r+") as f:
        f["features/48"][7, 3] = np.nan
        f["features/32"][0, 0] = np.inf
    report = verify_cache(finished)
    assert not report.ok
    assert any("/features/48: 1 slice vectors contain NaN or inf (first: slice row 7, scan 'S2')" in p
               for p in report.problems)
    assert any(p.startswith("/features/32: 1 slice vectors") for p in report.problems)
    result = CliRunner().invoke(main, ["cache", "verify", str(finished)])
    assert result.exit_code == 1 and "NaN or inf" in result.output and "FAILED" in result.output

    with h5py.File(finished, "r+") as f:
        f["features/48"][7, 3] = 0
        f["features/32"][0, 0] = 0
        f["scans/offset"][2] = 5
        del f.attrs["windows"]
    problems = verify_cache(finished).problems
    assert "provenance attributes missing: windows" in problems
    assert any("offsets are not contiguous: scan 2 starts at 5, expected 4" in p for p in problems)

    with h5py.File(finished, "r+") as f:
        del f.attrs["complete"]
    assert any("completion marker" in p for p in verify_cache(finished).problems)
    (tmp_path / "junk.h5").write_bytes(b"junk")
    assert "not a readable HDF5 file" in verify_cache(tmp_path / "junk.h5").problems[0]


def test_verify_reports_an_unfinished_extraction(tmp_path, scans):
    out = tmp_path / "features.h5"
    commit_units(out, scans)
    (parts_dir(out) / "unit-00000004.h5.tmp").write_bytes(b"half a write")     # a killed commit
    report = verify_parts(parts_dir(out))
    assert report.ok, report.problems
    assert "4 of 5 scans committed in 2 parts" in report.notes[0]
    assert "run drct extract again" in report.notes[1]
    for target in (out, parts_dir(out)):
        result = CliRunner().invoke(main, ["cache", "verify", str(target)])
        assert result.exit_code == 0 and "4 of 5 scans committed" in result.output
    with PartsWriter(out, manifest()) as writer:                                  # resume cleans the tmp
        assert writer.done == {"S0", "S1", "S2", "S3"}
    assert not list(parts_dir(out).glob("*.tmp"))
    result = CliRunner().invoke(main, ["cache", "verify", str(tmp_path / "nothing.h5")])
    assert result.exit_code == 2 and "no feature cache" in result.output


def test_resume_refused_names_the_field(tmp_path, scans):
    out = tmp_path / "features.h5"
    commit_units(out, scans)
    with pytest.raises(ResumeRefused, match="weights_digest: existing has 'abab"):
        PartsWriter(out, manifest(provenance={"weights_digest": "cd" * 32})).open()
    with pytest.raises(ResumeRefused, match="precision: existing has 'fp32', this run has 'bf16'"):
        PartsWriter(out, manifest(provenance={"precision": "bf16"})).open()
    with pytest.raises(ResumeRefused, match="windows"):
        PartsWriter(out, manifest(provenance={"windows": [[40, 80], [80, 200], [600, 2000]]})).open()


def test_a_finished_cache_is_extended_not_rewritten(finished, scans):
    rng = np.random.default_rng(9)
    extra = scan(9, 2, rng)
    m = manifest(n_scans=6)
    with PartsWriter(finished, m) as writer:
        assert writer.previous_cache == finished
        assert writer.done == {"S0", "S1", "S2", "S3", "S4", "S5"}
        writer.commit(Unit(first_index=6, scans=[extra]))
        writer.finish(["S0", "S1", "S2", "S3", "S4", "S5", "S9"], [])
    with FeatureCache(finished) as cache:
        assert cache.scan_ids == ["S0", "S1", "S2", "S3", "S4", "S9"]
        np.testing.assert_array_equal(cache.features("S9", 48), extra.features[48])
        np.testing.assert_array_equal(cache.features("S4", 32), scans[4].features[32])
    assert len(rejects_path(finished).read_text().splitlines()) == 1 + 3          # extraction rejects kept
    assert verify_cache(finished).ok


def test_empty_unit_and_unlabelled_layout(tmp_path):
    out = tmp_path / "f.h5"
    m = {**manifest(), "label_names": [], "layout": "folder", "n_scans": 1}
    with PartsWriter(out, m) as writer:
        writer.commit(Unit(first_index=0, rejected_scan_ids=["A"], rejects=[Reject("/d/A", "scan rejected", "A")]))
        assert verify_parts(parts_dir(out)).ok
        writer.finish(["A"], [])
    assert verify_cache(out).ok
    assert "none (unlabelled layout)" in cache_info(out)
    write_cache(tmp_path / "g.h5", scan_ids=[], patient_ids=[], scan_labels=np.zeros((0, 0)), n_slices=[],
                z=[], sop_uids=[], paths=[], slice_labels=np.zeros((0, 0)),
                features={32: np.zeros((0, 512), np.float16)}, attrs={**PROVENANCE, "label_names": [],
                                                                      "resolutions": [32]})
    assert verify_cache(tmp_path / "g.h5").ok
