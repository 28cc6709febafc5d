"""The run summary of `drct extract` and `drct train` (issue 17, item 6): its counts equal an
independent count (the tree as built, the cache, the rejects file, oof.npz and the fold
histories), summary.json parses and names existing outputs, the printed lines carry the figures,
and a run that stops with an error leaves no summary."""

from __future__ import annotations

import csv
import json
import os
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from bad_inputs import pixels, series
from click.testing import CliRunner
from dicom_fixtures import write_slice

from cache.provenance import config_provenance
from cache.store import FeatureCache, write_cache
from cache.writer import rejects_path
from pipeline.config import load_config
from pipeline.run_summary import SUMMARY_FORMAT, reason_key, report_train, start, summary_path
from pipeline.synthetic.synthetic import synthetic_features
from pipeline.training.interrupt import TrainingInterrupted
from pipeline.training.trainer import run_training
from stages.cli import main

EXTRACT = ["extract", "--layout", "folder", "--workers", "0", "--resolutions", "32,48", "--weights", "random:0",
           "--keep-ids", "--no-progress", "--precision", "fp32", "--device", "cpu", "--batch-size", "8"]
SMALL = {"sampler.m": 4, "model.m_key": 2, "model.gru_hidden": 4, "model.aps_gru_hidden": 4, "model.aps_fc": 8,
         "model.fc_hidden": [8], "model.fusion_dim": 8, "train.batch_size": 8, "train.epochs": 1,
         "train.folds": 2, "train.threads": 1}
SETS = [f"--set={k}={json.dumps(v)}" for k, v in SMALL.items()]


def test_reason_key():
    assert reason_key("pixels not decodable: ValueError: buffer too small") == "pixels not decodable"
    assert reason_key("scan rejected: none of its 3 slices could be decoded") == "scan rejected"
    assert reason_key("duplicate slice position (5.000 mm, also im2.dcm)") == "duplicate slice position"
    assert reason_key("series 1.2.3 left out: bone kernel") == "series # left out"
    assert reason_key("image size 0 x 16 is empty") == "image size # x # is empty"
    assert reason_key("localizer/scout image") == "localizer/scout image"
    assert reason_key("note: 2 of 5 slices have no label rows; kept") == "note"


# -- extract ----------------------------------------------------------------------------------
def write_tree(root: Path) -> Path:
    """Four series: A (3 slices + a localizer), B (3), C (3, one with its pixels cut short),
    D (2, both cut short: the whole scan is rejected)."""
    series(root / "A", "1.9.1", n=3, seed=1, patient_id="PA")
    write_slice(root / "A" / "scout.dcm", pixels(9), ipp=(0.0, 0.0, 50.0), instance_number=9, series_uid="1.9.1",
                study_uid="1.9.1.0", patient_id="PA", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    series(root / "B", "1.9.2", n=3, seed=2, patient_id="PB")
    series(root / "C", "1.9.3", n=3, seed=3, patient_id="PC")
    _cut(root / "C" / "im1.dcm")
    series(root / "D", "1.9.4", n=2, seed=4, patient_id="PD")
    for path in (root / "D").glob("*.dcm"):
        _cut(path)
    return root


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-200])  # header intact, pixels cut short


def _extract(data: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, [*EXTRACT, "--data", str(data), "--out", str(out), *extra])


def _file_reasons(out: Path) -> Counter:
    """Rejects of the file by its reason's text before the first colon (this test's own rule)."""
    with open(rejects_path(out), newline="") as handle:
        return Counter(row["reason"].split(":")[0] for row in csv.DictReader(handle))


