"""`drct predict`: DICOM folder -> features -> predictions.csv + reports; provenance refusal."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from cache.provenance import config_provenance
from pipeline.config import load_config
from pipeline.data.labels import RSNA_LABELS
from pipeline.features.encoder import load_encoder
from pipeline.heads.build import build_model
from pipeline.training.checkpoint import save_checkpoint
from stages.cli import main

OVERRIDES = {"extract.resolutions": [32, 64], "extract.weights": "random:0", "extract.batch_size": 8,
             "sampler.m": 6, "model.m_key": 3, "model.gru_hidden": 8, "model.fc_hidden": [16, 8]}


def _checkpoint(path, fold=0, folds=5, **provenance_changes):
    config = load_config(None, {**OVERRIDES, "train.folds": folds})
    provenance = {**config_provenance(config["extract"]), "weights_digest": load_encoder("random:0")[1]}
    provenance.update(provenance_changes)
    model = build_model(config, len(RSNA_LABELS))
    return save_checkpoint(path, model, config, provenance, RSNA_LABELS, fold=fold)


@pytest.fixture(scope="module")
def dicom_dir(tmp_path_factory):
    """Two new series (6 slices each, 32 px), not in z order by file name, no labels."""
    from dicom_fixtures import write_series

    root = tmp_path_factory.mktemp("new") / "dicom"
    write_series(root / "a", 6, size=32, series_uid="1.2.3.4.1", patient_id="PAT-A")
    write_series(root / "b", 6, size=32, series_uid="1.2.3.4.2", patient_id="PAT-B", seed=1)
    return root


def test_predict_writes_csv_and_reports(dicom_dir, tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["predict", str(dicom_dir), "--checkpoint", str(ckpt), "--out", str(out),
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    with open(out / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and [row["n_slices"] for row in rows] == ["6", "6"]
    assert list(rows[0]) == ["scan", "status", "source_folder", "study_uid", "n_slices", *RSNA_LABELS,
                             *(f"{n}_label" for n in RSNA_LABELS), "findings", "reason"]
    assert all(0.0 <= float(row[name]) <= 1.0 for row in rows for name in RSNA_LABELS)
    assert {row["source_folder"] for row in rows} == {"a", "b"} and all(row["status"] == "predicted" for row in rows)
    for row in rows:  # thresholded labels agree with the probabilities at the checkpoint's threshold (0.5)
        assert [int(row[f"{n}_label"]) for n in RSNA_LABELS] == [int(float(row[n]) >= 0.5) for n in RSNA_LABELS]
        assert row["findings"] == ";".join(n for n in RSNA_LABELS if float(row[n]) >= 0.5)
    assert not list(out.glob("*.lock")), "predict left a lock file behind"
    summary = json.loads((out / "reports" / "reports.json").read_text())
    assert len(summary["scans"]) == 2 and not summary["failed"]
    for name in ("PAT-A", "PAT-B"):
        assert name not in (out / "predictions.csv").read_text() and name not in (out / "reports" / "index.html").read_text()
    assert (out / "reports" / "index.html").is_file() and (out / "features.h5").is_file()
    # a rerun reuses the cache and gives the same predictions
    again = CliRunner().invoke(main, ["predict", str(dicom_dir), "--checkpoint", str(ckpt), "--out", str(out),
                                      "--device", "cpu", "--no-reports"])
    assert again.exit_code == 0, again.output
    with open(out / "predictions.csv") as handle:
        assert list(csv.DictReader(handle)) == rows


def test_predict_run_uses_the_fold_ensemble_and_lists_rejects(dicom_dir, tmp_path):
    """--run RUN_DIR: the mean of the fold models' probabilities; study UID and rejected files in the CSV."""
    import shutil

    import numpy as np
    import torch

    torch.manual_seed(1)
    run = tmp_path / "run"
    for fold in (0, 1):
        torch.manual_seed(fold + 10)
        _checkpoint(run / f"fold_{fold}" / "checkpoint.pt", fold=fold, folds=2)  # the two folds of a 2-fold run
    data = tmp_path / "dicom"
    shutil.copytree(dicom_dir, data)
    (data / "a" / "broken.dcm").write_bytes(b"not a dicom file")
    probs = {}
    for name, args in (("run", ["--run", str(run)]), ("f0", ["--checkpoint", str(run / "fold_0" / "checkpoint.pt")]),
                       ("f1", ["--checkpoint", str(run / "fold_1" / "checkpoint.pt")])):
        out = tmp_path / f"out_{name}"
        result = CliRunner().invoke(main, ["predict", str(data), *args, "--out", str(out), "--device", "cpu",
                                           "--no-reports", "--no-progress"])
        assert result.exit_code == 0, result.output
        with open(out / "predictions.csv") as handle:
            rows = list(csv.DictReader(handle))
        predicted = [r for r in rows if r["status"] == "predicted"]
        probs[name] = np.array([[float(r[n]) for n in RSNA_LABELS] for r in predicted])
        rejected = [r for r in rows if r["status"] == "rejected"]
        assert len(rejected) == 1 and rejected[0]["source_folder"] == "a" and rejected[0]["reason"].startswith("broken.dcm: ")
        assert {r["study_uid"] for r in predicted} and all(r["study_uid"] for r in predicted)
    assert not np.allclose(probs["f0"], probs["f1"], atol=1e-4)
    np.testing.assert_allclose(probs["run"], (probs["f0"] + probs["f1"]) / 2, atol=2e-6)
    meta = json.loads((tmp_path / "out_run" / "predictions.json").read_text())
    assert len(meta["checkpoints"]) == 2 and meta["ensemble"].startswith("mean")
    # a fold deleted (or never trained): the run is refused, naming it, unless --allow-partial
    shutil.rmtree(run / "fold_1")
    refused = CliRunner().invoke(main, ["predict", str(data), "--run", str(run), "--out", str(tmp_path / "o2"),
                                        "--device", "cpu", "--no-reports", "--no-progress"])
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "incomplete `drct train` run (fold checkpoints deleted): fold(s) 1 of 0, 1 missing" in refused.output
    assert not (tmp_path / "o2" / "features.h5").exists()
    partial = CliRunner().invoke(main, ["predict", str(data), "--run", str(run), "--allow-partial", "--out",
                                        str(tmp_path / "o3"), "--device", "cpu", "--no-reports", "--no-progress"])
    assert partial.exit_code == 0, partial.output
    assert json.loads((tmp_path / "o3" / "predictions.json").read_text())["checkpoints"] == \
        [str(run / "fold_0" / "checkpoint.pt")]


