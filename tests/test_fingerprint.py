"""The fingerprints of the DVC pipeline (pipeline/fingerprint.py): the expensive stages depend on
them instead of on a hand-written list of sources, so they must change exactly when the code or
config a stage runs changes. Checked on a copy of the tree, editing one file at a time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.fingerprint import (
    MANIFESTS,
    ROOT,
    Manifest,
    closure,
    manifest,
    module_graph,
    reached_only_to_validate,
    registry_entries,
    write_manifests,
)
from stages.cli import main

STAGE_ONE, HEADS = MANIFESTS["stage_one.json"], MANIFESTS["heads.json"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """The first-party tree and configs, copied (no bytecode), to edit without touching the repo."""
    root = tmp_path_factory.mktemp("tree")
    for folder in ("pipeline", "stages", "cache", "configs"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return root


def _both(root: Path, config: Path | None = None) -> tuple[dict, dict]:
    return manifest(STAGE_ONE, config, root), manifest(HEADS, config, root)


def test_stage_one_hashes_the_reader_and_encoder_and_no_head():
    files = set(manifest(STAGE_ONE)["code"])
    assert {"stages/extract.py", "stages/adapt.py", "pipeline/features/encoder.py", "pipeline/features/preprocess.py",
            "pipeline/data/rsna.py", "pipeline/data/cq500.py", "pipeline/pseudonym.py", "cache/store.py",
            "pipeline/config.py", "pipeline/__init__.py"} <= files
    assert not [f for f in files if f.startswith(("pipeline/heads/", "pipeline/training/", "pipeline/synthetic/",
                                                  "pipeline/report/", "stages/train.py"))], files
    assert "pipeline/run_summary.py" not in files  # it only reports


def test_heads_hash_the_heads_trainer_and_defaults_and_no_reader():
    data = manifest(HEADS)
    files = set(data["code"])
    assert {"stages/train.py", "stages/sweep.py", "pipeline/heads/drct2.py", "pipeline/heads/registry.py",
            "pipeline/training/trainer.py", "pipeline/sweep.py", "cache/provenance.py"} <= files
    assert not [f for f in files if f.startswith(("pipeline/features/", "pipeline/data/", "stages/extract.py"))], files
    assert set(data["files"]) == {"configs/defaults.yaml"} and data["config"] == {}


def test_the_cut_validation_edges_hide_no_code_that_runs():
    """Only pipeline/config.py and stages/options.py reach a cut package (to check names): if any
    other module of a closure imported a head or a reader, its code would run unhashed."""
    graph = module_graph(with_registries=True)
    for spec in MANIFESTS.values():
        assert reached_only_to_validate(spec, graph) == [], spec
    # the check is not vacuous: the uncut closure reaches the heads, and a new edge is reported
    assert any(m.startswith("pipeline.heads.") for m in closure(STAGE_ONE.roots, graph))
    broken = {**graph, "pipeline.features.encoder": graph["pipeline.features.encoder"] | {"pipeline.heads.drct2"}}
    assert reached_only_to_validate(STAGE_ONE, broken) == [("pipeline.features.encoder", "pipeline.heads.drct2")]


def test_registry_strings_are_edges(tmp_path):
    probe = tmp_path / "pipeline" / "reg.py"
    probe.parent.mkdir()
    probe.write_text('ENTRIES = {"a": "pipeline.data.rsna:LAYOUT", "b": "stages.extract", "c": "numpy.linalg:x",\n'
                     '           "d": "not a module", "e": "pipeline.data.rsna is read lazily"}\n')
    assert registry_entries(probe) == {"pipeline.data.rsna", "stages.extract"}
    graph = module_graph(with_registries=True)
    assert "pipeline.data.rsna" in graph["pipeline.data.layouts"]  # what `layouts.get("rsna")` imports
    assert "pipeline.data.rsna" not in module_graph()["pipeline.data.layouts"]


@pytest.mark.parametrize("edit, stage_one_changes, heads_change", [
    ("pipeline/heads/fusion.py", False, True),            # a head: never reruns extraction
    ("pipeline/heads/registry.py", False, True),          # a new head is a new registry line
    ("pipeline/training/trainer.py", False, True),
    ("pipeline/features/preprocess.py", True, False),     # the windowing: the vectors change
    ("pipeline/data/rsna.py", True, False),               # a reader reached through the registry
    ("cache/store.py", True, True),                       # the contract between the two
    ("pipeline/config.py", True, True),
    ("pipeline/run_summary.py", False, False),            # only reports timings
    ("pipeline/report/render.py", False, False),          # the report stage depends on the tree itself
])
def test_an_edit_changes_the_fingerprints_of_the_stages_that_run_it(tree, edit, stage_one_changes, heads_change):
    before = _both(tree)
    path = tree / edit
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"\n# an edit\n")
        after = _both(tree)
    finally:
        path.write_bytes(original)
    assert (before[0] != after[0], before[1] != after[1]) == (stage_one_changes, heads_change)
    assert _both(tree) == before  # reverting restores them


def test_the_config_enters_stage_one_only_through_its_sections(tree, tmp_path):
    config = tmp_path / "stage_one.yaml"
    config.write_text(yaml.safe_dump({"dataset": {"data": "data/phantom"}, "extract": {"resolutions": [32, 64]}}))
    base = _both(tree, config)
    assert base[0]["config"]["extract"]["resolutions"] == [32, 64]
    assert base[0]["config"]["extract"]["windows"]  # merged with the defaults
    config.write_text(yaml.safe_dump({"dataset": {"data": "data/phantom"}, "extract": {"resolutions": [32, 64]},
                                      "model": {"m_key": 4}, "train": {"epochs": 1}}))
    assert _both(tree, config)[0] == base[0]  # head keys in the same file: no rerun of extraction
    config.write_text(yaml.safe_dump({"dataset": {"data": "data/phantom"}, "extract": {"resolutions": [32, 96]}}))
    assert _both(tree, config)[0] != base[0]
    defaults = tree / "configs" / "defaults.yaml"
    original = defaults.read_text()
    before = _both(tree)
    try:
        edited = yaml.safe_load(original)
        edited["model"]["m_key"] = 12  # a head default: the heads rerun, extraction does not
        defaults.write_text(yaml.safe_dump(edited))
        after = _both(tree)
        assert after[0] == before[0] and after[1]["files"] != before[1]["files"]
        edited = yaml.safe_load(original)
        edited["extract"]["windows"] = [[40, 80], [80, 200], [600, 2000]]  # a stage-one default: new vectors
        defaults.write_text(yaml.safe_dump(edited))
        assert _both(tree)[0]["config"] != before[0]["config"]
    finally:
        defaults.write_text(original)


def test_the_files_are_the_same_in_any_folder_and_not_rewritten(tree, tmp_path):
    config = ROOT / "configs" / "stage_one.yaml"
    here = write_manifests(tmp_path / "a", config)
    there = write_manifests(tmp_path / "b", config, root=tree)
    for name in MANIFESTS:
        assert here[name].read_bytes() == there[name].read_bytes(), name
        assert json.loads(here[name].read_text())["code"]
    stamp = {name: path.stat().st_mtime_ns for name, path in here.items()}
    write_manifests(tmp_path / "a", config)
    assert {name: path.stat().st_mtime_ns for name, path in here.items()} == stamp  # DVC sees no change


def test_an_unknown_root_is_refused(tree):
    with pytest.raises(ValueError, match="no such first-party module: stages.nothing"):
        manifest(Manifest(("stages.nothing",)), None, tree)


def test_the_command_writes_both_files_and_refuses_a_bad_config(tmp_path):
    result = CliRunner().invoke(main, ["fingerprint", "--config", str(ROOT / "configs" / "stage_one.yaml"),
                                       "--out", str(tmp_path / "fp")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "fp").iterdir()) == sorted(MANIFESTS)
    bad = tmp_path / "bad.yaml"
    bad.write_text("extract:\n  resolutons: [32, 64]\n")
    result = CliRunner().invoke(main, ["fingerprint", "--config", str(bad), "--out", str(tmp_path / "fp2")])
    assert result.exit_code == 2 and "did you mean 'extract.resolutions'" in result.output
    assert not (tmp_path / "fp2").exists()
