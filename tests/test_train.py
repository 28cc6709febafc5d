"""`drct train` / `drct evaluate` on small synthetic caches: run directory format, provenance
refusal, checkpoints, ablation options, and that the heads learn a planted signal."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from cache.store import FeatureCache
from pipeline.config import load_config
from pipeline.synthetic.synthetic import write_synthetic_cache
from pipeline.training.checkpoint import load_model
from pipeline.training.dataset import CachedFeatures
from pipeline.training.interrupt import TrainingInterrupted
from pipeline.training.trainer import predict_scans, run_training
from stages.cli import main

torch.set_num_threads(1)
NAMES = ["any", "bleed", "fracture"]
SMALL = {
    "sampler.m": 8, "model.m_key": 4, "model.gru_hidden": 8, "model.aps_gru_hidden": 8, "model.aps_fc": 16,
    "model.fc_hidden": [16, 12], "model.fusion_dim": 16, "train.batch_size": 16, "train.epochs": 2,
    "train.folds": 3, "train.threads": 1,
}
SETS = [f"--set={k}={json.dumps(v)}" for k, v in SMALL.items() if not k.startswith("train.epochs")]


def small_config(**extra):
    return load_config(None, {**SMALL, **extra})


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "features.h5"
    return write_synthetic_cache(path, small_config(), NAMES, n_scans=45, slices=(5, 30), scans_per_patient=2, seed=0)


@pytest.fixture(scope="module")
def run_dirs(cache_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    runner = CliRunner()
    dirs = {}
    for model in ("drct2", "drct1"):
        out = root / model
        result = runner.invoke(main, ["train", "--cache", str(cache_path), "--out", str(out), "--model", model,
                                      "--epochs", "2", "--quiet", *SETS])
        assert result.exit_code == 0, result.output
        dirs[model] = out
    return dirs


def test_run_directory_format(run_dirs, cache_path):
    out = run_dirs["drct2"]
    info = json.loads((out / "run.json").read_text())
    assert info["model"] == "drct2" and info["folds"] == 3 and info["folds_run"] == [0, 1, 2]
    assert info["label_names"] == NAMES and info["resolutions"] == {"primary": 224, "aps": 512}
    assert info["provenance"]["aps_source"] == "upsampled" and info["weights_digest"] == "synthetic"
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["sampler"]["m"] == 8 and config["model"]["m_key"] == 4
    for k in range(3):
        history = json.loads((out / f"fold_{k}" / "history.json").read_text())
        assert [h["epoch"] for h in history] == [1, 2] and all("val_macro_f1" in h and "loss" in h for h in history)
    oof = np.load(out / "oof.npz", allow_pickle=False)
    n = 45
    expected = {"scan_id": (n,), "patient_id": (n,), "fold": (n,), "labels": (n, 3), "prob": (n, 3),
                "prob_primary": (n, 3), "prob_aps": (n, 3), "sample_idx": (n, 8), "slice_attention": (n, 8),
                "feature_attention": (n, 8, 512), "aps_idx": (n, 4)}
    for key, shape in expected.items():
        assert oof[key].shape == shape, key
    assert oof["feature_attention"].dtype == np.float16 and oof["slice_attention"].dtype == np.float32
    cache = FeatureCache(cache_path)
    assert list(oof["scan_id"]) == list(cache.table.scan_id)
    np.testing.assert_array_equal(oof["labels"], cache.table.labels)
    # no patient in two folds, APS positions in z order within the m sampled slices
    for p in set(oof["patient_id"]):
        assert len(set(oof["fold"][oof["patient_id"] == p])) == 1
    assert (np.diff(oof["aps_idx"], axis=1) > 0).all() and oof["aps_idx"].max() < 8
    np.testing.assert_allclose(oof["slice_attention"].sum(1), 1, rtol=1e-5)
    assert (oof["sample_idx"] < cache.table.n_slices[:, None]).all()


def test_checkpoint_reloads_with_weights_only_and_reproduces_oof(run_dirs, cache_path):
    out = run_dirs["drct2"]
    payload = torch.load(out / "fold_1" / "checkpoint.pt", weights_only=True)
    assert set(payload) >= {"state_dict", "config", "provenance", "label_names", "fold"} and payload["fold"] == 1
    model, _config, meta = load_model(out / "fold_1" / "checkpoint.pt")
    assert meta["label_names"] == NAMES and not model.training
    oof = np.load(out / "oof.npz")
    cache = FeatureCache(cache_path)
    data = CachedFeatures.from_cache(cache, 224, 512)
    scans = np.flatnonzero(oof["fold"] == 1)
    preds = predict_scans(model, data, scans, 8, 64)
    np.testing.assert_allclose(preds["prob"], oof["prob"][scans], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(preds["aps_idx"], oof["aps_idx"][scans])


def test_drct1_run_and_evaluate_with_paired_ttest(run_dirs):
    oof = np.load(run_dirs["drct1"] / "oof.npz")
    assert np.isnan(oof["prob_aps"]).all() and (oof["aps_idx"] == -1).all()
    np.testing.assert_array_equal(oof["prob"], oof["prob_primary"])
    runner = CliRunner()
    result = runner.invoke(main, ["evaluate", str(run_dirs["drct2"]), "--compare", str(run_dirs["drct1"])])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run_dirs["drct2"] / "metrics.json").read_text())
    # the metrics file is the headline only: five macro figures, each with its interval, and n
    figures = ("macro_precision", "macro_recall", "macro_f1", "macro_auc", "macro_ap")
    assert set(metrics) == {"n", *figures, *(f"{k}_ci_low" for k in figures), *(f"{k}_ci_high" for k in figures)}
    assert all(metrics[f"{k}_ci_low"] <= metrics[k] <= metrics[f"{k}_ci_high"] for k in figures)
    details = json.loads((run_dirs["drct2"] / "metrics_details.json").read_text())
    assert details["macro_f1"]["value"] == metrics["macro_f1"] and "fold_std" in details["macro_f1"]
    assert set(details["per_class"]) == set(NAMES)
    assert set(details["per_class"]["any"]) >= {"precision", "recall", "f1", "auc", "ap", "support"}
    assert set(details["per_class"]["any"]["f1"]) >= {"value", "ci_low", "ci_high", "fold_mean", "fold_std"}
    assert len(details["per_fold"]) == 3 and set(details["training_curves"]) == {"fold_0", "fold_1", "fold_2"}
    assert set(details["calibration"]["per_class"]["any"]) >= {"ece", "brier", "count"}
    compare = details["compare"]
    test = compare["fold_ttest"]["macro_f1"]
    assert test["folds"] == [0, 1, 2] and "pvalue" in test
    paired = compare["paired_bootstrap"]["metrics"]["macro_f1"]
    assert paired["difference"] == pytest.approx(metrics["macro_f1"] - paired["b"])
    assert paired["ci_low"] <= paired["ci_high"] and 0 < paired["pvalue"] <= 1
    assert "paired t-test" in result.output and "paired patient bootstrap" in result.output
    assert (run_dirs["drct2"] / "metrics_reliability.png").is_file()


def test_provenance_refusal_names_the_field(cache_path, tmp_path):
    runner = CliRunner()
    config = tmp_path / "native.yaml"
    config.write_text("extract:\n  aps_source: native\n")
    result = runner.invoke(main, ["train", "--config", str(config), "--cache", str(cache_path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert f"cache {cache_path} does not match the config: aps_source: cache has 'upsampled', config wants 'native'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "r").exists()
    missing = runner.invoke(main, ["train", "--cache", str(tmp_path / "none.h5"), "--out", str(tmp_path / "r")])
    assert missing.exit_code == 2 and "feature cache not found" in missing.output
    bad_fold = runner.invoke(main, ["train", "--cache", str(cache_path), "--out", str(tmp_path / "r"), "--folds", "3", "--fold", "5"])
    assert bad_fold.exit_code == 2 and "train.fold = 5 is not in 0..2" in bad_fold.output


@pytest.mark.parametrize(
    "extra",
    [
        {"model.aps_selection": "random"},
        {"model.aps_resolution": "first", "train.loss": "bce"},
        {"model.fusion": "scatter_sum", "model.readout": "flatten"},
    ],
)
def test_ablation_options_train_one_fold(cache_path, tmp_path, extra):
    config = small_config(**{"train.epochs": 1, "train.fold": 0, **extra})
    info = run_training(config, cache_path, tmp_path, progress=False, log=lambda s: None)
    assert info["folds_run"] == [0]
    oof = np.load(tmp_path / "oof.npz")
    assert set(oof["fold"]) == {0} and np.isfinite(oof["prob"]).all() and np.isfinite(oof["prob_aps"]).all()
    if extra.get("model.aps_resolution") == "first":
        assert info["resolutions"] == {"primary": 224, "aps": 224}
    if extra.get("model.aps_selection") == "random":
        model, _, _ = load_model(tmp_path / "fold_0" / "checkpoint.pt")
        data = CachedFeatures.from_cache(FeatureCache(cache_path), 224, 512)
        scans = oof["cache_index"]  # the validation scans of fold 0, as cache rows
        a, b = predict_scans(model, data, scans, 8, 64), predict_scans(model, data, scans, 8, 64)
        np.testing.assert_array_equal(a["aps_idx"], b["aps_idx"])  # evaluation is repeatable
        np.testing.assert_array_equal(a["aps_idx"], oof["aps_idx"])


@pytest.mark.parametrize("model", ["pooled_logistic", "meanpool", "abmil"])
def test_baselines_train_and_evaluate_like_drct(cache_path, tmp_path, model):
    """`drct train --model <baseline>` writes the same run directory (oof.npz, fold checkpoints,
    run.json naming the departure) and `drct evaluate` reads it; baselines read the APS resolution."""
    out = tmp_path / model
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--cache", str(cache_path), "--out", str(out), "--model", model,
                                  "--epochs", "2", "--quiet", *SETS])
    assert result.exit_code == 0, result.output
    oof = np.load(out / "oof.npz")
    assert oof["prob"].shape == (45, len(NAMES)) and np.isfinite(oof["prob"]).all()
    assert np.isnan(oof["prob_aps"]).all() and (oof["aps_idx"] == -1).all()
    np.testing.assert_allclose(oof["slice_attention"].sum(axis=1), 1.0, rtol=1e-5)
    info = json.loads((out / "run.json").read_text())
    assert info["model"] == model
    assert info["resolutions"]["primary"] == info["resolutions"]["aps"] == FeatureCache(cache_path).resolutions[-1]
    assert info["departures_from_paper"][0]["item"] == "model"
    assert (out / "fold_2" / "checkpoint.pt").is_file()
    model_reloaded, _, _ = load_model(out / "fold_0" / "checkpoint.pt")
    assert model_reloaded.variant == model
    result = runner.invoke(main, ["evaluate", str(out)])
    assert result.exit_code == 0, result.output
    assert "macro_auc" in json.loads((out / "metrics.json").read_text())


def test_preset_drct2_paper_trains_with_the_papers_settings(cache_path, tmp_path):
    out = tmp_path / "paper"
    result = CliRunner().invoke(main, ["train", "--cache", str(cache_path), "--out", str(out), "--preset", "drct2_paper",
                                       "--epochs", "1", "--fold", "0", "--quiet", *SETS])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["model"]["feature_attention"], config["model"]["input_norm"], config["train"]["loss"]) == \
        ("softmax", "none", "mse_mse_bce")
    items = [d["item"] for d in json.loads((out / "run.json").read_text())["departures_from_paper"]]
    assert items == ["epochs"]
    assert "- epochs: paper 100" in (out / "MODEL_CARD.md").read_text()


# -- issue 16: one writer per run, clean stops, resume, mixed checkpoints ------------------------
REPO = Path(__file__).resolve().parent.parent


def _train_process(cache_path, out, pause, epochs=2):
    """`drct train` in a child process, sleeping `pause` s after each epoch (DRCT_EPOCH_PAUSE)."""
    env = {**os.environ, "DRCT_EPOCH_PAUSE": str(pause), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "stages.cli", "train", "--cache", str(cache_path), "--out", str(out),
                             "--model", "drct2", "--epochs", str(epochs), "--quiet", *SETS], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, process, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _fold_committed(out, fold):
    def done():
        try:
            return fold in set(np.load(out / "oof.npz")["fold"])
        except (OSError, ValueError, KeyError, EOFError):
            return False
    return done


def test_one_writer_then_sigterm_stops_cleanly_readers_refuse_and_a_rerun_resumes(cache_path, run_dirs, tmp_path):
    """Items 2 and 3 of issue 16 on one child `drct train`: a second train into its directory is
    refused and changes nothing; SIGTERM in fold 1 is one line, fold 0 kept, the run marked
    incomplete and refused by its readers; the rerun resumes and equals an uninterrupted run."""
    out = tmp_path / "run"
    process = _train_process(cache_path, out, 1.0)
    _wait_for(lambda: (out / "run.json").is_file(), process)
    before = (out / "run.json").read_bytes()
    runner = CliRunner()
    second = runner.invoke(main, ["train", "--cache", str(cache_path), "--out", str(out), "--model", "drct1",
                                  "--epochs", "1", "--quiet", *SETS])
    assert process.poll() is None, "the first train ended before the second started: no overlap tested"
    assert second.exit_code == 2 and "Traceback" not in second.output, second.output
    assert f"another `drct train` is writing {out} (lock {out}.lock is held)" in second.output
    assert (out / "run.json").read_bytes() == before  # the second train wrote nothing

    _wait_for(_fold_committed(out, 0), process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if "stopped by" in line]
    # the signal lands in fold 1 or, on a loaded machine, between the folds: one line either way
    assert lines in ([(f"drct train: stopped by SIGTERM {when}, fold(s) 0 kept; {out} is marked incomplete "
                       "(incomplete.json): run the same command again to resume at fold 1")]
                     for when in ("during fold 1: fold 1 discarded", "after fold 0")), stderr
    assert (out / "incomplete.json").is_file() and (out / "fold_0" / "checkpoint.pt").is_file()
    assert not (out / "fold_1" / "checkpoint.pt").exists() and not list(out.rglob("*.tmp"))
    assert set(np.load(out / "oof.npz")["fold"]) == {0}
    assert json.loads((out / "run.json").read_text())["model"] == "drct2"
    fold0 = (out / "fold_0" / "checkpoint.pt").read_bytes()

    predicted = runner.invoke(main, ["predict", str(tmp_path), "--run", str(out), "--out", str(tmp_path / "p")])
    assert predicted.exit_code == 2 and "Traceback" not in predicted.output
    assert f"{out} is an incomplete `drct train` run" in predicted.output
    assert "fold(s) 1, 2 of 0, 1, 2 missing" in predicted.output and "--allow-partial" in predicted.output
    assert not (tmp_path / "p" / "features.h5").exists()
    for command in (["evaluate", str(out)], ["interpret", str(out)],
                    ["report", str(out), "--out", str(tmp_path / "rep")]):
        refused = runner.invoke(main, command)
        assert refused.exit_code == 2 and "fold(s) 1, 2 of 0, 1, 2 missing" in refused.output, (command, refused.output)
    partial = runner.invoke(main, ["evaluate", str(out), "--allow-partial", "--out", str(tmp_path / "m.json")])
    assert partial.exit_code == 0, partial.output
    assert "partial run: fold(s) 1, 2 missing" in partial.output

    resumed = runner.invoke(main, ["train", "--cache", str(cache_path), "--out", str(out), "--model", "drct2",
                                   "--epochs", "2", "--quiet", *SETS])
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming {out} at fold 1: fold(s) 0 kept from the interrupted run" in resumed.output
    assert (out / "fold_0" / "checkpoint.pt").read_bytes() == fold0 and not (out / "incomplete.json").exists()
    # the first run's results, interrupted and resumed, are the uninterrupted run's
    a, b = np.load(out / "oof.npz"), np.load(run_dirs["drct2"] / "oof.npz")
    for key in b.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert all(load_model(out / f"fold_{k}" / "checkpoint.pt")[1]["model"]["name"] == "drct2" for k in range(3))
    assert runner.invoke(main, ["evaluate", str(out), "--out", str(tmp_path / "m2.json")]).exit_code == 0


def test_sigint_between_epochs_discards_the_fold_and_resumes(cache_path, tmp_path):
    config = small_config(**{"train.epochs": 1})

    def interrupt(fold, epoch, record):
        if fold == 1:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as info:
        run_training(config, cache_path, tmp_path / "run", progress=False, log=lambda s: None, on_epoch=interrupt)
    assert info.value.exit_code == 130 and info.value.message.startswith("stopped by SIGINT during fold 1: ")
    assert signal.getsignal(signal.SIGINT) is not None  # handlers restored
    marker = json.loads((tmp_path / "run" / "incomplete.json").read_text())
    assert marker["folds_run"] == [0, 1, 2] and marker["state"] == "stopped by SIGINT during fold 1"
    assert [p.parent.name for p in (tmp_path / "run").glob("fold_*/checkpoint.pt")] == ["fold_0"]
    logs = []
    run_training(config, cache_path, tmp_path / "run", progress=False, log=logs.append)
    assert any("at fold 1: fold(s) 0 kept" in line for line in logs)
    assert set(np.load(tmp_path / "run" / "oof.npz")["fold"]) == {0, 1, 2}
    # other settings: the interrupted run is not resumed but started over
    with pytest.raises(TrainingInterrupted):
        run_training(config, cache_path, tmp_path / "other", progress=False, log=lambda s: None, on_epoch=interrupt)
    logs = []
    run_training(small_config(**{"train.epochs": 1, "train.seed": 3}), cache_path, tmp_path / "other", progress=False,
                 log=logs.append)
    assert any("interrupted run with other settings or data: starting it over" in line for line in logs)
    assert not any("resuming" in line for line in logs)


def _mutate_checkpoint(path, change):
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)


@pytest.mark.parametrize("kind, message", [
    ("drct1", "fold_1/checkpoint.pt differs from fold_0/checkpoint.pt in model.name 'drct1' vs 'drct2'"),
    ("labels", "fold_1/checkpoint.pt differs from fold_0/checkpoint.pt in label names"),
    ("extraction", "fold_1/checkpoint.pt differs from fold_0/checkpoint.pt in extraction setting windows"),
    ("fold0", "fold_0/checkpoint.pt does not belong to this run (run.json): it differs in model.name 'drct1' vs 'drct2'"),
    ("extra", "fold_3/checkpoint.pt is not a fold of this run (folds 0, 1, 2)"),
])
def test_mixed_checkpoints_are_refused_by_every_reader(run_dirs, tmp_path, kind, message):
    run = tmp_path / "run"
    shutil.copytree(run_dirs["drct2"], run)
    target = run / "fold_1" / "checkpoint.pt"
    if kind == "drct1":
        shutil.copy(run_dirs["drct1"] / "fold_1" / "checkpoint.pt", target)
    elif kind == "labels":
        _mutate_checkpoint(target, lambda p: p.update(label_names=["any", "fracture", "bleed"]))
    elif kind == "extraction":
        _mutate_checkpoint(target, lambda p: p["provenance"].update(windows=[[40.0, 80.0]]))
    elif kind == "fold0":
        shutil.copy(run_dirs["drct1"] / "fold_0" / "checkpoint.pt", run / "fold_0" / "checkpoint.pt")
    else:
        (run / "fold_3").mkdir()
        shutil.copy(run_dirs["drct1"] / "fold_1" / "checkpoint.pt", run / "fold_3" / "checkpoint.pt")
    runner = CliRunner()
    for command in (["predict", str(tmp_path), "--run", str(run), "--out", str(tmp_path / "p")],
                    ["evaluate", str(run), "--out", str(tmp_path / "m.json")], ["interpret", str(run)],
                    ["report", str(run), "--out", str(tmp_path / "rep")]):
        for extra in ([], ["--allow-partial"]):  # mixing is never allowed
            result = runner.invoke(main, [*command, *extra])
            assert result.exit_code == 2 and message in result.output, (command, result.output)
            assert "Traceback" not in result.output
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "p" / "features.h5").exists()