def test_extract_summary_counts_resume_and_failure(tmp_path):
    data = write_tree(tmp_path / "dicom")
    out = tmp_path / "features" / "features.h5"
    result = _extract(data, out)
    assert result.exit_code == 0, result.output
    path = summary_path(out)
    assert path == tmp_path / "features" / "features.summary.json"
    summary = json.loads(path.read_text())
    assert summary["format"] == SUMMARY_FORMAT and summary["command"] == "extract" and summary["status"] == "finished"
    with FeatureCache(out) as cache:
        in_cache = len(cache)
        n_slices = int(cache.table.n_slices.sum())
    assert in_cache == 3 and n_slices == 3 + 3 + 2                       # A, B and C kept; C lost one slice
    assert summary["scans"] == {"done": 3, "skipped": 0, "rejected": 1, "in_cache": 3}
    assert summary["details"]["slices_encoded"] == n_slices
    # by reason: as built, and as the rejects file says
    expected = {"localizer/scout image": 1, "pixels not decodable": 1 + 2, "scan rejected": 1}
    assert summary["rejected_by_reason"] == expected == dict(_file_reasons(out))
    assert summary["details"]["reject_rows"] == 5 and summary["notes"] == 0
    assert summary["seconds"] > 0
    assert summary["rates"]["scans/s"] == pytest.approx(3 / summary["seconds"], rel=1e-2)
    assert summary["rates"]["slices/s"] == pytest.approx(8 / summary["seconds"], rel=1e-2)
    assert set(summary["outputs"]) == {"cache", "rejects file", "summary"}
    assert all(Path(p).is_file() for p in summary["outputs"].values())
    # the printed lines carry the same figures
    printed = result.output[result.output.index("drct extract: summary"):].splitlines()
    assert "3 done, 0 skipped, 1 rejected (3 in cache)" in printed[1]
    assert any(line.strip().startswith("rejects") and line.endswith("3  pixels not decodable") for line in printed)
    assert any("1  localizer/scout image" in line for line in printed)
    assert any(line.strip().startswith("time") and f"{summary['seconds']:.1f} s" in line and "slices/s" in line
               for line in printed)
    assert any(line.strip().startswith("cache") and line.endswith(str(out)) for line in printed)

    # a new scan: the resumed run encodes it alone; the others (D's rejection too) are skipped
    series(data / "E", "1.9.5", n=2, seed=5, patient_id="PE")
    result = _extract(data, out)
    assert result.exit_code == 0, result.output
    summary = json.loads(path.read_text())
    assert summary["scans"] == {"done": 1, "skipped": 4, "rejected": 0, "in_cache": 4}
    assert summary["details"]["slices_encoded"] == 2
    assert summary["rejected_by_reason"] == expected == dict(_file_reasons(out))   # the whole cache's file
    assert "1 done, 4 skipped, 0 rejected (4 in cache)" in result.output

    result = _extract(data, out)                                                  # nothing left to do
    assert result.exit_code == 0, result.output
    summary = json.loads(path.read_text())
    assert summary["status"] == "up to date" and summary["scans"]["done"] == 0 and summary["scans"]["skipped"] == 5

    # stopped by an error (other weights than the cache's): no summary is left to claim success
    result = _extract(data, out, "--weights", "random:1")
    assert result.exit_code == 2 and "weights" in result.output
    assert not path.exists() and "drct extract: summary" not in result.output


# -- train ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache_path(tmp_path_factory) -> Path:
    """14 synthetic scans, the labels of two unknown (NaN)."""
    config = load_config(None, SMALL)
    arrays = synthetic_features(n_scans=14, n_classes=2, slices=(4, 8), scans_per_patient=1, seed=0,
                                resolutions=tuple(config["extract"]["resolutions"]))
    arrays["scan_labels"][[3, 9]] = np.nan
    attrs = {**config_provenance(config["extract"]), "weights_digest": "synthetic", "label_names": ["a", "b"]}
    return write_cache(tmp_path_factory.mktemp("cache") / "features.h5", attrs=attrs, **arrays)


def _history_samples(run: Path, folds) -> int:
    return sum(r["samples"] for f in folds for r in json.loads((run / f"fold_{f}" / "history.json").read_text()))


