"""The paper's Fig. 6 m_key sweep, once: the configs of its points, the training of each point
over the folds, its macro-F1 (mean and std over folds) and the files that show it.

Used by both commands that run the sweep, `drct sweep` (stages/sweep.py, its own DVC stage) and
`drct interpret --train-sweep` (stages/interpret.py), which only parse options, call `run_sweep`
and print or write what it returns.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

SELECTIONS = ("attention", "random")


class SweepError(ValueError):
    """A sweep that cannot run (bad m_key list); the message says why."""


def macro_f1(labels: np.ndarray, prob: np.ndarray, threshold: float) -> float:
    """The pooled out-of-fold macro-F1, by `pipeline.metrics` (the same number and name as
    metrics.json's ``macro_f1``)."""
    from pipeline.metrics import classification_metrics

    labels = np.asarray(labels, np.float64)
    names = [str(j) for j in range(labels.shape[1])]
    return classification_metrics(labels, np.asarray(prob, np.float64), names, threshold)["macro_f1"]


def fold_f1(run_dir: str | Path, threshold: float) -> tuple[float, float]:
    """(mean, sample std) over folds of the out-of-fold macro-F1 of a run."""
    with np.load(Path(run_dir) / "oof.npz") as oof:
        labels, prob, fold = (np.asarray(oof[k], np.float64) for k in ("labels", "prob", "fold"))
    scores = [macro_f1(labels[fold == f], prob[fold == f], threshold) for f in np.unique(fold)]
    return float(np.mean(scores)), float(np.std(scores, ddof=1)) if len(scores) > 1 else float("nan")


def parse_m_keys(value, label: str = "m_key list") -> list[int]:
    """'4,8,16' -> [4, 8, 16]; `SweepError` naming `label` (the option) for anything else."""
    try:
        keys = [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise SweepError(f"{label} {value!r}: give integers, e.g. 4,8,16") from None
    if not keys:
        raise SweepError("give at least one m_key, e.g. --m-keys 4,8,16")
    return keys


def sweep_configs(config: dict, m_keys: list[int], epochs: int | None, selections=SELECTIONS):
    """(m_key, selection, config) for every point of the sweep: the given config at that m_key and
    APS selection (and `epochs`, when given)."""
    for m_key in m_keys:
        for selection in selections:
            cfg = copy.deepcopy(config)
            cfg["model"]["m_key"] = int(m_key)
            cfg["model"]["aps_selection"] = selection
            if epochs:
                cfg["train"]["epochs"] = int(epochs)
            yield int(m_key), selection, cfg


def run_sweep(config: dict, cache_path: str | Path, runs_dir: str | Path, m_keys: list[int], epochs: int | None,
              selections=SELECTIONS, log: Callable[[str], None] = print, progress: bool = False) -> list[dict]:
    """Train the config's heads at each m_key x selection over the folds into
    RUNS_DIR/mkey<N>_<selection>/; returns the points {m_key, selection, macro_f1 (mean over folds
    of the out-of-fold macro-F1), macro_f1_std (over folds), run}. SIGTERM/SIGINT raise
    `TrainingInterrupted` (the run in progress is marked incomplete)."""
    from tqdm import tqdm

    from pipeline.training.trainer import run_training

    m = int(config["sampler"]["m"])
    bad = [k for k in m_keys if not 1 <= k <= m]
    if bad:
        raise SweepError(f"m_key values {bad} are outside 1..sampler.m = {m}")
    threshold = float(config["evaluate"]["threshold"])
    points = []
    bar = tqdm(total=len(m_keys) * len(selections), unit="run", desc="sweep", disable=not progress)
    for m_key, selection, cfg in sweep_configs(config, m_keys, epochs, selections):
        run_dir = Path(runs_dir) / f"mkey{m_key}_{selection}"
        log(f"sweep: m_key={m_key} selection={selection} ({cfg['train']['epochs']} epochs) -> {run_dir}")
        run_training(cfg, cache_path, run_dir, progress=False, log=lambda _msg: None)
        mean, std = fold_f1(run_dir, threshold)
        points.append({"m_key": m_key, "selection": selection, "macro_f1": mean, "macro_f1_std": std,
                       "run": str(run_dir)})
        bar.update(1)
    bar.close()
    return points


def write_sweep(points: list[dict], out_dir: str | Path, epochs: int | None) -> Path:
    """OUT/mkey_sweep.csv and .png (error bars = std over folds) and OUT/sweep.json (the points
    by "<selection>_mkey<N>": macro_f1 and macro_f1_std, null where not finite); returns sweep.json."""
    from pipeline import plots

    out = Path(out_dir)
    plots.write_mkey_sweep(points, out / "mkey_sweep.csv", out / "mkey_sweep.png")

    def finite(x):
        return float(x) if np.isfinite(x) else None

    summary = {f"{p['selection']}_mkey{p['m_key']}": {"macro_f1": finite(p["macro_f1"]),
                                                       "macro_f1_std": finite(p["macro_f1_std"])} for p in points}
    path = out / "sweep.json"
    path.write_text(json.dumps({"points": summary, "epochs": epochs}, indent=1))
    return path
