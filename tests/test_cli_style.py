"""One CLI style (issue 12): --set and --progress everywhere, "did you mean", layout guessing,
`drct --help` lists every command, --scan-labels reaches the readers, and `drct train` takes the
extraction settings from the cache unless the user sets them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cache.provenance import config_provenance
from cache.store import write_cache
from pipeline.config import ConfigError, load_config
from stages.cli import SUBCOMMANDS, main
from stages.options import guess_layout

NAMES = ["any", "subdural"]


def _cache(path, weights="random:0", resolutions=(32, 64), n_scans=8, slices=6):
    """A labelled cache made with non-default extraction settings (random vectors)."""
    rng = np.random.default_rng(0)
    extract = {"weights": weights, "resolutions": list(resolutions), "windows": [[40, 80], [80, 200], [600, 2800]],
               "aps_source": "upsampled"}
    labels = np.array([[i % 2, (i // 2) % 2] for i in range(n_scans)], np.float32)
    total = n_scans * slices
    return write_cache(
        path, scan_ids=[f"s{i}" for i in range(n_scans)], patient_ids=[f"p{i}" for i in range(n_scans)],
        scan_labels=labels, n_slices=[slices] * n_scans, z=np.tile(np.arange(slices, dtype=float), n_scans),
        sop_uids=[f"1.2.{i}" for i in range(total)], paths=[f"x{i}.dcm" for i in range(total)],
        slice_labels=np.zeros((total, 2), np.int8),
        features={r: np.abs(rng.standard_normal((total, 512))).astype(np.float16) for r in resolutions},
        attrs={**config_provenance(extract), "weights_digest": "d" * 64, "label_names": NAMES, "layout": "rsna",
               "data_root": "."},
    )


HEAD = ["--epochs", "1", "--folds", "2", "--no-progress", "--set", "sampler.m=4", "--set", "model.m_key=2",
        "--set", "model.gru_hidden=8", "--set", "model.fc_hidden=[16, 8]", "--set", "train.batch_size=4"]


def test_train_takes_extraction_settings_from_the_cache(tmp_path):
    cache = _cache(tmp_path / "c.h5")
    # defaults say imagenet 224/512; the cache says random:0 32/64: no config, no --set -> trains
    result = CliRunner().invoke(main, ["train", "--cache", str(cache), "--out", str(tmp_path / "run"), *HEAD])
    assert result.exit_code == 0, result.output
    assert "extraction settings from the cache" in result.output and "weights=random:0" in result.output
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["resolutions"] == {"primary": 32, "aps": 64}
    # a value the user sets is checked against the cache, not overridden by it
    result = CliRunner().invoke(main, ["train", "--cache", str(cache), "--out", str(tmp_path / "r2"), *HEAD,
                                       "--set", "extract.weights=imagenet"])
    assert result.exit_code == 2 and "weights: cache has 'random:0', config wants 'imagenet'" in result.output
    config = tmp_path / "c.yaml"
    config.write_text("extract:\n  resolutions: [224, 512]\n")
    result = CliRunner().invoke(main, ["train", "--config", str(config), "--cache", str(cache), "--out", str(tmp_path / "r3"),
                                       *HEAD])
    assert result.exit_code == 2 and "resolutions" in result.output and "Traceback" not in result.output


def test_run_config_fills_unset_extraction_settings_from_the_cache(tmp_path):
    from pipeline.config import resolve_run_config
    from pipeline.training.trainer import ProvenanceMismatch, check_provenance

    cache = _cache(tmp_path / "c.h5")  # random:0, 32/64, upsampled
    config_file = tmp_path / "c.yaml"
    config_file.write_text("extract:\n  aps_source: native\n")
    run = resolve_run_config(config_file, {"extract.weights": "imagenet", "model.m_key": 2}, cache)
    extract = run.config["extract"]
    # unset fields come from the cache's provenance (and are named); set ones (file, override) stay
    assert run.cache_path == cache and run.taken == ["resolutions=[32, 64]"]
    assert extract["resolutions"] == [32, 64] and extract["weights"] == "imagenet" and extract["aps_source"] == "native"
    assert run.config["model"]["m_key"] == 2
    # the set ones that contradict the cache give the trainer's refusal, naming each field
    from cache.store import FeatureCache

    with FeatureCache(cache) as opened, pytest.raises(ProvenanceMismatch) as info:
        check_provenance(opened, run.config)
    assert str(info.value) == (f"cache {cache} does not match the config: weights: cache has 'random:0', config wants "
                               "'imagenet'; aps_source: cache has 'upsampled', config wants 'native'")
    # nothing set: the config matches the cache; the default cache is extract.out
    run = resolve_run_config(None, {"extract.out": str(cache)})
    assert run.cache_path == str(cache) and sorted(run.taken) == ["resolutions=[32, 64]", "weights=random:0"]
    with FeatureCache(cache) as opened:
        check_provenance(opened, run.config)


def test_train_logs_per_epoch_metrics_with_dvclive(tmp_path):
    cache = _cache(tmp_path / "c.h5")
    live = tmp_path / "live"
    result = CliRunner().invoke(main, ["train", "--cache", str(cache), "--out", str(tmp_path / "run"), *HEAD,
                                       "--epochs", "2", "--live", str(live)])
    assert result.exit_code == 0, result.output
    summary = json.loads((live / "metrics.json").read_text())
    history = json.loads((tmp_path / "run" / "fold_1" / "history.json").read_text())
    last = [json.loads((tmp_path / "run" / f"fold_{k}" / "history.json").read_text())[-1] for k in (0, 1)]
    assert set(summary) == {"epochs", "last_loss_fold_mean", "last_val_macro_f1_fold_mean", "last_val_macro_auc_fold_mean"}
    assert summary["last_loss_fold_mean"] == pytest.approx((last[0]["loss"] + last[1]["loss"]) / 2)
    assert summary["last_val_macro_f1_fold_mean"] == pytest.approx((last[0]["val_macro_f1"] + last[1]["val_macro_f1"]) / 2)
    assert history[-1]["epoch"] == 2
    rows = (live / "plots" / "metrics" / "fold0" / "loss.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["step", "loss"] and [r.split("\t")[0] for r in rows[1:]] == ["1", "2"]
    assert (live / "plots" / "metrics" / "fold1" / "val_macro_auc.tsv").is_file()
    assert not (live / "dvc.yaml").exists()  # the pipeline's dvc.yaml declares the plots


def test_unknown_config_keys_suggest_the_right_one(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean 'train.lr_primary'"):
        load_config(None, {"train.lr_primery": 1})
    result = CliRunner().invoke(main, ["train", "--cache", str(tmp_path / "c.h5"), "--set", "model.m_kye=4"])
    assert result.exit_code == 2 and "did you mean 'model.m_key'" in result.output
    result = CliRunner().invoke(main, ["extract", "--data", str(tmp_path), "--layout", "cq50"])
    assert result.exit_code == 2 and "did you mean 'cq500'" in result.output
    config = tmp_path / "bad.yaml"
    config.write_text("dataset:\n  layout: rsnaa\n")
    result = CliRunner().invoke(main, ["extract", "--config", str(config), "--data", str(tmp_path)])
    assert result.exit_code == 2 and "did you mean 'rsna'" in result.output
    result = CliRunner().invoke(main, ["trian"])
    assert result.exit_code == 2 and "did you mean 'train'" in result.output


def test_help_lists_every_command_and_flags_are_uniform():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    listed = result.output.split("Commands:")[1]
    for name in SUBCOMMANDS:
        assert f"  {name} " in listed, name
    config_readers = ["phantom", "extract", "train", "sweep", "report", "interpret"]
    for name in config_readers:
        page = CliRunner().invoke(main, [name, "--help"]).output
        assert "--set KEY=VALUE" in page and "--config" in page, name
    for name in ["phantom", "extract", "train", "sweep", "report", "predict", "export"]:
        page = CliRunner().invoke(main, [name, "--help"]).output
        assert "--progress / --no-progress" in page and "--quiet" not in page, name
    for group, name in (("cache", "info"), ("cache", "verify")):
        assert "--set KEY=VALUE" in CliRunner().invoke(main, [group, name, "--help"]).output


def test_layout_is_guessed_from_the_tree(tmp_path):
    (tmp_path / "cq").mkdir()
    (tmp_path / "cq" / "CQ500CT1 CQ500CT1").mkdir()
    (tmp_path / "cq" / "reads.csv").write_text("name\n")
    assert guess_layout(tmp_path / "cq")[0] == "cq500" and "looks like CQ500" in guess_layout(tmp_path / "cq")[1]
    (tmp_path / "rsna").mkdir()
    (tmp_path / "rsna" / "ID_0a1b.dcm").write_bytes(b"")
    assert guess_layout(tmp_path / "rsna")[0] == "rsna"
    (tmp_path / "other").mkdir()
    assert guess_layout(tmp_path / "other")[0] == "folder"


def test_extract_guesses_layout_and_passes_scan_labels(tmp_path, monkeypatch):
    """Without --layout (and no config setting it) extract says which layout it guessed; --scan-labels
    reaches the scan index instead of being ignored."""
    import stages.extract as extract_mod

    seen = {}

    def fake_index(root, layout, labels, progress, scan_labels=None, *cohort):
        seen.update(layout=layout, scan_labels=scan_labels)
        raise SystemExit(0)

    monkeypatch.setattr(extract_mod, "_build_index", fake_index)
    tree = tmp_path / "cq"
    (tree / "CQ500CT7 CQ500CT7").mkdir(parents=True)
    result = CliRunner().invoke(main, ["extract", "--data", str(tree), "--scan-labels", "study.csv"])
    assert seen == {"layout": "cq500", "scan_labels": "study.csv"}
    assert "using --layout cq500 (this looks like CQ500" in result.output
    seen.clear()
    CliRunner().invoke(main, ["extract", "--data", str(tree), "--layout", "folder"])
    assert seen["layout"] == "folder"  # an explicit layout is never second-guessed


def test_every_run_has_a_model_card(tmp_path):
    cache = _cache(tmp_path / "c.h5")
    result = CliRunner().invoke(main, ["train", "--cache", str(cache), "--out", str(tmp_path / "run"), *HEAD])
    assert result.exit_code == 0, result.output
    card = (tmp_path / "run" / "MODEL_CARD.md").read_text()
    for section in ("## Data", "## Validation", "## Intended use", "## Limits"):
        assert section in card
    assert "8 labelled scans" in card and "any 4/8" in card and "subdural 4/8" in card
    assert "2-fold cross-validation grouped by patient" in card and "| 0 | 4 |" in card and "| 1 | 4 |" in card
    history = json.loads((tmp_path / "run" / "fold_0" / "history.json").read_text())
    assert f"{history[-1]['val_macro_f1']:.4f}" in card
    assert "untrained VGG16 (random:0)" in card and "not a diagnosis" in card.lower() or "never a diagnosis" in card
    # calibration: each class's Brier score is sklearn's on the out-of-fold probabilities
    import numpy as np
    from sklearn.metrics import brier_score_loss

    oof = np.load(tmp_path / "run" / "oof.npz")
    names = json.loads((tmp_path / "run" / "run.json").read_text())["label_names"]
    assert "## Calibration" in card
    for c, name in enumerate(names):
        row = next(line for line in card.splitlines() if line.startswith(f"| {name} | ") and line.count("|") == 4)
        assert row.endswith(f"| {brier_score_loss(oof['labels'][:, c], oof['prob'][:, c]):.4f} |"), row


def test_extract_real_rsna_with_scan_labels_only(real_data, tmp_path):
    """RSNA studies with only a scan-level label table (no stage_2_train.csv) extract with
    --scan-labels, and the layout is guessed from the flat ID_*.dcm tree."""
    from cache.store import FeatureCache

    rsna = real_data / "rsna"
    out = tmp_path / "f.h5"
    result = CliRunner().invoke(main, ["extract", "--data", str(rsna / "stage_2_train"), "--scan-labels",
                                       str(rsna / "study_labels_derived.csv"), "--out", str(out), "--resolutions", "32,64",
                                       "--weights", "random:0", "--workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "using --layout rsna" in result.output
    with FeatureCache(out) as cache:
        table = cache.table
        assert len(table.scan_id) == 2 and not np.isnan(table.labels).any()
        assert int(np.nansum(table.labels[:, cache.label_names.index("any")])) == 1