def test_train_summary_counts_outputs_and_quiet(cache_path, tmp_path):
    run, live = tmp_path / "run", tmp_path / "live"
    result = CliRunner().invoke(main, ["train", "--cache", str(cache_path), "--out", str(run), "--live", str(live),
                                       "--no-progress", *SETS])
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["format"] == SUMMARY_FORMAT and summary["command"] == "train"
    oof = np.load(run / "oof.npz")
    with FeatureCache(cache_path) as cache:
        unknown = int(np.isnan(cache.table.labels).any(axis=1).sum())
        in_cache = len(cache)
    assert unknown == 2 and len(oof["fold"]) == 12
    assert summary["scans"] == {"done": 12, "skipped": 0, "rejected": unknown, "in_cache": in_cache}
    assert summary["rejected_by_reason"] == {"unknown label": 2}
    assert summary["details"]["folds"] == {"run": 2, "done": 2, "skipped": 0, "trained": [0, 1], "kept": []}
    samples = _history_samples(run, [0, 1])
    assert samples > 0 and summary["details"]["samples"] == samples
    assert summary["rates"]["samples/s"] == pytest.approx(samples / summary["seconds"], rel=1e-2)
    assert summary["rates"]["folds/s"] == pytest.approx(2 / summary["seconds"], rel=1e-2)
    assert all(Path(p).exists() for p in summary["outputs"].values()), summary["outputs"]
    assert {"run.json", "oof", "model card", "fold 0", "fold 1", "live", "summary"} <= set(summary["outputs"])
    printed = result.output[result.output.index("drct train: summary"):]
    assert "12 done, 0 skipped, 2 rejected (14 in cache)" in printed
    assert "2 trained, 0 kept from the interrupted run, of 2" in printed and "2  unknown label" in printed
    assert f"{summary['seconds']:.1f} s" in printed and str(run / "fold_1" / "checkpoint.pt") in printed

    # --quiet: nothing printed, the file still written
    quiet = CliRunner().invoke(main, ["train", "--cache", str(cache_path), "--out", str(tmp_path / "q"), "--quiet",
                                      "--fold", "1", *SETS])
    assert quiet.exit_code == 0, quiet.output
    assert "drct train: summary" not in quiet.output
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert summary["scans"]["done"] == int((np.load(tmp_path / "q" / "oof.npz")["fold"] == 1).sum())
    assert summary["details"]["folds"]["trained"] == [1]


def test_train_summary_of_a_resumed_run_and_none_after_a_stop(cache_path, tmp_path):
    run = tmp_path / "run"
    config = load_config(None, SMALL)
    report_train(run_training(config, cache_path, run, progress=False, log=lambda s: None),
                 cache_path, run, start(run), None)
    assert (run / "summary.json").is_file()

    def interrupt(fold, epoch, record):
        if fold == 1:
            os.kill(os.getpid(), signal.SIGINT)

    other = load_config(None, {**SMALL, "train.seed": 5})      # another run into the same folder, stopped
    with pytest.raises(TrainingInterrupted):
        run_training(other, cache_path, run, progress=False, log=lambda s: None, on_epoch=interrupt)
    assert not (run / "summary.json").exists()                 # the old run's summary went with its files

    started = start(run)
    summary = report_train(run_training(other, cache_path, run, progress=False, log=lambda s: None),
                           cache_path, run, started, None).to_dict()
    assert json.loads((run / "summary.json").read_text())["scans"] == summary["scans"]
    fold = np.load(run / "oof.npz")["fold"]
    assert summary["details"]["folds"] == {"run": 2, "done": 1, "skipped": 1, "trained": [1], "kept": [0]}
    assert summary["scans"]["done"] == int((fold == 1).sum()) and summary["scans"]["skipped"] == int((fold == 0).sum())
    assert summary["details"]["samples"] == _history_samples(run, [1])
