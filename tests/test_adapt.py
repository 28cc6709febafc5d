"""`drct adapt`: block 5 tuned on slice labels, blocks 1-4 untouched, a plain VGG16 state dict that
`--weights` accepts, resumable per epoch, recorded in the cache's provenance, and refused by
`drct train` when the adaptation scans are the cache's own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cache.store import FeatureCache
from pipeline.features.adapt import BLOCK5_START
from pipeline.features.encoder import load_encoder
from pipeline.training.trainer import TrainingError, check_adaptation_overlap
from stages.cli import main

TINY = ["--set", "extract.resolutions=[32,64]", "--set", "extract.weights=random:0", "--no-progress"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    runner = CliRunner()
    for name, seed in (("adapt_on", 11), ("target", 12)):
        result = runner.invoke(main, ["phantom", str(root / name), "--scans", "3", "--seed", str(seed), "--size", "64",
                                      "--no-progress"])
        assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def adapted(phantoms):
    torch.set_num_threads(1)
    out = phantoms / "w" / "vgg16_adapted.pth"
    runner = CliRunner()
    first = runner.invoke(main, ["adapt", "--data", str(phantoms / "adapt_on"), "--out", str(out), "--epochs", "1", *TINY])
    assert first.exit_code == 0, first.output
    second = runner.invoke(main, ["adapt", "--data", str(phantoms / "adapt_on"), "--out", str(out), "--epochs", "2", *TINY])
    assert second.exit_code == 0, second.output
    return out, first.output, second.output


def test_adapt_trains_block5_only_and_writes_a_plain_vgg16(adapted):
    out, _, _ = adapted
    source, _ = load_encoder("random:0")
    tuned, digest = load_encoder(str(out))  # what `--weights FILE` does
    state = torch.load(out, weights_only=True)
    assert all(key.startswith("features.") for key in state) and len(state) == 26  # 13 convs x (weight, bias)
    for number, (a, b) in enumerate(zip(source.features, tuned.features)):
        if isinstance(a, torch.nn.Conv2d):
            same = torch.equal(a.weight, b.weight)
            assert same == (number < BLOCK5_START), number  # blocks 1-4 frozen, block 5 trained
    record = json.loads((out.parent / (out.name + ".json")).read_text())
    assert record["adapted_from"] == "random:0" and record["weights_digest"] == digest
    assert record["epochs"] == 2 and record["n_scans"] == 3 and len(record["scan_ids"]) == 3
    assert len(record["history"]) == 2 and record["resolution"] == 32


def test_adapt_resumes_after_the_last_finished_epoch(adapted):
    _, first, second = adapted
    assert "adapt: epoch 1/1" in first
    assert "resuming after epoch 1 of 2" in second and "adapt: epoch 1/2" not in second


def test_cache_provenance_records_the_adaptation_and_train_refuses_its_own_scans(adapted, phantoms):
    out, _, _ = adapted
    runner = CliRunner()
    caches = {}
    for name in ("target", "adapt_on"):
        cache = phantoms / f"{name}.h5"
        result = runner.invoke(main, ["extract", "--data", str(phantoms / name), "--layout", "rsna", "--out", str(cache),
                                      "--weights", str(out), "--workers", "0", "--set", "extract.resolutions=[32,64]",
                                      "--no-progress"])
        assert result.exit_code == 0, result.output
        caches[name] = FeatureCache(cache)
    record = caches["target"].provenance["adaptation"]
    assert record["adapted_from"] == "random:0" and record["n_scans"] == 3 and "scan_ids" not in record
    assert "sop_digests" not in record  # the slice digests stay in the sidecar, not in every cache
    check_adaptation_overlap(caches["target"])  # other scans: fine
    n_slices = int(caches["adapt_on"].table.n_slices.sum())
    with pytest.raises(TrainingError, match=f"adapted on {n_slices} of its own slices"):
        check_adaptation_overlap(caches["adapt_on"])
    # the same scans under another root get other pseudonyms (another key): still caught
    copy = phantoms / "adapt_copy"
    shutil.copytree(phantoms / "adapt_on", copy, ignore=shutil.ignore_patterns(".drct_pseudonym_key"))
    result = runner.invoke(main, ["extract", "--data", str(copy), "--layout", "rsna", "--out", str(phantoms / "copy.h5"),
                                  "--weights", str(out), "--workers", "0", "--set", "extract.resolutions=[32,64]",
                                  "--no-progress"])
    assert result.exit_code == 0, result.output
    copied = FeatureCache(phantoms / "copy.h5")
    assert set(copied.table.scan_id).isdisjoint(caches["adapt_on"].table.scan_id)
    with pytest.raises(TrainingError, match="of its own slices"):
        check_adaptation_overlap(copied)
    # a record that is gone fails closed
    sidecar = Path(str(out) + ".json")
    sidecar.rename(sidecar.with_suffix(".moved"))
    try:
        with pytest.raises(TrainingError, match="missing or older"):
            check_adaptation_overlap(caches["target"])
    finally:
        sidecar.with_suffix(".moved").rename(sidecar)


def test_adapt_is_off_without_data_and_needs_slice_labels(phantoms, tmp_path):
    runner = CliRunner()
    off = runner.invoke(main, ["adapt", "--out", str(tmp_path / "w.pth"), "--no-progress"])
    assert off.exit_code == 0 and "adapt: off" in off.output and (tmp_path / "w.pth.off").is_file()
    unlabelled = runner.invoke(main, ["adapt", "--data", str(phantoms / "target"), "--layout", "folder",
                                      "--out", str(tmp_path / "w.pth"), *TINY])
    assert unlabelled.exit_code == 2 and "needs a dataset with slice labels" in unlabelled.output
    assert "Traceback" not in unlabelled.output
