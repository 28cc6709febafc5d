"""Issue 11: the generated bad-input corpus (tests/bad_inputs.py) goes through indexing and one
extraction; every hostile case ends as a reject with its reason, or as a kept scan, never as a
crash, NaN vectors or a silently garbled image."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest
from bad_inputs import reject_rows

from cache.store import FeatureCache
from cache.verify import verify_cache
from cache.writer import rejects_path
from pipeline.config import load_config
from pipeline.data.dicom_io import SliceError, clean_text, read_hu
from pipeline.data.index import build_scan_index
from pipeline.features.extraction import run_extraction

RESOLUTIONS = [32, 48]


def config_for(out: Path, data: Path, **dataset) -> dict:
    overrides = {
        "dataset.data": str(data), "dataset.layout": "folder", "extract.out": str(out),
        "dataset.keep_ids": True,  # the cases are found by their ids (pseudonyms: tests/test_phi.py)
        "extract.resolutions": RESOLUTIONS, "extract.weights": "random:0", "extract.workers": 0,
        "extract.scans_per_commit": 3, "extract.batch_size": 8, "extract.precision": "fp32",
        "extract.device": "cpu",
    }
    overrides.update({f"dataset.{k}": v for k, v in dataset.items()})
    return load_config(None, overrides)


def extract(out: Path, data: Path, **dataset):
    config = config_for(out, data, **dataset)
    index = build_scan_index(data, "folder", progress=False, allow_modalities=config["dataset"]["allow_modalities"])
    return run_extraction(index, config, progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def corpus(bad_corpus) -> tuple[Path, dict[str, str]]:
    return bad_corpus  # tests/conftest.py: one corpus and one extraction for this file and test_hostile_input.py


@pytest.fixture(scope="module")
def extracted(bad_corpus_cache) -> Path:
    return bad_corpus_cache


def reason_of(rows: list[dict], path: str) -> str:
    found = [row["reason"] for row in rows if row["path"] == str(path)]
    assert found, f"{path} is not in the rejects"
    return found[0]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("slope_nan", "bad pixel scaling: RescaleSlope nan"),
        ("slope_inf", "bad pixel scaling: RescaleSlope inf"),
        ("slope_1e300", "outside the CT range"),
        ("slope_zero", "RescaleSlope is 0"),
        ("rows_mismatch", "does not match Rows x Columns"),
        ("truncated", "does not match Rows x Columns"),
        ("no_pixels", "no pixel data"),
    ],
)
def test_bad_pixels_raise_slice_error(corpus, name, reason):
    _, case = corpus
    with pytest.raises(SliceError, match=reason):
        read_hu(case[name])


def test_corpus_extracts_with_every_bad_case_rejected(corpus, extracted):
    _root, case = corpus
    rows = reject_rows(extracted)
    for name, reason in [
        ("slope_nan", "pixels not decodable: bad pixel scaling"),
        ("slope_inf", "bad pixel scaling"),
        ("slope_1e300", "outside the CT range"),
        ("slope_zero", "RescaleSlope is 0"),
        ("rows_mismatch", "does not match Rows x Columns"),
        ("truncated", "does not match Rows x Columns"),
        ("no_pixels", "no pixel data"),
        ("rgb", "not a greyscale image"),
        ("duplicate_position", "duplicate slice position"),
        ("zero", "not a DICOM file"),
        ("text", "not a DICOM file"),
        ("random", "not a DICOM file"),
        ("image", "not a DICOM file"),
        ("symlink_loop", "cannot read file"),
    ]:
        assert reason in reason_of(rows, case[name]), name
    mr = [row for row in rows if "modality MR" in row["reason"]]
    assert len(mr) == 3 and all("dataset.allow_modalities" in row["reason"] for row in mr)
    with FeatureCache(extracted) as cache:
        kept = dict(zip(cache.scan_ids, cache.table.n_slices))
        features = cache.load_all(RESOLUTIONS[0], np.float32)
        assert np.isfinite(features).all()
    assert case["mr_scan"] not in kept
    assert kept[case["scaling_scan"]] == 2 and kept[case["odd_scan"]] == 3 and kept[case["good"]] == 4
    for name in ("nul_scan", "long_scan", "non_utf8_scan", "unicode_scan", "escape_scan", "formula_scan"):
        assert kept[case[name]] == 3, name
    assert verify_cache(extracted).ok


def test_odd_tag_values_are_stored_clean(corpus, extracted):
    _, _case = corpus
    with h5py.File(extracted, "r") as f:
        patients = [p.decode() for p in f["scans/patient_id"][:]]
    assert all("\x00" not in p and len(p) <= 256 for p in patients)
    assert clean_text("AB\x00CD") == "ABCD"
    assert clean_text(b"caf\xe9\xff") == "caf\ufffd\ufffd"
    assert clean_text("x" * 5000).endswith("...") and len(clean_text("x" * 5000)) == 256
    assert clean_text("a\udcffb") == "a?b"


def test_mr_is_extracted_when_allowed(corpus, tmp_path):
    root, _case = corpus
    mr_only = tmp_path / "mr"
    mr_only.symlink_to(Path(root) / "mr", target_is_directory=True)
    result = extract(tmp_path / "mr.h5", mr_only, allow_modalities=["CT", "MR"])
    assert result.n_scans == 1
    with pytest.raises(Exception, match="no scans found"):
        extract(tmp_path / "mr_refused.h5", mr_only)


def test_csv_cells_are_neutralised(corpus, extracted, tmp_path):
    from cache import csv_safe

    for text in ("=1+1", "+A1", "-cmd", "@SUM(A1)", "\tx", "\rx", '=HYPERLINK("http://evil","x")'):
        assert csv_safe.safe_cell(text) == "'" + text
    for value in ("-0.5", "+3", "1e-3", "plain", -2.0, 7, "", "a=b"):
        assert csv_safe.safe_cell(value) == value
    assert csv_safe.safe_cell("-inf") == "'-inf"
    path = tmp_path / "t.csv"
    with open(path, "w", newline="") as handle:
        csv_safe.writer(handle).writerow(["=x", "-1", "ok"])
        csv_safe.dict_writer(handle, fieldnames=["a"]).writerow({"a": "@y"})
    assert path.read_text().splitlines() == ["'=x,-1,ok", "'@y"]
    # The rejects list of the corpus holds file names from a hostile tree: no cell starts a formula.
    with open(rejects_path(extracted), newline="") as handle:
        for row in csv.reader(handle):
            assert not any(cell.startswith(("=", "+", "@", "\t", "\r")) for cell in row)


# -- 8. errors, not tracebacks ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("extract:\n  resolutions: abc\n", "config key 'extract.resolutions': Input should be a valid list"),
        ("train:\n  batch_size: 0\n", "config key 'train.batch_size': Input should be greater than or equal to 1"),
        ("model:\n  m_key: 1.5\n", "config key 'model.m_key': Input should be a valid integer"),
        ("extract:\n  windows: [[40, 0]]\n", "the width must be positive"),
        ("dataset:\n  layout: dicomdir\n", "config key 'dataset.layout'"),
    ],
)
def test_bad_config_values_are_refused_naming_the_key(tmp_path, yaml_text, message):
    from click.testing import CliRunner

    from stages.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(yaml_text)
    for command in (["extract", "--config", str(config), "--data", str(tmp_path)], ["train", "--config", str(config)]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["train", "--set", "model.m_key=1.5"])
    assert result.exit_code == 2 and "model.m_key" in result.output


def tampered_run(run_dir: Path, n: int = 3) -> Path:
    import json

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({"label_names": ["a", "b"], "model": "drct2"}))
    np.savez(run_dir / "oof.npz", scan_id=np.array(["x", {"evil": 1}, "z"], dtype=object),
             fold=np.zeros(n, np.int64), labels=np.zeros((n, 2), np.float32), prob=np.zeros((n, 2), np.float32))
    return run_dir


def test_tampered_oof_gives_one_clear_line(extracted, tmp_path):
    from click.testing import CliRunner

    from pipeline.oof import OofError, read_oof
    from stages.cli import main

    run = tampered_run(tmp_path / "run")
    with pytest.raises(OofError, match="object \\(pickled\\) arrays, which are refused"):
        read_oof(run / "oof.npz")
    for command in (["evaluate", str(run)], ["report", str(run), "--out", str(tmp_path / "r"), "--cache", str(extracted)],
                    ["interpret", str(run), "--cache", str(extracted), "--out", str(tmp_path / "i")]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 2, (command, result.output)  # a refusal (StageError)
        assert "object (pickled) arrays, which are refused" in result.output, (command, result.output)
        assert "Traceback" not in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
    (run / "oof.npz").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(OofError, match="not a readable oof.npz"):
        read_oof(run / "oof.npz")
    np.savez(run / "oof.npz", scan_id=np.array(["x"]), fold=np.zeros(1, np.int64),
             labels=np.zeros((1, 2), np.float32), prob=np.full((1, 2), np.nan, np.float32))
    with pytest.raises(OofError, match="not probabilities"):
        read_oof(run / "oof.npz")


def test_refused_checkpoint_is_one_short_line(tmp_path):
    import torch
    from torch import nn

    from pipeline.training.checkpoint import CheckpointError, load_checkpoint

    torch.save({"state_dict": nn.Linear(2, 2), "config": {}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "evil.pt")
    message = str(info.value)
    assert "refused" in message and "weights_only" not in message and "\n" not in message and len(message) < 300
