"""The index page of a batch of reports: one row per scan, sortable by any column.

Sorting is a few lines of inline JavaScript (no external resource, like the reports): click a
column header to sort by it, click again to reverse. Probabilities sort numerically.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class IndexRow:
    label: str           # anonymised scan label (or the scan id with --show-phi)
    href: str            # relative link to the scan's HTML report
    prob: np.ndarray     # (C,)
    findings: list[str]


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


def render_index(rows: Sequence[IndexRow], class_names: Sequence[str], threshold: float, title: str = "") -> str:
    e = html.escape
    head = (
        '<th data-col="0">scan</th><th data-col="1">findings</th>'
        '<th data-col="2" data-type="num">max probability</th>'
        + "".join(f'<th data-col="{3 + c}" data-type="num">{e(n)}</th>' for c, n in enumerate(class_names))
    )
    body = []
    for row in rows:
        peak = float(np.max(row.prob)) if len(row.prob) else 0.0
        cells = "".join(
            f'<td data-v="{float(p):.6f}" class="{"hit" if p >= threshold else ""}">{float(p):.3f}</td>' for p in row.prob
        )
        body.append(
            f'<tr><td><a href="{e(row.href)}">{e(row.label)}</a></td><td>{e(", ".join(row.findings)) or "-"}</td>'
            f'<td data-v="{peak:.6f}">{peak:.3f}</td>{cells}</tr>'
        )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>DrCT2 reports {e(title)}</title>
<style>
body{{font-family:system-ui,Helvetica,Arial,sans-serif;margin:24px}} table{{border-collapse:collapse;font-size:13px}}
td,th{{padding:3px 9px;border-bottom:1px solid #ddd;text-align:left}} th{{cursor:pointer;background:#f2f4f7}}
td.hit{{color:#b01515;font-weight:600}}
</style></head><body>
<h1>DrCT2 reports {e(title)}</h1>
<p>{len(rows)} scans; threshold {threshold:g}. Click a column header to sort.</p>
<table id="scans"><thead><tr>{head}</tr></thead><tbody>
{"".join(body)}
</tbody></table>
<script>{_SCRIPT}</script>
</body></html>
"""


def write_index(path: str | Path, rows: Sequence[IndexRow], class_names: Sequence[str], threshold: float, title: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_index(rows, class_names, threshold, title), encoding="utf-8")
    return path