def test_predict_needs_run_or_checkpoint(dicom_dir, tmp_path):
    result = CliRunner().invoke(main, ["predict", str(dicom_dir), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--run RUN_DIR" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["predict", str(dicom_dir), "--run", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "fold_<k>/checkpoint.pt" in result.output


@pytest.mark.parametrize(
    "change, message",
    [({"weights_digest": "0" * 64}, "weights_digest"), ({"resolutions": [224, 512]}, "resolutions")],
)
def test_predict_refuses_mismatched_encoder(dicom_dir, tmp_path, change, message):
    ckpt = _checkpoint(tmp_path / "ckpt.pt", **change)
    result = CliRunner().invoke(main, ["predict", str(dicom_dir), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "another encoder or preprocessing" in result.output and message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o" / "features.h5").exists()


def test_predict_rejects_non_checkpoint(dicom_dir, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    result = CliRunner().invoke(main, ["predict", str(dicom_dir), "--checkpoint", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "not a readable DrCT checkpoint" in result.output


def test_ensemble_zooms_on_the_top_slices_of_the_mean_attention():
    """predict --run averages the folds' slice attention: the ensemble's aps_idx are the m_key
    highest positions of that mean (in z order), not fold 0's choice."""
    from stages.predict import ensemble_aps_idx

    attention = np.array([[0.1, 0.5, 0.05, 0.3, 0.05]])
    per_fold = np.array([[[0, 2]], [[1, 3]]])  # fold 0 chose 0 and 2
    np.testing.assert_array_equal(ensemble_aps_idx(attention, per_fold), [[1, 3]])
    drct1 = np.full((2, 1, 2), -1)
    np.testing.assert_array_equal(ensemble_aps_idx(attention, drct1), [[-1, -1]])


def test_predict_uses_the_runs_recorded_thresholds(dicom_dir, tmp_path):
    """RUN/thresholds.json (drct evaluate --threshold-from oof) sets each class's call; --threshold overrides it."""
    from pipeline.calibration import write_thresholds

    ckpt = _checkpoint(tmp_path / "run" / "fold_0" / "checkpoint.pt")
    thresholds = np.array([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])  # every probability is in (0, 1): calls 1, 0, 1, 0, ...
    write_thresholds(tmp_path / "run", RSNA_LABELS, thresholds)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["predict", str(dicom_dir), "--checkpoint", str(ckpt), "--out", str(out),
                                       "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    with open(out / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        assert [int(row[f"{n}_label"]) for n in RSNA_LABELS] == [1, 0, 1, 0, 1, 0]
    flagged = ", ".join(RSNA_LABELS[::2])  # the pages call findings as predictions.csv does
    assert (out / "reports" / "index.html").read_text().count(f"</a></td><td>{flagged}</td>") == 2
    for page in (out / "reports" / "scans").glob("*.html"):
        assert f"The model flags: {flagged}</p>" in page.read_text() and "thresholds.json" in page.read_text()
    assert json.loads((out / "predictions.json").read_text())["threshold"] == dict(zip(RSNA_LABELS, thresholds.tolist()))
    result = CliRunner().invoke(main, ["predict", str(dicom_dir), "--checkpoint", str(ckpt), "--out", str(out),
                                       "--device", "cpu", "--no-reports", "--no-progress", "--threshold", "0.5"])
    with open(out / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert all([int(r[f"{n}_label"]) for n in RSNA_LABELS] == [int(float(r[n]) >= 0.5) for n in RSNA_LABELS] for r in rows)
    (tmp_path / "run" / "thresholds.json").write_text('{"thresholds": {"any": 0.3}}')
    result = CliRunner().invoke(main, ["predict", str(dicom_dir), "--checkpoint", str(ckpt), "--out", str(out),
                                       "--device", "cpu", "--no-reports", "--no-progress"])
    assert result.exit_code == 2 and "not a thresholds file" in result.output


def test_predictions_list_decode_time_rejects(tmp_path):
    """Issue 16 item 12: slices and whole scans rejected while decoding (slope 0, NaN, 1e300: the
    cache's /rejects, not the index) are rows of predictions.csv with their reasons, named like
    the predicted scans (pseudonyms), beside the index-time rejects; a rerun on the reused cache too."""
    from bad_inputs import retag, series

    data = tmp_path / "dicom"
    series(data / "good", "1.3.1", n=3, seed=1)
    partial = series(data / "partial", "1.3.2", n=3, seed=2)
    retag(partial[1], RescaleSlope="0")  # one bad slice: the scan is kept with two
    for uid, name, slope in (("1.3.3", "zero", "0"), ("1.3.4", "nan", "NaN"), ("1.3.5", "huge", "1e300")):
        for path in series(data / name, uid, n=3, seed=3):
            retag(path, RescaleSlope=slope)  # every slice bad: the whole scan is rejected
    (data / "good" / "junk.dcm").write_text("not DICOM\n")
    ckpt = _checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "out"
    args = ["predict", str(data), "--checkpoint", str(ckpt), "--out", str(out), "--device", "cpu", "--no-reports",
            "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    with open(out / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    predicted = {r["source_folder"]: r["scan"] for r in rows if r["status"] == "predicted"}
    assert set(predicted) == {"good", "partial"} and all(s.startswith("scan-") for s in predicted.values())
    rejected = {(r["source_folder"], r["reason"].split(": ")[0]): r for r in rows if r["status"] == "rejected"}
    assert rejected[("good", "junk.dcm")]["reason"] == "junk.dcm: not a DICOM file (no DICM preamble and no image tags)"
    assert rejected[("partial", "im1.dcm")]["reason"] == \
        "im1.dcm: pixels not decodable: bad pixel scaling: RescaleSlope is 0 (every pixel would have the same value)"
    assert rejected[("partial", "im1.dcm")]["scan"] == predicted["partial"]
    why = {"zero": "RescaleSlope is 0", "nan": "RescaleSlope nan", "huge": "RescaleSlope 1e+300"}
    for folder, text in why.items():
        scan_row = rejected[(folder, "scan rejected")]
        assert scan_row["reason"] == "scan rejected: none of its 3 slices could be decoded"
        assert scan_row["scan"].startswith("scan-") and scan_row["scan"] not in predicted.values()
        for k in range(3):
            row = rejected[(folder, f"im{k}.dcm")]
            assert row["scan"] == scan_row["scan"] and text in row["reason"], row
            assert row["reason"].startswith(f"im{k}.dcm: pixels not decodable: bad pixel scaling: ")
    assert len(rejected) == 1 + 1 + 3 * 4 and len(rows) == 2 + len(rejected)
    assert "(14 files or scans rejected)" in result.output
    again = CliRunner().invoke(main, args)  # the cache is up to date: its /rejects still give the rows
    assert again.exit_code == 0, again.output
    with open(out / "predictions.csv") as handle:
        assert list(csv.DictReader(handle)) == rows
