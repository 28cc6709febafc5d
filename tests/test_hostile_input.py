"""Issue 16 (hostile input, round three), items 1 and 6-11: bounded memory on decompression and
YAML bombs, image geometry, symlinked folders, cache label tables, tampered oof.npz indices and
exports that never overwrite what is not theirs. The DICOM cases are part of the generated
bad-input corpus (tests/bad_inputs.py) and go through one indexing and one extraction here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from bad_inputs import reject_rows
from click.testing import CliRunner
from dicom_fixtures import write_deflated_bomb

from cache.store import CacheError, FeatureCache
from cache.verify import verify_cache
from pipeline.config import ConfigError, load_config, read_yaml
from pipeline.data.dicom_io import ImageLimits, SliceError, read_hu
from pipeline.data.index import build_scan_index
from stages.cli import main

RESOLUTIONS = [32, 48]


def config_for(out: Path, data: Path, **dataset) -> dict:
    overrides = {
        "dataset.data": str(data), "dataset.layout": "folder", "extract.out": str(out), "dataset.keep_ids": True,
        "extract.resolutions": RESOLUTIONS, "extract.weights": "random:0", "extract.workers": 0,
        "extract.scans_per_commit": 4, "extract.batch_size": 8, "extract.precision": "fp32", "extract.device": "cpu",
    }
    overrides.update({f"dataset.{k}": v for k, v in dataset.items()})
    return load_config(None, overrides)


@pytest.fixture(scope="module")
def corpus(bad_corpus) -> tuple[Path, dict[str, str]]:
    return bad_corpus  # tests/conftest.py (shared with tests/test_bad_input.py)


@pytest.fixture(scope="module")
def extracted(bad_corpus_cache) -> Path:
    return bad_corpus_cache


def reasons_for(rows: list[dict], path: str) -> list[str]:
    return [row["reason"] for row in rows if row["path"] == str(path)]


def kept_scans(out: Path) -> dict[str, int]:
    with FeatureCache(out) as cache:
        return dict(zip(cache.scan_ids, (int(n) for n in cache.table.n_slices)))


# -- 6. decompression bombs ------------------------------------------------------------------
def test_bombs_are_rejects_with_their_reason(corpus, extracted):
    _, case = corpus
    rows = reject_rows(extracted)
    (reason,) = reasons_for(rows, case["bomb"])
    assert reason.startswith("image too large: 16384 x 16384 = 268,435,456 pixels")
    assert "exceeds dataset.max_pixels 16,777,216: refused before decoding" in reason
    (reason,) = reasons_for(rows, case["bomb_stream"])
    assert "deflated data inflates to more than" in reason and "more than its header claims" in reason
    kept = kept_scans(extracted)
    assert case["bomb_scan"] not in kept and case["bomb_stream_scan"] not in kept
    assert kept[case["good"]] == 4


def test_max_pixels_is_a_setting(tmp_path):
    bomb = write_deflated_bomb(tmp_path / "d" / "b.dcm", 64, 64)
    for max_pixels, refused in ((64 * 64 - 1, True), (64 * 64, False)):
        config = config_for(tmp_path / "x.h5", tmp_path / "d", max_pixels=max_pixels)
        index = build_scan_index(tmp_path / "d", "folder", progress=False,
                                 limits=ImageLimits.from_config(config["dataset"]))
        assert (len(index.scans) == 0) == refused
        assert any("exceeds dataset.max_pixels 4,095" in r.reason for r in index.rejects) == refused
    with pytest.raises(SliceError, match="exceeds dataset.max_pixels 100"):
        read_hu(bomb, max_pixels=100)
    assert read_hu(bomb).shape == (64, 64)  # a small deflated file still decodes
    with pytest.raises(ConfigError, match="dataset.max_pixels"):
        load_config(None, {"dataset.max_pixels": 0})


MEMORY_PROBE = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))   # 1 GiB of address space in all
from pipeline.data.dicom_io import SliceError, read_hu
from pipeline.data.series import split_headers, read_headers
import time
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
rejects = []
good = split_headers(read_headers(sys.argv[1:], workers=1, progress=False), rejects)
reasons = [r.reason for r in rejects]
for path in sys.argv[1:]:
    try:
        read_hu(path, max_pixels=4096 * 4096)
        reasons.append("decoded")
    except SliceError as exc:
        reasons.append(str(exc))
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(repr((len(good), reasons, grown, time.perf_counter() - started)))
"""


