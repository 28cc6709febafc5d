"""`drct export`: every format round-trips the cache's values exactly, streams in bounded
batches, writes a manifest, and turns bad requests into messages."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cache.store import FeatureCache, write_cache
from pipeline import export as ex
from stages.cli import main

LABELS = ["any", "epidural", "subdural"]
N_SLICES = [5, 3, 7, 1, 4, 6]
RESOLUTIONS = [64, 128]


def make_cache(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    n_scans, total = len(N_SLICES), sum(N_SLICES)
    scan_labels = rng.integers(0, 2, size=(n_scans, len(LABELS))).astype(np.float32)
    scan_labels[3] = np.nan  # a scan with unknown labels
    slice_labels = rng.integers(0, 2, size=(total, len(LABELS))).astype(np.int8)
    slice_labels[:4] = -1
    features = {res: rng.standard_normal((total, 512)).astype(np.float16) for res in RESOLUTIONS}
    attrs = {
        "encoder": "vgg16", "weights": "random:0", "weights_digest": "abc", "resolutions": RESOLUTIONS,
        "windows": [[40.0, 80.0]], "aps_source": "upsampled", "preprocess_version": 1,
        "software_version": "test", "label_names": LABELS, "layout": "rsna", "data_root": "/nowhere",
    }
    return write_cache(
        path,
        scan_ids=[f"scan{i}" for i in range(n_scans)],
        patient_ids=[f"pat{i // 2}" for i in range(n_scans)],
        scan_labels=scan_labels,
        n_slices=N_SLICES,
        z=rng.standard_normal(total).cumsum(),
        sop_uids=[f"1.2.840.{i}" for i in range(total)],
        paths=[f"ID_{i:09x}.dcm" for i in range(total)],
        slice_labels=slice_labels,
        features=features,
        attrs=attrs,
    )


@pytest.fixture()
def cache_path(tmp_path) -> Path:
    return make_cache(tmp_path / "features.h5")


def expected(cache_path: Path, ids: list[str], resolution: int):
    """Independent reference: per-scan reads through the cache reader, concatenated."""
    with FeatureCache(cache_path) as cache:
        t = cache.table
        idx = [cache.index_of(s) for s in ids]
        return {
            "features": np.concatenate([cache.features(i, resolution) for i in idx]),
            "z": np.concatenate([t.z[t.rows(i)] for i in idx]),
            "sop": [u for i in idx for u in t.sop_uid[t.rows(i)]],
            "slice_labels": np.concatenate([t.slice_labels[t.rows(i)] for i in idx]),
            "scan_labels": t.labels[idx],
            "n_slices": [int(t.n_slices[i]) for i in idx],
            "patient": [t.patient_id[i] for i in idx],
        }


ALL = [f"scan{i}" for i in range(len(N_SLICES))]
SUBSET = ["scan4", "scan0", "scan2", "scan5"]  # not cache order, not contiguous


def run_cli(*args) -> object:
    return CliRunner().invoke(main, ["export", *map(str, args)], catch_exceptions=False)


@pytest.mark.parametrize("ids", [None, SUBSET])
def test_npz_round_trip(cache_path, tmp_path, ids):
    out = tmp_path / "x.npz"
    summary = ex.export_cache(cache_path, out, "npz", scan_ids=ids, batch_slices=6, progress=False)
    ids = ids or ALL
    with np.load(out, allow_pickle=False) as npz:
        for res in RESOLUTIONS:
            ref = expected(cache_path, ids, res)
            assert npz[f"features_{res}"].dtype == np.float16
            np.testing.assert_array_equal(npz[f"features_{res}"], ref["features"])
        assert [s.decode() for s in npz["scan_id"]] == ids
        assert [s.decode() for s in npz["patient_id"]] == ref["patient"]
        np.testing.assert_array_equal(npz["scan_n_slices"], ref["n_slices"])
        np.testing.assert_array_equal(npz["scan_offset"], np.cumsum([0, *ref["n_slices"]])[:-1])
        np.testing.assert_array_equal(npz["scan_labels"], ref["scan_labels"])  # NaN == NaN here
        np.testing.assert_array_equal(npz["slice_z"], ref["z"])
        assert [s.decode() for s in npz["slice_sop_uid"]] == ref["sop"]
        np.testing.assert_array_equal(npz["slice_labels"], ref["slice_labels"])
        np.testing.assert_array_equal(npz["slice_scan"], np.repeat(np.arange(len(ids)), ref["n_slices"]))
        np.testing.assert_array_equal(npz["slice_index"], np.concatenate([np.arange(k) for k in ref["n_slices"]]))
        assert list(npz["label_names"]) == LABELS
        assert list(npz["resolutions"]) == RESOLUTIONS
    with zipfile.ZipFile(out) as archive:
        assert json.loads(archive.read("manifest.json"))["n_scans"] == len(ids)
    assert summary.n_slices == sum(ref["n_slices"])


def test_parquet_round_trip(cache_path, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "x.parquet"
    ex.export_cache(cache_path, out, "parquet", scan_ids=SUBSET, batch_slices=6, progress=False)
    pf = pq.ParquetFile(out)
    assert pf.metadata.num_row_groups > 1  # streamed batch by batch
    table = pf.read()
    ref = expected(cache_path, SUBSET, 64)
    for res in RESOLUTIONS:
        column = table.column(f"features_{res}").combine_chunks()
        values = column.flatten().to_numpy().reshape(-1, 512)
        assert values.dtype == np.float16
        np.testing.assert_array_equal(values, expected(cache_path, SUBSET, res)["features"])
    assert table.column("scan_id").to_pylist() == list(np.repeat(SUBSET, ref["n_slices"]))
    assert table.column("sop_uid").to_pylist() == ref["sop"]
    np.testing.assert_array_equal(table.column("z").to_numpy(), ref["z"])
    np.testing.assert_array_equal(
        table.column("slice_index").to_numpy(), np.concatenate([np.arange(k) for k in ref["n_slices"]])
    )
    for k, name in enumerate(LABELS):
        np.testing.assert_array_equal(table.column(f"slice_label_{name}").to_numpy(), ref["slice_labels"][:, k])
        np.testing.assert_array_equal(
            table.column(f"scan_label_{name}").to_numpy(), np.repeat(ref["scan_labels"][:, k], ref["n_slices"])
        )
    header = json.loads(pf.schema_arrow.metadata[b"drct_manifest"])
    assert header["provenance"]["weights"] == "random:0"


def test_h5_subset_opens_as_cache(cache_path, tmp_path):
    out = tmp_path / "subset.h5"
    ex.export_cache(cache_path, out, "h5", scan_ids=SUBSET, resolutions=[128], batch_slices=4, progress=False)
    with FeatureCache(out) as subset, FeatureCache(cache_path) as source:
        assert subset.scan_ids == SUBSET
        assert subset.resolutions == [128]
        assert subset.label_names == LABELS
        assert subset.provenance["weights_digest"] == source.provenance["weights_digest"]
        for sid in SUBSET:
            i, j = subset.index_of(sid), source.index_of(sid)
            np.testing.assert_array_equal(subset.features(sid, 128), source.features(sid, 128))
            for name in ("z", "sop_uid", "path", "slice_labels"):
                a, b = getattr(subset.table, name), getattr(source.table, name)
                np.testing.assert_array_equal(a[subset.table.rows(i)], b[source.table.rows(j)])
            np.testing.assert_array_equal(subset.table.labels[i], source.table.labels[j])
            assert subset.table.patient_id[i] == source.table.patient_id[j]
        with pytest.raises(Exception, match="resolutions"):
            subset.features(SUBSET[0], 64)


def test_manifest_lists_scans_in_export_order(cache_path, tmp_path):
    out = tmp_path / "x.h5"
    ex.export_cache(cache_path, out, "h5", scan_ids=SUBSET, progress=False)
    manifest = ex.read_manifest(out)
    ref = expected(cache_path, SUBSET, 64)
    assert [s["scan_id"] for s in manifest["scans"]] == SUBSET
    assert [s["n_slices"] for s in manifest["scans"]] == ref["n_slices"]
    assert [s["offset"] for s in manifest["scans"]] == [0, 4, 9, 16]
    assert [u for s in manifest["scans"] for u in s["sop_uid"]] == ref["sop"]
    assert [z for s in manifest["scans"] for z in s["z"]] == list(ref["z"])
    assert manifest["scans"][1]["labels"] == [float(v) for v in ref["scan_labels"][1]]
    assert manifest["label_names"] == LABELS and manifest["resolutions"] == RESOLUTIONS
    assert manifest["provenance"]["encoder"] == "vgg16"
    # scan3 has unknown labels -> null in JSON
    ex.export_cache(cache_path, out, "h5", scan_ids=["scan3"], progress=False, overwrite=True)
    assert ex.read_manifest(out)["scans"][0]["labels"] == [None, None, None]


def test_batches_are_bounded_and_whole_scans(cache_path):
    with FeatureCache(cache_path) as cache:
        selection = ex.select(cache, None, [64])
        batches = list(ex.read_batches(cache, selection, [64], batch_slices=8))
        # a scan is never split; a batch holds at most 8 slices unless one scan alone is bigger
        assert [list(b.scans) for b in batches] == [[0, 1], [2, 3], [4], [5]]
        assert all(len(b.rows) <= 8 for b in batches)
        np.testing.assert_array_equal(np.concatenate([b.features[64] for b in batches]), cache.load_all(64))


def test_failed_export_leaves_nothing(cache_path, tmp_path, monkeypatch):
    out = tmp_path / "x.parquet"

    def boom(self, batch):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex.ParquetWriter, "write", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        ex.export_cache(cache_path, out, "parquet", progress=False)
    assert list(tmp_path.iterdir()) == [cache_path]


def test_cli_exports_and_reports(cache_path, tmp_path):
    out = tmp_path / "exports" / "two.npz"
    result = run_cli(cache_path, "--format", "npz", "--out", out, "--scans", "scan1,scan2", "--resolution", 128,
                     "--quiet")
    assert result.exit_code == 0, result.output
    assert "exported 2 scans (10 slices) at [128]" in result.output
    with np.load(out) as npz:
        assert npz.files.count("features_128") == 1 and "features_64" not in npz.files
        np.testing.assert_array_equal(npz["features_128"], expected(cache_path, ["scan1", "scan2"], 128)["features"])
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("scan5\n\nscan0\n")
    result = run_cli(cache_path, "--format", "h5", "--out", tmp_path / "s.h5", "--scans", f"@{ids_file}", "--quiet")
    assert result.exit_code == 0, result.output
    assert FeatureCache(tmp_path / "s.h5").scan_ids == ["scan5", "scan0"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--scans", "scan1,nope"], "1 scan id(s) not in"),
        (["--resolution", "512"], "not cached: [512]"),
    ],
)
def test_cli_bad_requests_are_messages(cache_path, tmp_path, args, message):
    result = run_cli(cache_path, "--format", "parquet", "--out", tmp_path / "x.parquet", "--quiet", *args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.parquet").exists()


def test_cli_missing_or_incomplete_cache(tmp_path):
    result = run_cli(tmp_path / "none.h5", "--format", "npz", "--out", tmp_path / "x.npz")
    assert result.exit_code == 2 and "feature cache not found" in result.output
    import h5py

    with h5py.File(tmp_path / "half.h5", "w") as f:
        f.attrs["schema_version"] = 1
    result = run_cli(tmp_path / "half.h5", "--format", "npz", "--out", tmp_path / "x.npz")
    assert result.exit_code == 2 and "not complete" in result.output


# -- issue 16, item 1: an export never replaces what is not an export ---------------------------
def test_existing_target_needs_overwrite_and_must_be_an_export(cache_path, tmp_path):
    labels = tmp_path / "stage_2_train.csv"
    labels.write_text("ID,Label\nID_000000000_any,0\n")
    dicom = tmp_path / "ID_000000001.dcm"
    dicom.write_bytes(b"\x00" * 128 + b"DICM" + b"\x01" * 64)
    fold = tmp_path / "run" / "fold_0" / "checkpoint.pt"
    fold.parent.mkdir(parents=True)
    fold.write_bytes(b"PK torch checkpoint")
    for target in (labels, dicom, fold, cache_path):
        before = target.read_bytes()
        for extra in ((), ("--overwrite",)):
            result = run_cli(cache_path, "--format", "h5", "--out", target, "--quiet", *extra)
            assert result.exit_code == 2, (target, extra, result.output)
            if extra:
                expected_text = "onto itself" if target == cache_path else "refusing to overwrite"
                assert expected_text in result.output and "Traceback" not in result.output
                if target != cache_path:
                    assert "it is not a drct export" in result.output
            else:
                assert ("exists; pass --overwrite" in result.output) or "onto itself" in result.output
        assert target.read_bytes() == before, target
        assert not ex.manifest_path(target).exists() and not Path(str(target) + ".tmp").exists()

    out = tmp_path / "e.npz"
    assert run_cli(cache_path, "--format", "npz", "--out", out, "--quiet").exit_code == 0
    result = run_cli(cache_path, "--format", "npz", "--out", out, "--quiet", "--scans", "scan1")
    assert result.exit_code == 2 and f"{out} exists; pass --overwrite" in result.output
    with np.load(out) as npz:
        assert len(npz["scan_id"]) == len(N_SLICES)  # untouched
    result = run_cli(cache_path, "--format", "parquet", "--out", out, "--quiet", "--overwrite")
    assert result.exit_code == 2 and "it is a npz export, not parquet" in result.output
    result = run_cli(cache_path, "--format", "npz", "--out", out, "--quiet", "--overwrite", "--scans", "scan1")
    assert result.exit_code == 0, result.output
    with np.load(out) as npz:
        assert [s.decode() for s in npz["scan_id"]] == ["scan1"]
    # A stray manifest beside a file that is not its export does not make the file replaceable.
    manifest = json.loads(ex.manifest_path(out).read_text())
    ex.manifest_path(labels).write_text(json.dumps({**manifest, "file": "other.npz"}))
    result = run_cli(cache_path, "--format", "npz", "--out", labels, "--quiet", "--overwrite")
    assert result.exit_code == 2 and "it is not a drct export" in result.output
    assert labels.read_text().startswith("ID,Label")


def test_never_writes_inside_the_data_root(tmp_path):
    import h5py

    root = tmp_path / "dicom"
    (root / "sub").mkdir(parents=True)
    cache_path = make_cache(tmp_path / "features.h5")
    with h5py.File(cache_path, "r+") as f:
        f.attrs["data_root"] = str(root)
    for target in (root / "export.npz", root / "sub" / "x.npz", root / ".." / "dicom" / "y.npz"):
        result = run_cli(cache_path, "--format", "npz", "--out", target, "--quiet", "--overwrite")
        assert result.exit_code == 2 and "inside the data root" in result.output, result.output
    assert [p for p in root.rglob("*") if p.is_file()] == []
    assert run_cli(cache_path, "--format", "npz", "--out", tmp_path / "outside.npz", "--quiet").exit_code == 0


def test_scan_list_file_content_is_never_quoted(cache_path, tmp_path):
    """Issue 16, weak case: `--scans @FILE` of another file (a password file) quoted its first lines;
    now one id at most, truncated to 24 characters, control characters escaped; a binary, huge or
    unreadable FILE is one line naming the file only."""
    secret = tmp_path / "shadow"
    lines = [f"user{k}:$6$saltsalt$" + "h" * 60 + f"{k}:19000:0:99999:7:::" for k in range(5)]
    secret.write_text("\n".join(lines) + "\n")
    result = run_cli(cache_path, "--format", "npz", "--out", tmp_path / "x.npz", "--quiet", "--scans", f"@{secret}")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"5 scan id(s) not in {cache_path}: 'user0:$6$saltsalt$hhhhhh'... and 4 more" in result.output
    assert "hhhhhhh" * 2 not in result.output and not any(f"user{k}" in result.output for k in range(1, 5))
    result = run_cli(cache_path, "--format", "npz", "--out", tmp_path / "x.npz", "--quiet", "--scans", "scan1,a\x1bb\x00")
    assert "1 scan id(s) not in" in result.output and "'a\\x1bb\\x00'" in result.output
    assert "\x1b" not in result.output and "\x00" not in result.output
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe" + bytes(range(256)) * 4)
    result = run_cli(cache_path, "--format", "npz", "--out", tmp_path / "x.npz", "--quiet", "--scans", f"@{binary}")
    assert result.exit_code == 2 and f"scan id list {binary} is not UTF-8 text" in result.output
    assert "Traceback" not in result.output and "\x00" not in result.output
    big = tmp_path / "big"
    with open(big, "wb") as handle:
        handle.truncate((64 << 20) + 1)  # sparse: no disk used
    result = run_cli(cache_path, "--format", "npz", "--out", tmp_path / "x.npz", "--quiet", "--scans", f"@{big}")
    assert result.exit_code == 2 and "is larger than 64 MiB" in result.output
    assert not (tmp_path / "x.npz").exists()
