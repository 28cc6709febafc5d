"""Issue 11, item 3: flipped bytes, NaN/inf vectors and truncated files are caught by
`drct cache verify` and by what train and export read, each with one clear message."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cache.store import CacheError, FeatureCache, write_cache
from cache.verify import verify_cache
from pipeline.training.dataset import CachedFeatures
from stages.cli import main

LABELS = ["any", "subdural"]
ATTRS = {
    "encoder": "vgg16", "weights": "random:0", "weights_digest": "ab" * 32, "resolutions": [32, 48],
    "windows": [[40.0, 80.0], [80.0, 200.0], [600.0, 2800.0]], "aps_source": "upsampled",
    "preprocess_version": 1, "software_version": "0.1.0", "precision": "fp32", "label_names": LABELS,
}


def make_cache(path: Path, *, nan: bool = False, n_scans: int = 6, n: int = 700) -> Path:
    rng = np.random.default_rng(0)
    total = n_scans * n
    features = {r: rng.random((total, 512)).astype(np.float16) for r in (32, 48)}
    if nan:
        features[48][total // 2, 7] = np.inf
        features[48][total - 1, 3] = np.nan
    return write_cache(
        path, scan_ids=[f"S{i}" for i in range(n_scans)], patient_ids=[f"P{i}" for i in range(n_scans)],
        scan_labels=np.ones((n_scans, 2), np.float32), n_slices=[n] * n_scans, z=np.zeros(total),
        sop_uids=[f"1.{k}" for k in range(total)], paths=[f"s/{k}.dcm" for k in range(total)],
        slice_labels=np.full((total, 2), -1, np.int8), features=features, attrs=ATTRS,
    )


def flip_bytes(path: Path, dataset: str, n_bytes: int = 64, chunk: int = 0, row: int = 50) -> None:
    """Change n_bytes of `row` (counted within the chunk) of one stored chunk (a silent disk error).
    XOR 0x5A, not 0xFF: Fletcher32 cannot tell a 0x0000 word from 0xFFFF."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(chunk)
    start = info.byte_offset + row * 512 * 2
    with open(path, "r+b") as handle:
        handle.seek(start)
        data = bytearray(handle.read(n_bytes))
        handle.seek(start)
        handle.write(bytes(b ^ 0x5A for b in data))


def test_every_dataset_carries_a_checksum(tmp_path):
    path = make_cache(tmp_path / "c.h5", n_scans=2, n=3)
    with h5py.File(path, "r") as f:
        for name in ("features/32", "features/48", "scans/labels", "slices/z", "scans/offset"):
            assert f[name].fletcher32, name
        for name in ("scans/scan_id", "slices/path", "slices/sop_uid"):
            assert len(f[name].attrs["sha256"]) == 64
    report = verify_cache(path)
    assert report.ok and not any("no checksums" in note for note in report.notes)


def test_flipped_feature_bytes_fail_verify_train_and_export(tmp_path):
    path = make_cache(tmp_path / "c.h5")
    flip_bytes(path, "features/48", chunk=1)   # rows 4096.. (chunks of 4096 rows): the end of scan S5
    report = verify_cache(path)
    assert not report.ok
    assert any("/features/48: checksum mismatch in 104 slice rows" in p and "'S5'" in p for p in report.problems)
    result = CliRunner().invoke(main, ["cache", "verify", str(path)])
    assert result.exit_code == 1 and "checksum mismatch" in result.output
    cache = FeatureCache(path)
    cache.features("S0", 48)   # a scan outside the damaged chunk still reads
    with pytest.raises(CacheError, match="checksum mismatch"):
        cache.features("S5", 48)
    with pytest.raises(CacheError, match=r"features/48 is corrupt \(checksum mismatch"):
        CachedFeatures.from_cache(cache, 32, 48)   # what train loads
    result = CliRunner().invoke(main, ["export", str(path), "--format", "npz", "--out", str(tmp_path / "e.npz"),
                                       "--quiet"])
    assert result.exit_code == 2 and "checksum mismatch" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "e.npz").exists()


def test_flipped_string_bytes_fail_verify_and_open(tmp_path):
    path = make_cache(tmp_path / "c.h5", n_scans=2, n=3)
    with h5py.File(path, "r+") as f:       # a changed path string (the heap is not filterable)
        f["slices/path"][1] = "s/evil.dcm"
    assert any("/slices/path: checksum mismatch" in p for p in verify_cache(path).problems)
    with pytest.raises(CacheError, match="slices/path is corrupt"):
        _ = FeatureCache(path).table


def test_nan_and_inf_vectors_are_refused_by_train_and_export(tmp_path):
    path = make_cache(tmp_path / "c.h5", nan=True)
    assert any("2 slice vectors contain NaN or inf" in p for p in verify_cache(path).problems)
    with pytest.raises(CacheError, match="2 slice vectors contain NaN or inf"):
        CachedFeatures.from_cache(FeatureCache(path), 32, 48)
    result = CliRunner().invoke(main, ["export", str(path), "--format", "parquet", "--out", str(tmp_path / "e.parquet"),
                                       "--quiet"])
    assert result.exit_code == 2 and "NaN or inf" in result.output and "Traceback" not in result.output


def test_truncated_cache_gives_one_clear_message_everywhere(tmp_path):
    import json

    from dicom_fixtures import write_series

    path = make_cache(tmp_path / "c.h5", n_scans=2, n=50)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    write_series(tmp_path / "dicom", 2)
    run = tmp_path / "run0"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"label_names": LABELS, "model": "drct2", "cache": str(path)}))
    np.savez(run / "oof.npz", scan_id=np.array(["S0"]), fold=np.zeros(1, np.int64), labels=np.zeros((1, 2), np.float32),
             prob=np.zeros((1, 2), np.float32), sample_idx=np.zeros((1, 4), np.int64),
             slice_attention=np.zeros((1, 4), np.float32), feature_attention=np.zeros((1, 4, 512), np.float16))
    commands = [
        ["report", str(run), "--out", str(tmp_path / "rep")],
        ["interpret", str(run), "--out", str(tmp_path / "int")],
        ["cache", "info", str(path)],
        ["cache", "verify", str(path)],
        ["train", "--cache", str(path), "--out", str(tmp_path / "run")],
        ["export", str(path), "--format", "npz", "--out", str(tmp_path / "e.npz")],
        ["extract", "--data", str(tmp_path / "dicom"), "--layout", "folder", "--out", str(path), "--workers", "0",
         "--weights", "random:0", "--no-progress"],
    ]
    for command in commands:
        result = CliRunner().invoke(main, command)
        assert result.exit_code == (1 if command[:2] == ["cache", "verify"] else 2), (command, result.output)
        assert "Traceback" not in result.output and not isinstance(result.exception, OSError), command
        assert "not a readable" in result.output and str(path) in result.output, (command, result.output)


def test_h5_export_carries_checksums_too(tmp_path):
    path = make_cache(tmp_path / "c.h5", n_scans=3, n=5)
    result = CliRunner().invoke(main, ["export", str(path), "--format", "h5", "--out", str(tmp_path / "e.h5"),
                                       "--scans", "S2,S0", "--quiet"])
    assert result.exit_code == 0, result.output
    report = verify_cache(tmp_path / "e.h5")
    assert report.ok and not any("no checksums" in note for note in report.notes), report
