"""Issue 11, item 6: a phantom whose DICOM carry PatientName, PatientID and PatientBirthDate
goes through extract, train, evaluate, interpret, report, predict and export; no output holds
any of the three unless --keep-ids (ids) or --show-phi (reports) asks for them. Outputs are
searched as text, as UTF-16/32 bytes (numpy unicode arrays), and parsed (HDF5, npz, Parquet)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pydicom
import pydicom.config
import pytest
from click.testing import CliRunner

from pipeline.pseudonym import KEY_NAME, key_check, load_or_create_key, pseudonym
from stages.cli import main

PHI_VALUES = ("Doe^Jane", "MRN-4711", "19610203")
TINY = ["--set", "sampler.m=6", "--set", "model.m_key=3", "--set", "model.gru_hidden=8",
        "--set", "model.fc_hidden=[16, 8]", "--set", "model.aps_fc=16", "--set", "model.aps_gru_hidden=8",
        "--set", "model.fusion_dim=16", "--set", "extract.resolutions=[32, 48]", "--set", "extract.weights=random:0",
        "--set", "train.batch_size=4", "--set", "train.device=cpu"]


def run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, f"drct {' '.join(args)}:\n{result.output}"
    return result.output


def texts_of(path: Path) -> list[str]:
    """Everything a file says, as strings (parsed where a format hides text from a byte search)."""
    if path.suffix == ".png":
        return []
    found = []
    if path.suffix in (".h5", ".hdf5"):
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: found.append(str(obj[()].tolist())) if isinstance(obj, h5py.Dataset) else None)
            f.visititems(lambda name, obj: found.extend(str(v) for v in obj.attrs.values()))
            found.extend(str(v) for v in f.attrs.values())
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            for name in npz.files:   # arrays, and the manifest.json member (bytes)
                value = npz[name]
                found.append(str(value.tolist()) if hasattr(value, "tolist") else value.decode("utf-8", "ignore"))
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        found.append(str(table.to_pylist()))
        found.append(str(table.schema.metadata))
    data = path.read_bytes()
    for encoding in ("utf-8", "utf-16-le", "utf-32-le"):
        found.append(data.decode(encoding, errors="ignore"))
    return found


def leaks(root: Path) -> dict[str, list[str]]:
    hits: dict[str, list[str]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        texts = texts_of(path)
        found = [value for value in PHI_VALUES if any(value in text for text in texts)]
        if found:
            hits[str(path.relative_to(root))] = found
    return hits


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """A 4-scan RSNA-layout phantom at 32 px whose patients have a name, an MRN and a birth date;
    ``new/`` links 8 slices of one series (the "new scan" predict reads)."""
    root = tmp_path_factory.mktemp("phi") / "data"
    run("phantom", str(root), "--layout", "rsna", "--scans", "4", "--seed", "3", "--size", "32", "--no-progress")
    patients: dict[str, int] = {}
    series_of: dict[str, str] = {}
    with pydicom.config.disable_value_validation():   # RSNA-style "ID_..." UIDs are invalid UI values
        for path in sorted((root / "stage_2_train").glob("*.dcm")):
            ds = pydicom.dcmread(path)
            k = patients.setdefault(str(ds.PatientID), len(patients))
            ds.PatientID = f"MRN-4711-{k}"
            ds.PatientName = f"Doe^Jane{k}"
            ds.PatientBirthDate = "19610203"
            ds.save_as(path)
            if len(list((root.parent / "new").glob("*"))) < 8 and str(ds.SeriesInstanceUID) == series_of.setdefault(
                "first", str(ds.SeriesInstanceUID)
            ):
                (root.parent / "new").mkdir(exist_ok=True)
                (root.parent / "new" / path.name).symlink_to(path)
    return root


@pytest.mark.slow
def test_no_phi_in_any_output(phantom, tmp_path):
    out = tmp_path / "out"
    cache = out / "features" / "features.h5"
    run("extract", "--data", str(phantom), "--layout", "rsna", "--out", str(cache), "--resolutions", "32,48",
        "--weights", "random:0", "--workers", "0", "--batch-size", "16", "--device", "cpu", "--no-progress")
    run_dir = out / "run"
    run("train", "--cache", str(cache), "--out", str(run_dir), "--folds", "2", "--epochs", "1", "--quiet", *TINY)
    run("evaluate", str(run_dir))
    run("interpret", str(run_dir), "--out", str(out / "interpret"))
    with np.load(run_dir / "oof.npz") as oof:
        two = [str(s) for s in oof["scan_id"][:2]]
    run("report", str(run_dir), "--out", str(out / "reports"), "--scan", two[0], "--scan", two[1])
    run("predict", str(phantom.parent / "new"), "--checkpoint", str(run_dir / "fold_0" / "checkpoint.pt"),
        "--out", str(out / "predict"), "--device", "cpu", "--no-reports")
    for fmt in ("npz", "parquet", "h5"):
        run("export", str(cache), "--format", fmt, "--out", str(out / "exports" / f"all.{fmt}"), "--quiet")
    produced = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    for expected in ("features/features.h5", "run/oof.npz", "run/metrics.json", "reports/reports.json",
                     "predict/predictions.csv", "exports/all.npz.manifest.json", "exports/all.parquet"):
        assert expected in produced
    assert leaks(out) == {}

    # The ids are keyed pseudonyms; the key stays beside the data and is in no output.
    key = load_or_create_key(phantom / KEY_NAME)
    with h5py.File(cache, "r") as f:
        patients = {p.decode() for p in f["scans/patient_id"][:]}
        assert f.attrs["ids"] == "pseudonymised" and f.attrs["id_key"] == key_check(key)
    assert patients == {pseudonym(key, "patient", f"MRN-4711-{k}") for k in range(len(patients))}
    assert not any(key.hex() in text for p in out.rglob("*") if p.is_file() for text in texts_of(p))

    # Positive controls: the search finds them when they are asked for.
    kept = tmp_path / "kept.h5"
    run("extract", "--data", str(phantom.parent / "new"), "--layout", "folder", "--out", str(kept), "--resolutions", "32,48",
        "--weights", "random:0", "--workers", "0", "--device", "cpu", "--no-progress", "--keep-ids")
    assert leaks(tmp_path).get("kept.h5") == ["MRN-4711"]
    run("report", str(run_dir), "--out", str(tmp_path / "phi_reports"), "--show-phi", "--scan", two[0])
    shown = {value for hits in leaks(tmp_path / "phi_reports").values() for value in hits}
    assert {"19610203", "MRN-4711"} <= shown


def test_resume_refuses_another_id_mode_or_key(tmp_path):
    from cache.writer import PartsWriter, ResumeRefused

    manifest = {"provenance": {}, "label_names": [], "layout": "folder", "data_root": "/", "n_scans": 0,
                "ids": "pseudonymised", "id_key": "a" * 16}
    with PartsWriter(tmp_path / "f.h5", manifest):
        pass
    with pytest.raises(ResumeRefused, match="ids: existing has 'pseudonymised', this run has 'kept'"):
        PartsWriter(tmp_path / "f.h5", {**manifest, "ids": "kept", "id_key": ""}).open()
    with pytest.raises(ResumeRefused, match="id_key"):
        PartsWriter(tmp_path / "f.h5", {**manifest, "id_key": "b" * 16}).open()


def test_pseudonyms_are_keyed_stable_and_unguessable(tmp_path):
    key = load_or_create_key(tmp_path / "k")
    assert load_or_create_key(tmp_path / "k") == key and oct((tmp_path / "k").stat().st_mode)[-3:] == "600"
    assert pseudonym(key, "patient", "MRN-1") == pseudonym(key, "patient", "MRN-1") != pseudonym(key, "patient", "MRN-2")
    other = load_or_create_key(tmp_path / "other")
    assert pseudonym(other, "patient", "MRN-1") != pseudonym(key, "patient", "MRN-1")
    assert pseudonym(key, "patient", "") == "" and pseudonym(key, "scan", "x").startswith("scan-")
    (tmp_path / "bad").write_text("short")
    from pipeline.pseudonym import PseudonymError

    with pytest.raises(PseudonymError, match="not a pseudonym key"):
        load_or_create_key(tmp_path / "bad")
