"""Plots of the interpretability evaluation: CSV for `dvc plots`, PNG for people.

* Fig. 5  precision-recall curve per class (from out-of-fold probabilities), AP in the legend
* Fig. 6  macro-F1 against m_key, attention vs random APS selection (one point per run; error bars =
          std over folds where the point has ``macro_f1_std``)
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
from sklearn.metrics import average_precision_score, precision_recall_curve

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
    """{class: (precision, recall, average precision)} for each class with both a positive and a
    negative scan."""
    labels = np.asarray(labels, np.float64)
    prob = np.asarray(prob, np.float64)
    curves = {}
    for c, name in enumerate(label_names):
        known = ~np.isnan(labels[:, c]) & ~np.isnan(prob[:, c])
        y = labels[known, c] > 0.5
        if y.all() or not y.any():
            continue
        precision, recall, _ = precision_recall_curve(y, prob[known, c])
        curves[str(name)] = (precision, recall, float(average_precision_score(y, prob[known, c])))
    return curves


def write_pr_curves(curves: dict[str, tuple], csv_path: str | Path, png_path: str | Path) -> None:
    rows = [
        (name, f"{r:.6g}", f"{p:.6g}")
        for name, (precision, recall, *_) in curves.items()
        for p, r in zip(precision, recall)
    ]
    write_csv(csv_path, ["class", "recall", "precision"], rows)
    fig, ax = plt.subplots(figsize=(8.5, 5))
    for name, (precision, recall, *ap) in curves.items():
        label = f"{name} (AP {ap[0]:.2f})" if ap else name
        ax.step(recall, precision, where="post", label=label, linewidth=1.2)
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1.02), ylim=(0, 1.02), title="Precision-recall per class")
    if curves:
        # outside the axes: a legend never hides a curve
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, title="class (AP)")
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
    has_std = any(p.get("macro_f1_std") is not None for p in points)
    write_csv(
        csv_path,
        ["selection", "m_key", "macro_f1", "run", *(["macro_f1_std"] if has_std else [])],
        [(p["selection"], int(p["m_key"]), f"{p['macro_f1']:.6g}", p.get("run", ""),
          *([_fmt(p.get("macro_f1_std"))] if has_std else [])) for p in points],
    )
    fig, ax = plt.subplots(figsize=(7.5, 4))
    # the two selections side by side at each m_key (x dodged by +-3 % on the log axis) so that
    # their error bars do not hide each other; the legend sits outside the axes
    for selection, marker, dodge in (("attention", "o", 0.97), ("random", "s", 1.03)):
        sel = [p for p in points if p["selection"] == selection]
        if sel:
            std = [p.get("macro_f1_std") for p in sel]
            yerr = [0.0 if s is None or not np.isfinite(s) else float(s) for s in std]
            ax.errorbar([p["m_key"] * dodge for p in sel], [p["macro_f1"] for p in sel],
                        yerr=yerr if any(yerr) else None, marker=marker, capsize=4, label=f"{selection} selection")
    m_keys = sorted({int(p["m_key"]) for p in points})
    if m_keys:
        ax.set_xscale("log", base=2)
        ax.set_xticks(m_keys, [str(k) for k in m_keys])
        ax.minorticks_off()
    ax.set(xlabel="m_key (slices given to the APS network)", ylabel="Macro-F1 (mean +- std over folds)",
           title="APS slice selection")
    if points:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    _save(fig, png_path)


def _fmt(value) -> str:
    return "" if value is None or not np.isfinite(value) else f"{float(value):.6g}"


def _save(fig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