def test_bombs_are_refused_in_bounded_memory_and_time(tmp_path):
    """Header reading and decoding of both bombs in a child process limited to 1 GiB of address
    space: refused in well under a second, peak RSS growing by less than 64 MiB (the 16384 x 16384
    bomb inflates to 512 MiB; decoded as before it took 9 GB)."""
    bomb = write_deflated_bomb(tmp_path / "bomb.dcm")
    stream = write_deflated_bomb(tmp_path / "stream.dcm", 16, 16, pixel_bytes=256 << 20)
    assert Path(bomb).stat().st_size < 1 << 20
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, bomb, stream], capture_output=True, text=True,
                            cwd=root, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    n_good, reasons, grown_mib, seconds = eval(result.stdout.strip().splitlines()[-1])
    assert n_good == 1  # the stream's header is fine (16 x 16); its pixels are not
    assert reasons[0].startswith("image too large: 16384 x 16384")
    assert reasons[1].startswith("image too large: 16384 x 16384")
    assert reasons[2].startswith("deflated data inflates to more than")
    assert grown_mib < 64, f"peak RSS grew by {grown_mib:.0f} MiB"
    assert seconds < 5


# -- 8. image geometry ------------------------------------------------------------------------
def test_tiny_images_are_rejected_and_mixed_geometry_is_noted(corpus, extracted):
    root, case = corpus
    rows = reject_rows(extracted)
    tiny = [row for row in rows if row["path"].startswith(str(Path(case["tiny"]).parent))]
    assert len(tiny) == 3
    assert all(row["reason"].startswith("image too small: 1 x 1 pixels, below dataset.min_size 16 x 16")
               for row in tiny)
    kept = kept_scans(extracted)
    assert case["tiny_scan"] not in kept
    # Kept with a note (the choice: each slice is resized to the encoder resolutions on its own).
    (size_note,) = reasons_for(rows, case["mixed_size"])
    assert size_note.startswith("note: mixed matrix sizes in the series (16x16 px on 3 slices, 32x32 px on 1 slice)")
    (spacing_note,) = reasons_for(rows, case["mixed_spacing"])
    assert spacing_note.startswith("note: mixed pixel spacing in the series (0.5x0.5 mm on 2 slices, 0.8x0.8 mm on "
                                   "1 slice)")
    assert kept[case["mixed_size_scan"]] == 4 and kept[case["mixed_spacing_scan"]] == 3
    assert not any("mixed" in r for r in reasons_for(rows, str(Path(root) / "good")))


def test_min_size_is_a_setting(corpus, tmp_path):
    root, case = corpus
    tiny = Path(case["tiny"]).parent
    index = build_scan_index(tiny, "folder", progress=False, limits=ImageLimits(min_size=1))
    assert [s.scan_id for s in index.scans] == [case["tiny_scan"]]
    config = config_for(tmp_path / "x.h5", tiny, min_size=32)
    index = build_scan_index(Path(root) / "good", "folder", progress=False,
                             limits=ImageLimits.from_config(config["dataset"]))
    assert index.scans == [] and all("below dataset.min_size 32 x 32" in r.reason for r in index.rejects)


# -- 9. symlinked folders ---------------------------------------------------------------------
def test_symlinked_series_is_read_and_a_loop_is_a_reject(corpus, extracted):
    _, case = corpus
    kept = kept_scans(extracted)
    assert kept[case["linked_scan"]] == 3
    (reason,) = reasons_for(reject_rows(extracted), case["loop_folder"])
    assert "symlinked folder leads to" in reason and "not read twice (a symlink loop or a second link)" in reason
    assert verify_cache(extracted).ok


