"""Algorithm 1 (Table 5), Table 6 and Fig. 7 on hand-built attention/label cases."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import interpret as it


def _key(m: int, positions) -> np.ndarray:
    key = np.zeros(m, bool)
    key[list(positions)] = True
    return key


def test_rank_ties_go_to_lower_position():
    att = np.array([0.1, 0.3, 0.3, 0.2, 0.3])
    assert it.rank_positions(att).tolist() == [1, 2, 4, 3, 0]
    assert it.top_positions(att, 2).tolist() == [1, 2]


def test_easy_task_hand_case():
    m = 10
    att = np.arange(m, dtype=float)[::-1] / 10  # position 0 highest, top 5 = 0..4
    key = _key(m, [0, 2, 7, 8, 9])  # 5 key slices, 2 in the top 5
    scores = it.scan_scores(att[None], key[None], "easy")
    assert scores.tolist() == [pytest.approx(2 / 5)]


def test_exactly_five_key_slices_in_easy_and_difficult():
    m = 8
    att = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.1, 0.1, 0.1]])
    key = _key(m, [5, 6, 7, 0, 1])[None]  # exactly 5; top 5 hold positions 0,1
    assert it.scan_scores(att, key, "easy")[0] == pytest.approx(0.4)
    assert it.scan_scores(att, key, "difficult")[0] == 1.0
    assert it.scan_scores(att, key, "comprehensive")[0] == pytest.approx(0.4)  # h = 5
    res = it.algorithm1(att, key)
    assert res["easy"]["n_scans"] == res["difficult"]["n_scans"] == res["comprehensive"]["n_scans"] == 1


def test_no_key_slice_scan_is_in_no_task():
    att = np.array([[0.5, 0.2, 0.3], [0.1, 0.2, 0.7]])
    key = np.array([[False, False, False], [False, False, True]])
    for task in it.TASKS:
        assert np.isnan(it.scan_scores(att, key, task)[0])
    res = it.algorithm1(att, key)
    assert res["easy"] == {"accuracy": None, "n_scans": 0}
    assert res["difficult"] == {"accuracy": 1.0, "n_scans": 1}
    assert res["comprehensive"] == {"accuracy": 1.0, "n_scans": 1}


def test_difficult_miss_and_h_greater_than_five():
    m = 12
    att = np.linspace(1, 0, m)[None]  # descending: top-h = first h positions
    miss = _key(m, [10, 11])[None]
    assert it.scan_scores(att, miss, "difficult")[0] == 0.0
    seven = _key(m, [0, 1, 2, 3, 4, 5, 11])[None]  # h = 7; top 7 = 0..6 hold 6 keys
    assert it.scan_scores(att, seven, "comprehensive")[0] == pytest.approx(6 / 7)
    assert it.scan_scores(att, seven, "easy")[0] == pytest.approx(1.0)
    assert np.isnan(it.scan_scores(att, seven, "difficult")[0])


def test_ties_in_attention_decide_by_position():
    att = np.zeros((1, 6))  # all tied: top 5 = positions 0..4
    key = _key(6, [5])[None]
    assert it.scan_scores(att, key, "difficult")[0] == 0.0
    key = _key(6, [4])[None]
    assert it.scan_scores(att, key, "difficult")[0] == 1.0


def test_accuracy_is_mean_over_scans():
    m = 6
    att = np.tile(np.linspace(1, 0, m), (3, 1))
    key = np.stack([_key(m, [0]), _key(m, [5]), _key(m, [0, 5])])
    res = it.algorithm1(att, key)
    # comprehensive: 1/1, 0/1, top2={0,1} -> 1/2  => mean 0.5
    assert res["comprehensive"] == {"accuracy": pytest.approx(0.5), "n_scans": 3}
    # difficult: hit, miss (pos 5 outside top 5), hit => 2/3
    assert res["difficult"]["accuracy"] == pytest.approx(2 / 3)


def test_shape_mismatch_and_unknown_task_raise():
    with pytest.raises(ValueError, match="differ in shape"):
        it.scan_scores(np.zeros((1, 3)), np.zeros((1, 4), bool), "easy")
    with pytest.raises(ValueError, match="unknown task"):
        it.scan_scores(np.zeros((1, 3)), np.zeros((1, 3), bool), "medium")


def test_per_disease_accuracy_pooled_over_slices():
    names = ["any", "EDH", "SDH"]
    m = 6
    att = np.array([np.linspace(1, 0, m), np.linspace(0, 1, m)])  # scan 2 prefers the last positions
    labels = np.zeros((2, m, 3), np.int8)
    labels[0, [0, 3], 1] = 1      # EDH at 0,3: top-2 = {0,1}: 1 picked
    labels[0, [1], 2] = 1         # SDH at 1: top-1 = {0}: 0 picked
    labels[1, [5, 4, 0], 2] = 1   # SDH scan 2: top-3 = {5,4,3}: 2 picked
    labels[..., 0] = labels[..., 1:].max(axis=-1)
    res = it.per_disease_accuracy(att, labels, names)
    assert res["EDH"] == {"amount": 2, "picked": 1, "accuracy": 0.5}
    assert res["SDH"] == {"amount": 4, "picked": 2, "accuracy": 0.5}
    # any: scan 1 keys {0,1,3}, top3={0,1,2} -> 2; scan 2 keys {0,4,5}, top3={5,4,3} -> 2
    assert res["any"] == {"amount": 6, "picked": 4, "accuracy": pytest.approx(4 / 6)}
    assert it.per_disease_accuracy(att, labels, names, selection="any")["SDH"]["picked"] == 3


def test_top_position_histogram_and_sampled_labels():
    att = np.array([[5, 4, 3, 2, 1, 0, 0], [0, 0, 1, 2, 3, 4, 5], [9, 9, 9, 9, 9, 9, 9]], float)
    hist = it.top_position_histogram(att, 5)
    assert hist.tolist() == [2, 2, 3, 3, 3, 1, 1]
    assert it.top_position_histogram(att, 5, np.array([True, False, False])).tolist() == [1, 1, 1, 1, 1, 0, 0]
    slice_labels = np.arange(20).reshape(10, 2)
    got = it.sampled_slice_labels(slice_labels, np.array([0, 6]), np.array([[0, 2], [1, 3]]))
    assert got.tolist() == [[[0, 1], [4, 5]], [[14, 15], [18, 19]]]


def test_interpret_arrays_leaves_out_unknown_slice_labels():
    names = ["any", "SDH"]
    att = np.tile(np.linspace(1, 0, 6), (2, 1))
    labels = np.zeros((2, 6, 2), np.int8)
    labels[0, 0] = 1
    labels[1] = -1  # CQ500-like: no slice labels
    res = it.interpret_arrays(att, labels, names, scan_labels=np.array([[1, 1], [0, 0]], float))
    assert res["n_scans_with_slice_labels"] == 1
    assert res["tasks"]["comprehensive"] == {"accuracy": 1.0, "n_scans": 1}
    assert res["top_position_histogram"]["n_scans"] == 1
    assert res["top_position_histogram"]["counts"] == [1, 1, 1, 1, 1, 0]


def test_interpret_command_on_phantom_run(tmp_path):
    """`drct interpret` on a run whose attention is known: the tasks match an independent count."""
    import json
    import sys
    from pathlib import Path

    from click.testing import CliRunner

    sys.path.insert(0, str(Path(__file__).parent))
    from report_fixtures import cache_from_index, run_from_cache, tiny_provenance

    from pipeline.data.index import build_scan_index
    from pipeline.synthetic.phantom import make_phantom
    from pipeline.training.sampler import eval_positions
    from stages.cli import main

    make_phantom(tmp_path / "dicom", layout="rsna", scans=3, seed=1, size=32)
    index = build_scan_index(tmp_path / "dicom", "rsna", workers=1, progress=False)
    provenance = tiny_provenance()
    cache = cache_from_index(index, tmp_path / "f.h5", provenance)
    m = 12
    sample = eval_positions(np.array([len(s.slices) for s in index.scans]), m)
    key = np.array([[any(s.slices[j].labels) for j in row] for s, row in zip(index.scans, sample)])
    attention = key * 1.0 + np.linspace(0.01, 0, m)  # the model finds every key slice
    run = run_from_cache(tmp_path / "run", cache, index, provenance, m=m, attention=attention)
    run_from_cache(tmp_path / "run_r", cache, index, provenance, m=m, seed=5)
    result = CliRunner().invoke(main, ["interpret", str(run), "--sweep", str(tmp_path / "run_r")])
    assert result.exit_code == 0, result.output
    out = json.loads((run / "interpret.json").read_text())
    h = key.sum(1)
    assert out["tasks"]["comprehensive"] == {"accuracy": 1.0, "n_scans": int((h >= 1).sum())}
    assert out["tasks"]["easy"]["n_scans"] == int((h >= 5).sum())
    assert out["tasks"]["difficult"]["n_scans"] == int(((h >= 1) & (h <= 5)).sum())
    assert out["per_disease"]["any"]["amount"] == int(h.sum())
    for name in ("pr_curves", "top5_positions", "mkey_sweep"):
        assert (run / "plots" / f"{name}.csv").is_file() and (run / "plots" / f"{name}.png").is_file()
    assert len(out["mkey_sweep"]) == 2


def test_plot_writers_csv_content(tmp_path):
    import csv

    from sklearn.metrics import precision_recall_curve

    from pipeline import plots

    labels = np.array([[1, 0], [0, 0], [1, 1], [0, 1]], float)
    prob = np.array([[0.9, 0.2], [0.4, 0.1], [0.6, 0.8], [0.3, 0.4]])
    curves = plots.pr_curves(labels, prob, ["A", "B"])
    precision, recall, _ = precision_recall_curve(labels[:, 0] > 0.5, prob[:, 0])
    assert np.array_equal(curves["A"][0], precision) and np.array_equal(curves["A"][1], recall)
    assert "C" not in plots.pr_curves(labels[:, :1] * 0, prob[:, :1], ["C"])  # no positive: no curve
    plots.write_pr_curves(curves, tmp_path / "pr.csv", tmp_path / "pr.png")
    rows = list(csv.DictReader((tmp_path / "pr.csv").read_text().splitlines()))
    assert {r["class"] for r in rows} == {"A", "B"} and len(rows) == len(precision) + len(curves["B"][0])
    plots.write_position_histogram([3, 0, 2], tmp_path / "h.csv", tmp_path / "h.png")
    assert list(csv.reader((tmp_path / "h.csv").read_text().splitlines())) == [["position", "count"], ["1", "3"], ["2", "0"], ["3", "2"]]
    plots.write_mkey_sweep([{"m_key": 8, "selection": "random", "macro_f1": 0.5}, {"m_key": 4, "selection": "attention",
                            "macro_f1": 0.75}], tmp_path / "s.csv", tmp_path / "s.png")
    assert list(csv.reader((tmp_path / "s.csv").read_text().splitlines()))[1] == ["attention", "4", "0.75", ""]
    for name in ("pr.png", "h.png", "s.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
