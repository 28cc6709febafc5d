"""Shared fixtures. The real CTs live in ../shared/data/real beside the checkout (read-only)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REAL_DATA = Path(os.environ.get("DRCT_REAL_DATA", REPO.parent / "shared" / "data" / "real"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Path of the 9 real head CTs; skips the test with a reason where they are absent."""
    if not (REAL_DATA / "README.md").is_file():
        pytest.skip(f"real CT data not found at {REAL_DATA} (set DRCT_REAL_DATA to its folder)")
    return REAL_DATA


@pytest.fixture(scope="session")
def bad_corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The generated bad-input corpus (tests/bad_inputs.py): (root, {case: path or scan id}); read-only."""
    from bad_inputs import write_corpus

    root = tmp_path_factory.mktemp("corpus")
    return root, write_corpus(root)


@pytest.fixture(scope="session")
def bad_corpus_cache(bad_corpus, tmp_path_factory) -> Path:
    """The bad-input corpus indexed and extracted once (folder layout, random:0 VGG16 at 32/48 px,
    ids kept so that the cases are found by their ids); shared by tests/test_bad_input.py and
    tests/test_hostile_input.py."""
    from pipeline.config import load_config
    from pipeline.data.dicom_io import ImageLimits
    from pipeline.data.index import build_scan_index
    from pipeline.features.extraction import run_extraction

    root, _ = bad_corpus
    out = tmp_path_factory.mktemp("out") / "features.h5"
    config = load_config(None, {
        "dataset.data": str(root), "dataset.layout": "folder", "extract.out": str(out), "dataset.keep_ids": True,
        "extract.resolutions": [32, 48], "extract.weights": "random:0", "extract.workers": 0,
        "extract.scans_per_commit": 3, "extract.batch_size": 8, "extract.precision": "fp32", "extract.device": "cpu",
    })
    index = build_scan_index(root, "folder", progress=False, allow_modalities=config["dataset"]["allow_modalities"],
                             limits=ImageLimits.from_config(config["dataset"]))
    run_extraction(index, config, progress=False, log=lambda m: None)
    return out
