"""`drct sweep` (Fig. 6 as its own DVC stage): points with mean and std over folds, error-bar CSV/PNG."""

from __future__ import annotations

import csv
import json

import numpy as np
from click.testing import CliRunner
from test_cli_style import HEAD, _cache

from stages.cli import main

SETS = [a for a in HEAD if a not in ("--epochs", "1", "--folds", "2", "--no-progress")]


def test_sweep_writes_points_with_fold_std(tmp_path):
    cache = _cache(tmp_path / "c.h5")
    out = tmp_path / "sweep"
    result = CliRunner().invoke(main, ["sweep", "--cache", str(cache), "--m-keys", "1,2", "--epochs", "1", "--out", str(out),
                                       "--set", "train.folds=2", "--no-progress", *SETS])
    assert result.exit_code == 0, result.output
    points = json.loads((out / "sweep.json").read_text())["points"]
    assert set(points) == {"attention_mkey1", "random_mkey1", "attention_mkey2", "random_mkey2"}
    for name, point in points.items():
        selection, m_key = name.split("_mkey")
        oof = np.load(out / "runs" / f"mkey{m_key}_{selection}" / "oof.npz")
        assert sorted(set(oof["fold"].tolist())) == [0, 1]
        assert point["macro_f1_std"] is not None and point["macro_f1_std"] >= 0
    rows = list(csv.DictReader((out / "mkey_sweep.csv").read_text().splitlines()))
    assert len(rows) == 4 and all(r["macro_f1_std"] != "" for r in rows)
    assert (out / "mkey_sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_refuses_m_key_outside_m(tmp_path):
    cache = _cache(tmp_path / "c.h5")
    result = CliRunner().invoke(main, ["sweep", "--cache", str(cache), "--m-keys", "2,9", "--out", str(tmp_path / "s"), *SETS])
    assert result.exit_code == 2 and "[9] are outside 1..sampler.m = 4" in result.output
    result = CliRunner().invoke(main, ["sweep", "--cache", str(cache), "--m-keys", "a,b", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "give integers" in result.output
