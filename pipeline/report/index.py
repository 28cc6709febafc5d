"""The index page of a batch of reports: one row per scan, sortable by any column.

Where reference labels are known (a trained run's out-of-fold predictions), each row shows them,
whether the model's calls agree, and flags false negatives (a missed finding is what a reader
must not overlook). Rendered from templates/index.html.j2. Sorting is a few lines of inline
JavaScript (no external resource, like the reports): click a column header to sort by it, click
again to reverse. Probabilities sort numerically. With per-class thresholds each class's threshold
stands under its name and a probability at or above it is marked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.report.render import class_thresholds, render_template, threshold_text


@dataclass
class IndexRow:
    label: str           # anonymised scan label (or the scan id with --show-phi)
    href: str            # relative link to the scan's HTML report
    prob: np.ndarray     # (C,)
    findings: list[str]
    truth: np.ndarray | None = None  # (C,) reference labels, NaN unknown; None: no labels


def agreement(row: IndexRow, class_names: Sequence[str], threshold: float | Sequence[float]) -> dict:
    """{known, missed (false-negative classes), extra (false-positive classes)} of one row."""
    if row.truth is None:
        return {"known": False, "missed": [], "extra": []}
    truth = np.asarray(row.truth, np.float64)
    known = ~np.isnan(truth)
    called = np.asarray(row.prob) >= class_thresholds(threshold, len(class_names))
    positive = np.nan_to_num(truth) > 0.5
    missed = [n for n, k, c, t in zip(class_names, known, called, positive) if k and t and not c]
    extra = [n for n, k, c, t in zip(class_names, known, called, positive) if k and c and not t]
    return {"known": bool(known.any()), "missed": missed, "extra": extra}


_SCRIPT = """
document.querySelectorAll('th[data-col]').forEach(function(th){
  th.addEventListener('click', function(){
    var table = th.closest('table'), body = table.tBodies[0], col = +th.dataset.col;
    var numeric = th.dataset.type === 'num', asc = th.dataset.order !== 'asc';
    th.dataset.order = asc ? 'asc' : 'desc';
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function(a, b){
      var x = a.cells[col].dataset.v || a.cells[col].textContent, y = b.cells[col].dataset.v || b.cells[col].textContent;
      var r = numeric ? (parseFloat(x) - parseFloat(y)) : x.localeCompare(y);
      return asc ? r : -r;
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
"""


def render_index(rows: Sequence[IndexRow], class_names: Sequence[str], threshold: float | Sequence[float],
                 title: str = "", banner: str | None = None, threshold_source: str | None = None) -> str:
    """`threshold`: one for every class or one per class; `threshold_source` says where per-class ones came from."""
    thresholds = class_thresholds(threshold, len(class_names))
    has_truth = any(r.truth is not None for r in rows)
    view, n_known, n_correct, n_fn = [], 0, 0, 0
    for row in rows:
        a = agreement(row, class_names, threshold)
        truth_text, text, css = "", "", ""
        if a["known"]:
            n_known += 1
            truth = np.asarray(row.truth, np.float64)
            truth_text = ", ".join(n for n, t in zip(class_names, truth) if t > 0.5) or "none"
            parts = ([f"missed: {', '.join(a['missed'])}"] if a["missed"] else []) + (
                [f"extra: {', '.join(a['extra'])}"] if a["extra"] else [])
            text, css = ("; ".join(parts), "wrong") if parts else ("correct", "correct")
            n_correct += not parts
            n_fn += bool(a["missed"])
        elif row.truth is not None:
            truth_text, text = "unknown", "-"
        view.append({"label": row.label, "href": row.href, "findings": list(row.findings),
                     "cells": [(float(p), bool(p >= t)) for p, t in zip(row.prob, thresholds)],
                     "peak": float(np.max(row.prob)) if len(row.prob) else 0.0, "truth_text": truth_text,
                     "agreement": text, "agreement_css": css, "missed": bool(a["missed"])})
    return render_template("index.html.j2", rows=view, class_names=list(class_names), thresholds=thresholds.tolist(),
                           per_class=np.ndim(threshold) > 0, threshold_text=threshold_text(threshold, threshold_source),
                           title=title, banner=banner, has_truth=has_truth, n_known=n_known, n_correct=n_correct,
                           n_fn=n_fn, first_num=4 if has_truth else 2, script=_SCRIPT)


def write_index(path: str | Path, rows: Sequence[IndexRow], class_names: Sequence[str],
                threshold: float | Sequence[float], title: str = "", banner: str | None = None,
                threshold_source: str | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_index(rows, class_names, threshold, title, banner, threshold_source), encoding="utf-8")
    return path
