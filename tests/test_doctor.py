"""`drct doctor`: each check against a constructed case, and the exit code when a run would fail."""

from __future__ import annotations

from collections import namedtuple

import pytest
from click.testing import CliRunner

from pipeline import doctor
from stages.cli import main


def test_disk_estimate_by_hand_and_fail_without_space(tmp_path, monkeypatch):
    data = tmp_path / "dicom"
    (data / "a").mkdir(parents=True)
    for i in range(10):
        (data / "a" / f"{i}.dcm").write_bytes(b"x")
    (data / "labels.csv").write_text("not a slice")
    need = 10 * 2 * 512 * 2 * 1.15  # files x resolutions x float16 512-d x overhead
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda p: usage(0, 0, int(need) + 1))
    check = doctor.disk_check(tmp_path / "out" / "f.h5", data, [32, 64])
    assert check.status == "ok" and "10 files x 2 resolutions" in check.detail
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda p: usage(0, 0, int(need) - 100))
    assert doctor.disk_check(tmp_path / "out" / "f.h5", data, [32, 64]).status == "fail"


def test_weights_and_dvc_checks(tmp_path, monkeypatch):
    assert doctor.weights_check(str(tmp_path / "missing.pth")).status == "fail"
    import torch

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert doctor.weights_check("imagenet").status == "warn"
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / doctor.IMAGENET_FILE).write_bytes(b"x")
    assert doctor.weights_check("imagenet").status == "ok"
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("[core]\n    analytics = false\n    check_update = false\n")
    assert doctor.dvc_check(tmp_path).status == "ok"
    (tmp_path / ".dvc" / "config").write_text("[core]\n    analytics = false\n")
    check = doctor.dvc_check(tmp_path)
    assert check.status == "warn" and "core.check_update=unset" in check.detail


def test_unreachable_scheduler_fails():
    pytest.importorskip("distributed")
    check = doctor.scheduler_check("tcp://127.0.0.1:9", timeout=1)
    assert check.status == "fail" and "cannot connect" in check.detail


def test_doctor_exits_non_zero_when_the_run_would_fail(tmp_path):
    ok = CliRunner().invoke(main, ["doctor", "--set", "extract.weights=random:0", "--cache", str(tmp_path / "f.h5")])
    assert ok.exit_code == 0, ok.output
    for name in ("cpu", "precision", "torch", "dicom", "weights", "disk", "dvc", "dask"):
        assert f" {name} " in ok.output
    assert "precision auto -> " in ok.output and ok.output.strip().endswith("-> ready")
    bad = CliRunner().invoke(main, ["doctor", "--set", f"extract.weights={tmp_path / 'none.pth'}", "--cache", str(tmp_path / "f.h5")])
    assert bad.exit_code == 1 and "FAIL weights" in bad.output and "the run would fail: weights" in bad.output