# -- 7. YAML bombs in configs -------------------------------------------------------------------
BILLION_LAUGHS = "\n".join(
    ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"{chr(98 + k)}: &{chr(98 + k)} [{', '.join(['*' + chr(97 + k)] * 9)}]" for k in range(8)]
    + ["dataset:\n  data: *i"]
)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("aliases", BILLION_LAUGHS, "YAML aliases (*name) are not allowed in a config (line 2)"),
        ("deep", "dataset: " + "[" * 100_000 + "]" * 100_000, "nested deeper than 32 levels"),
        ("large", "# padding\n" * 120_000, "MiB; a config is at most 1 MiB of settings: refused"),
        ("latin1", "dataset:\n  data: caf\xe9\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 20)"),
    ],
)
def test_hostile_config_files_give_one_line(tmp_path, name, content, message):
    config = tmp_path / f"{name}.yaml"
    (config.write_bytes if isinstance(content, bytes) else config.write_text)(content)
    with pytest.raises(ConfigError, match=None) as info:
        read_yaml(config)
    assert message in str(info.value) and "\n" not in str(info.value)
    for command in (["extract", "--config", str(config), "--data", str(tmp_path)], ["train", "--config", str(config)],
                    ["cache", "info", "--config", str(config)]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 2, (command, result.output)
        assert message in result.output and "Traceback" not in result.output, (command, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_hostile_set_values_and_anchors(tmp_path):
    result = CliRunner().invoke(main, ["train", "--set", "model.fc_hidden=[&a [1, 2], *a]"])
    assert result.exit_code == 2 and "YAML aliases (*name) are not allowed" in result.output
    assert "Traceback" not in result.output
    config = tmp_path / "anchor.yaml"
    config.write_text("train:\n  epochs: &e 3\n")  # an anchor alone expands nothing: fine
    assert read_yaml(config) == {"train": {"epochs": 3}}
    assert load_config(config)["train"]["epochs"] == 3


# -- 10. cache label tables -----------------------------------------------------------------------
def tampered_cache(path: Path, tamper: str) -> Path:
    from test_cache_integrity import make_cache

    make_cache(path, n_scans=6, n=5)
    with h5py.File(path, "r+") as f:
        labels = f["scans/labels"][()]
        del f["scans/labels"]
        if tamper == "columns":
            labels = np.ones((6, 3), np.float32)
        elif tamper == "rows":
            labels = labels[:5]
        elif tamper == "values":
            labels[2, 1] = 7.5
        elif tamper == "slice_values":
            f["slices/labels"][3, 0] = 5
        f.create_dataset("scans/labels", data=labels, fletcher32=True)
    return path


LABEL_PROBLEMS = {
    "columns": "/scans/labels has shape (6, 3), expected (6, 2)",
    "rows": "/scans/labels has 5 rows, /scans/scan_id has 6",
    "values": "/scans/labels holds 1 values that are not 0, 1 or NaN (first: 7.5 for scan row 2, class 1)",
    "slice_values": "/slices/labels holds 1 values that are not -1 (unknown), 0 or 1",
}


@pytest.mark.parametrize("tamper", list(LABEL_PROBLEMS))
def test_bad_label_tables_are_refused_by_every_command(tmp_path, tamper):
    path = tampered_cache(tmp_path / "c.h5", tamper)
    problem = LABEL_PROBLEMS[tamper]
    report = verify_cache(path)
    assert not report.ok and problem in report.problems, report.problems
    with pytest.raises(CacheError, match="the cache is damaged or was edited"):
        _ = FeatureCache(path).table
    commands = {
        "verify": ["cache", "verify", str(path)],
        "info": ["cache", "info", str(path)],
        "train": ["train", "--cache", str(path), "--out", str(tmp_path / "run"), "--epochs", "1", "--folds", "2",
                  "--no-progress", "--set", "train.device=cpu"],
        "export": ["export", str(path), "--format", "npz", "--out", str(tmp_path / "e.npz"), "--quiet"],
    }
    for name, command in commands.items():
        result = CliRunner().invoke(main, command)
        assert result.exit_code == (1 if name == "verify" else 2), (name, result.output)
        assert problem in result.output and "Traceback" not in result.output, (name, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), name
    assert not (tmp_path / "e.npz").exists() and not (tmp_path / "run" / "oof.npz").exists()


# -- 11. tampered oof.npz indices -------------------------------------------------------------------
def oof_run(run_dir: Path, cache: Path, **override) -> Path:
    with FeatureCache(cache) as opened:
        ids, n = opened.scan_ids, len(opened.scan_ids)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({"label_names": ["any", "subdural"], "model": "drct2",
                                                  "cache": str(cache), "folds": 2, "folds_run": [0, 1]}))
    arrays = {
        "scan_id": np.array(ids), "patient_id": np.array([f"P{i}" for i in range(n)]),
        "fold": np.arange(n) % 2, "labels": np.ones((n, 2), np.float32), "prob": np.full((n, 2), 0.5, np.float32),
        "prob_primary": np.full((n, 2), 0.5, np.float32), "prob_aps": np.full((n, 2), 0.5, np.float32),
        "sample_idx": np.tile(np.arange(4), (n, 1)), "slice_attention": np.full((n, 4), 0.25, np.float32),
        "feature_attention": np.zeros((n, 4, 512), np.float16), "aps_idx": np.tile(np.arange(2), (n, 1)),
        "cache_index": np.arange(n),
    }
    arrays.update(override)
    np.savez(run_dir / "oof.npz", **arrays)
    return run_dir


def test_out_of_range_oof_indices_are_one_clear_line(tmp_path):
    from test_cache_integrity import make_cache

    from pipeline.oof import OofError, read_oof

    cache = make_cache(tmp_path / "c.h5", n_scans=6, n=5)
    n = 6
    cases = {
        "negative": ({"sample_idx": np.tile(np.array([0, 1, 2, -999999]), (n, 1))},
                     "'sample_idx' holds negative indices (6 values, first -999999 at [0, 3])"),
        "past_the_scan": ({"sample_idx": np.tile(np.array([0, 1, 2, 999999]), (n, 1))},
                          "'sample_idx' points past the slices of 6 scans (first: scan 'S0' has 5 slices"),
        "aps": ({"aps_idx": np.tile(np.array([0, 4]), (n, 1))}, "'aps_idx' holds positions outside -1..3"),
        "float": ({"sample_idx": np.tile(np.arange(4.0), (n, 1))}, "'sample_idx' has dtype float64, expected integers"),
        "labels": ({"labels": np.full((n, 2), 7.5, np.float32)}, "'labels' holds values that are not 0, 1 or NaN"),
    }
    for name, (override, message) in cases.items():
        run = oof_run(tmp_path / name, cache, **override)
        if name != "past_the_scan":  # that one needs the cache (its slice counts)
            with pytest.raises(OofError, match=None) as info:
                read_oof(run / "oof.npz")
            assert message in str(info.value), (name, str(info.value))
        for command in (["interpret", str(run), "--cache", str(cache), "--out", str(tmp_path / f"i_{name}")],
                        ["report", str(run), "--cache", str(cache), "--out", str(tmp_path / f"r_{name}")]):
            result = CliRunner().invoke(main, command)
            assert result.exit_code == 2, (name, command[0], result.output)
            assert message in result.output and "Traceback" not in result.output, (name, command[0], result.output)
            assert result.exception is None or isinstance(result.exception, SystemExit), (name, command[0])
    # The untampered run reads (the checks refuse only what is wrong).
    good = oof_run(tmp_path / "good", cache)
    assert set(read_oof(good / "oof.npz")) >= {"sample_idx", "aps_idx"}
    result = CliRunner().invoke(main, ["interpret", str(good), "--cache", str(cache), "--out", str(tmp_path / "ig")])
    assert result.exit_code == 0, result.output
