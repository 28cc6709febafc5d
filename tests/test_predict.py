"""`drct predict`: DICOM folder -> features -> predictions.csv + reports; provenance refusal."""

from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from pipeline.config import load_config
from pipeline.data.labels import RSNA_LABELS
from pipeline.features.encoder import load_encoder
from pipeline.features.provenance import config_provenance
from pipeline.heads.build import build_model
from pipeline.training.checkpoint import save_checkpoint
from stages.cli import main

OVERRIDES = {"extract.resolutions": [32, 64], "extract.weights": "random:0", "extract.batch_size": 8,
             "sampler.m": 6, "model.m_key": 3, "model.gru_hidden": 8, "model.fc_hidden": [16, 8]}


def _checkpoint(path, **provenance_changes):
    config = load_config(None, OVERRIDES)
    provenance = {**config_provenance(config["extract"]), "weights_digest": load_encoder("random:0")[1]}
    provenance.update(provenance_changes)
    model = build_model(config, len(RSNA_LABELS))
    return save_checkpoint(path, model, config, provenance, RSNA_LABELS, fold=0)


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
    assert len(rows) == 2 and [row["n_slices"] for row in rows] == ["6", "6"] and list(rows[0]) == ["scan", "n_slices", *RSNA_LABELS]
    assert all(0.0 <= float(row[name]) <= 1.0 for row in rows for name in RSNA_LABELS)
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


@pytest.mark.parametrize(
    "change, message",
    [({"weights_digest": "0" * 64}, "weights_digest"), ({"resolutions": [224, 512]}, "resolutions")],
)
def test_predict_refuses_mismatched_encoder(dicom_dir, tmp_path, change, message):
    ckpt = _checkpoint(tmp_path / "ckpt.pt", **change)
    result = CliRunner().invoke(main, ["predict", str(dicom_dir), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert "another encoder or preprocessing" in result.output and message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o" / "features.h5").exists()


def test_predict_rejects_non_checkpoint(dicom_dir, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    result = CliRunner().invoke(main, ["predict", str(dicom_dir), "--checkpoint", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "not a readable DrCT checkpoint" in result.output
