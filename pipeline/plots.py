"""Plots of the interpretability evaluation: CSV for `dvc plots`, PNG for people.

* Fig. 5  precision-recall curve per class (from out-of-fold probabilities)
* Fig. 6  macro-F1 against m_key, attention vs random APS selection (one point per run)
* Fig. 7  how often each sampled-slice position is among a scan's top-5 attention

Each figure is a tidy CSV (one row per point, long format so `dvc plots` can draw it with
x/y/template fields) plus a PNG made with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import precision_recall_curve

from cache import csv_safe


def write_csv(path: str | Path, header: Sequence[str], rows) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv_safe.writer(handle)
        writer.writerow(list(header))
        writer.writerows(rows)
    return path


def pr_curves(labels: np.ndarray, prob: np.ndarray, label_names: Sequence[str]) -> dict[str, tuple]:
    """{class: (precision, recall)} for each class with both a positive and a negative scan."""
    labels = np.asarray(labels, np.float64)
    prob = np.asarray(prob, np.float64)
    curves = {}
    for c, name in enumerate(label_names):
        known = ~np.isnan(labels[:, c]) & ~np.isnan(prob[:, c])
        y = labels[known, c] > 0.5
        if y.all() or not y.any():
            continue
        precision, recall, _ = precision_recall_curve(y, prob[known, c])
        curves[str(name)] = (precision, recall)
    return curves


def write_pr_curves(curves: dict[str, tuple], csv_path: str | Path, png_path: str | Path) -> None:
    rows = [
        (name, f"{r:.6g}", f"{p:.6g}")
        for name, (precision, recall) in curves.items()
        for p, r in zip(precision, recall)
    ]
    write_csv(csv_path, ["class", "recall", "precision"], rows)
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, (precision, recall) in curves.items():
        ax.plot(recall, precision, label=name, linewidth=1.2)
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1.02), ylim=(0, 1.02), title="Precision-recall per class")
    if curves:
        ax.legend(fontsize=7, loc="lower left")
    else:
        ax.text(0.5, 0.5, "no class with both positive and negative scans", ha="center", transform=ax.transAxes)
    _save(fig, png_path)


def write_position_histogram(counts: Sequence[int], csv_path: str | Path, png_path: str | Path, k: int = 5) -> None:
    """Fig. 7; positions are written 1-based like the paper's slice numbers."""
    counts = [int(c) for c in counts]
    write_csv(csv_path, ["position", "count"], [(i + 1, c) for i, c in enumerate(counts)])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(np.arange(1, len(counts) + 1), counts, color="#3b6ea5")
    ax.set(xlabel="Position among the sampled slices", ylabel="Count", title=f"Top-{k} attention positions")
    _save(fig, png_path)


def write_mkey_sweep(points: Sequence[dict], csv_path: str | Path, png_path: str | Path) -> None:
    """Fig. 6: points are {"m_key", "selection" (attention|random), "macro_f1", "run"}."""
    points = sorted(points, key=lambda p: (p["selection"], p["m_key"]))
    write_csv(
        csv_path,
        ["selection", "m_key", "macro_f1", "run"],
        [(p["selection"], int(p["m_key"]), f"{p['macro_f1']:.6g}", p.get("run", "")) for p in points],
    )
    fig, ax = plt.subplots(figsize=(6, 4))
    for selection, marker in (("attention", "o"), ("random", "s")):
        sel = [p for p in points if p["selection"] == selection]
        if sel:
            ax.plot([p["m_key"] for p in sel], [p["macro_f1"] for p in sel], marker=marker, label=selection)
    ax.set(xlabel="m_key (slices given to the APS network)", ylabel="Macro-F1", title="APS slice selection")
    if points:
        ax.legend()
    _save(fig, png_path)


def _save(fig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
