"""Stage one end to end on tiny synthetic DICOM (6 scans x 4 slices, 32 px, VGG16 at 32 and 48 px):
cached vectors equal a direct VGG16 forward, SIGKILL (dask workers included) + resume equals an
uninterrupted run (the killed run encodes on a dask worker, the resume in this process),
changed configs are refused, undecodable slices become rejects, CLI errors are clear."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from dicom_fixtures import write_slice

from cache.store import CacheError, FeatureCache
from cache.verify import verify_cache, verify_parts
from cache.writer import PartsWriter, WriterLocked, parts_dir, rejects_path
from pipeline.config import load_config
from pipeline.data.dicom_io import read_hu
from pipeline.data.index import build_scan_index
from pipeline.features.encoder import load_encoder
from pipeline.features.extraction import PAUSE_ENV, run_extraction

REPO = Path(__file__).resolve().parent.parent
N_SCANS, N_SLICES, SIZE = 6, 4, 32
RESOLUTIONS = [32, 48]


def write_dataset(root: Path, n_scans: int = N_SCANS, n_slices: int = N_SLICES, seed: int = 0) -> Path:
    """A folder-layout tree: one series per scan, random textured HU pixels, shuffled file names."""
    rng = np.random.default_rng(seed)
    for s in range(n_scans):
        series = f"1.2.826.0.1.{seed}.{s + 1}"
        for k in rng.permutation(n_slices):
            stored = rng.integers(900, 1200, size=(SIZE, SIZE)).astype(np.int16)  # HU -124 .. 176
            stored[4:12, 4:12] = 2500                                              # bone-like block
            write_slice(root / f"scan{s}" / f"im{k:03d}.dcm", stored, ipp=(0.0, 0.0, 5.0 * k),
                        instance_number=int(k) + 1, series_uid=series, study_uid=f"1.2.826.0.2.{s}",
                        patient_id=f"P{s // 2}")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("dicom"))


def make_config(out: Path, data: Path, **extract) -> dict:
    overrides = {
        "dataset.data": str(data), "dataset.layout": "folder", "dataset.keep_ids": True,  # ids compared below
        "extract.out": str(out), "extract.resolutions": RESOLUTIONS, "extract.weights": "random:0",
        "extract.workers": 0, "extract.scans_per_commit": 2, "extract.batch_size": 4,
        "extract.precision": "fp32", "extract.device": "cpu",
    }
    overrides.update({f"extract.{k}": v for k, v in extract.items()})
    return load_config(None, overrides)


def extract(out: Path, data: Path, **extract_settings):
    index = build_scan_index(data, "folder", progress=False)
    return run_extraction(index, make_config(out, data, **extract_settings), progress=False, log=lambda m: None)


def read_all(path: Path) -> dict[str, np.ndarray]:
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[:]) if isinstance(obj, h5py.Dataset) else None)
        arrays["attrs"] = {k: v for k, v in f.attrs.items()}
    return arrays


def assert_same_cache(a: Path, b: Path) -> None:
    x, y = read_all(a), read_all(b)
    assert set(x) == set(y)
    for name in x:
        if name == "attrs":
            assert {k: str(v) for k, v in x[name].items()} == {k: str(v) for k, v in y[name].items()}
        else:
            assert x[name].dtype == y[name].dtype and np.array_equal(x[name], y[name]), name


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    """An uninterrupted run (the baseline of the resume test)."""
    out = tmp_path_factory.mktemp("ref") / "features.h5"
    result = extract(out, dataset)
    assert result.n_scans == N_SCANS and result.n_slices == N_SCANS * N_SLICES
    return out


def direct_vectors(paths: list[str], resolution: int, weights: str = "random:0") -> np.ndarray:
    """An independent path: read HU, window with numpy, resize to 32 with torch, upsample, normalise,
    run the bare VGG16 conv trunk and take the spatial max."""
    encoder, _ = load_encoder(weights)
    windows = np.array([[40, 80], [80, 200], [600, 2800]], np.float32)
    images = []
    for path in paths:
        hu = read_hu(path)
        low = windows[:, 0, None, None] - windows[:, 1, None, None] / 2
        images.append(np.clip((hu[None] - low) / windows[:, 1, None, None], 0, 1))
    x = torch.from_numpy(np.stack(images)).half().float()      # 32 px already: float16 transfer
    if resolution != SIZE:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        maps = encoder.features((x - mean) / std)
    return maps.amax(dim=(2, 3)).numpy()


def test_cached_features_equal_direct_vgg16_forward(reference, dataset):
    index = build_scan_index(dataset, "folder", progress=False)
    with FeatureCache(reference) as cache:
        assert cache.resolutions == RESOLUTIONS
        assert cache.provenance["aps_source"] == "upsampled" and cache.attrs["precision"] == "fp32"
        assert len(cache) == N_SCANS
        for scan in index.scans[:2]:
            paths = [s.path for s in scan.slices]
            table = cache.table
            rows = table.rows(cache.index_of(scan.scan_id))
            np.testing.assert_array_equal(table.z[rows], [s.z for s in scan.slices])
            assert list(table.sop_uid[rows]) == [s.sop_uid for s in scan.slices]
            assert list(table.path[rows]) == [str(Path(p).relative_to(dataset.resolve())) for p in paths]
            for resolution in RESOLUTIONS:
                cached = cache.features(scan.scan_id, resolution).astype(np.float32)
                direct = direct_vectors(paths, resolution)
                assert cached.shape == (N_SLICES, 512)
                np.testing.assert_allclose(cached, direct, rtol=2e-3, atol=2e-3 * np.abs(direct).max())
    assert verify_cache(reference).ok
    assert rejects_path(reference).read_text().splitlines() == ["scan_id,path,reason"]
    assert not parts_dir(reference).exists()


def test_sigkill_mid_extraction_then_resume_equals_uninterrupted(reference, dataset, tmp_path):
    out = tmp_path / "features.h5"
    # The killed run decodes on a local dask cluster (1 worker process); the resume decodes in-process:
    # the cache must not depend on either.
    command = [sys.executable, "-m", "stages.cli", "extract", "--data", str(dataset), "--layout", "folder",
               "--out", str(out), "--resolutions", ",".join(map(str, RESOLUTIONS)), "--weights", "random:0",
               "--workers", "1", "--scans-per-commit", "2", "--batch-size", "4", "--precision", "fp32",
               "--device", "cpu", "--no-progress", "--keep-ids"]
    env = {**os.environ, PAUSE_ENV: "5"}
    # Own process group: the SIGKILL takes the dask worker processes with it, like a machine crash.
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        deadline = time.time() + 90
        while not list(parts_dir(out).glob("unit-*.h5")) and time.time() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert process.poll() is None, process.communicate()[1].decode()
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    assert process.returncode == -signal.SIGKILL
    # The killed state: no cache yet, a valid partial extraction that says how to resume.
    assert not out.exists()
    with pytest.raises(CacheError, match="run `drct extract` again to resume"):
        FeatureCache(out)
    report = verify_parts(parts_dir(out))
    assert report.ok, report.problems
    assert f"2 of {N_SCANS} scans committed" in report.notes[0]
    result = extract(out, dataset)          # resume
    assert result.skipped_scans == 2 and result.n_slices == (N_SCANS - 2) * N_SLICES
    assert_same_cache(out, reference)
    assert not parts_dir(out).exists()
    again = extract(out, dataset)           # nothing left to do
    assert again.up_to_date and again.n_slices == 0


def crash_before_merge(monkeypatch):
    def boom(self, *args, **kwargs):
        raise RuntimeError("simulated crash before the merge")

    monkeypatch.setattr(PartsWriter, "finish", boom)


def test_resume_with_changed_config_is_refused(dataset, tmp_path, monkeypatch):
    out = tmp_path / "features.h5"
    with monkeypatch.context() as patch:
        crash_before_merge(patch)
        with pytest.raises(RuntimeError, match="simulated crash"):
            extract(out, dataset, scans_per_commit=3)
    assert len(list(parts_dir(out).glob("unit-*.h5"))) == 2
    with pytest.raises(CacheError, match=r"aps_source: cache has 'upsampled', config wants 'native'"):
        extract(out, dataset, aps_source="native")
    with pytest.raises(CacheError, match=r"weights: cache has 'random:0', config wants 'random:1'"):
        extract(out, dataset, weights="random:1")
    with pytest.raises(CacheError, match=r"resolutions"):
        extract(out, dataset, resolutions=[32, 64])
    # the original settings finish it; the parts' scans are not recomputed
    result = extract(out, dataset, scans_per_commit=3)
    assert result.skipped_scans == N_SCANS and result.n_scans == N_SCANS
    # a finished cache of other settings is never appended to either
    with pytest.raises(CacheError, match=r"windows"):
        extract(out, dataset, windows=[[40, 80], [80, 200], [500, 2000]])


def test_undecodable_slices_are_rejected_and_the_scan_kept(tmp_path):
    data = write_dataset(tmp_path / "dicom", n_scans=3, n_slices=3, seed=1)
    broken = min((data / "scan1").glob("*.dcm"))
    broken.write_bytes(broken.read_bytes()[:-200])                 # header intact, pixels cut short
    for path in (data / "scan2").glob("*.dcm"):                    # every slice of scan 2 broken
        path.write_bytes(path.read_bytes()[:-200])
    out = tmp_path / "features.h5"
    result = extract(out, data, scans_per_commit=1)
    index = build_scan_index(data, "folder", progress=False)
    with FeatureCache(out) as cache:
        assert cache.scan_ids == [index.scans[0].scan_id, index.scans[1].scan_id]
        assert list(cache.table.n_slices) == [3, 2]
        assert str(broken.relative_to(data.resolve())) not in list(cache.table.path)
    rows = rejects_path(out).read_text().splitlines()[1:]
    assert any(str(broken) in row and "pixels not decodable" in row for row in rows)
    assert any(index.scans[2].scan_id in row and "none of its 3 slices could be decoded" in row for row in rows)
    assert result.n_rejects == len(rows) == 3 + 1 + 1
    assert verify_cache(out).ok


def test_one_writer_at_a_time(tmp_path):
    manifest = {"provenance": {}, "label_names": [], "layout": "folder", "data_root": "/", "n_scans": 0}
    with PartsWriter(tmp_path / "f.h5", manifest), pytest.raises(WriterLocked, match="another `drct extract`"):
        PartsWriter(tmp_path / "f.h5", manifest).open()


def test_cli_errors_are_clear(tmp_path, dataset):
    from stages.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["extract", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "f.h5")])
    assert result.exit_code == 2 and "data folder not found" in result.output
    result = runner.invoke(main, ["extract", "--data", str(dataset), "--layout", "folder", "--workers", "0",
                                  "--out", str(tmp_path / "f.h5"), "--weights", str(tmp_path / "missing.pth")])
    assert result.exit_code == 2 and "weights file not found" in result.output
    result = runner.invoke(main, ["extract", "--data", str(dataset), "--layout", "folder", "--workers", "0",
                                  "--out", str(tmp_path / "f.h5"), "--resolutions", "64,32"])
    assert result.exit_code == 2 and "distinct and increasing" in result.output
    result = runner.invoke(main, ["extract", "--data", str(dataset), "--layout", "folder", "--out",
                                  str(tmp_path / "f.h5"), "--scheduler", "tls://127.0.0.1:9", "--tls-ca", "ca.pem"])
    assert result.exit_code == 2 and "TLS needs all three of --tls-ca, --tls-cert and --tls-key" in result.output
    result = runner.invoke(main, ["extract", "--data", str(dataset), "--layout", "folder", "--out",
                                  str(tmp_path / "f.h5"), "--workers", "2", "--encode-on", "gpu"])
    assert result.exit_code == 2 and "'gpu' is not one of 'workers', 'client'" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "f.h5").exists()


def test_extract_help_explains():
    from stages.cli import main

    result = CliRunner().invoke(main, ["extract", "--help"])
    assert result.exit_code == 0
    for flag in ("--scheduler", "--workers", "--resolutions", "--weights", "--precision", "resumable",
                 "--encode-on", "--threads-per-worker", "--worker-timeout", "--tls-ca", "--tls-cert", "--tls-key"):
        assert flag in result.output
