"""One scan's diagnostic report, as in the paper's Figure 2: a self-contained HTML page and a PNG.

Contents: all m sampled slices as thumbnails with the slice-attention histogram under them; the
five highest-attention slices large, the suspicious area highlighted (see `heatmap`); the
predicted diseases with probabilities and the threshold; model and cache provenance.

The HTML embeds every image as a ``data:image/png;base64`` URI and has no external resource,
so a report can be mailed or archived as one file. Everything shown is passed in explicitly
(`ScanReport`): this module never reads DICOM, so it cannot leak a header field by accident;
patient identifiers appear only if the caller puts them into ``ScanReport.phi`` (``--show-phi``).
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.gridspec import GridSpec
from PIL import Image


@dataclass
class TopSlice:
    position: int          # position among the m sampled slices (0-based)
    slice_index: int       # index of the slice in the scan's z order (0-based)
    attention: float
    image: np.ndarray      # (H, W, 3) uint8: the slice with the heat map overlaid


@dataclass
class ScanReport:
    label: str                          # what the page calls the scan (anonymised unless --show-phi)
    attention: np.ndarray               # (m,) slice attention over the sampled slices
    slice_index: np.ndarray             # (m,) z-order index of each sampled slice
    thumbnails: np.ndarray              # (m, t, t) grey in [0, 1]
    top: list[TopSlice]                 # the five highest-attention slices, in rank order
    class_names: list[str]
    prob: np.ndarray                    # (C,) probabilities
    threshold: float
    truth: np.ndarray | None = None     # (C,) reference labels where known (NaN unknown)
    provenance: dict = field(default_factory=dict)
    phi: dict | None = None             # {"PatientName": ..., ...} only with --show-phi
    n_slices: int | None = None         # slices in the whole scan

    @property
    def findings(self) -> list[str]:
        return [name for name, p in zip(self.class_names, self.prob) if p >= self.threshold]


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W) float [0, 1] / uint8 or (H, W, 3) uint8 -> PNG bytes."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#1d2430;background:#fff}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:22px 0 8px}
.strip{display:grid;gap:2px;align-items:end}
.strip img{width:100%;display:block;image-rendering:auto;border:2px solid transparent;box-sizing:border-box}
.strip img.top{border-color:#d62728}
.bar{background:#7a9cc6;width:100%} .bar.top{background:#d62728}
.hist{margin-top:6px;height:90px;display:grid;gap:2px;align-items:end;border-bottom:1px solid #999}
.posn{font-size:9px;text-align:center;color:#555}
.large{display:grid;grid-template-columns:repeat(5,minmax(0,256px));gap:10px}
.large figure{margin:0;text-align:center;font-size:12px} .large img{width:100%;display:block}
table{border-collapse:collapse;font-size:13px} td,th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:left}
tr.positive td{font-weight:600;color:#b01515} .verdict{font-size:15px;margin:8px 0}
.prov td{font-family:ui-monospace,monospace;font-size:11px;word-break:break-all}
.note{color:#666;font-size:12px}
"""


def render_html(report: ScanReport) -> str:
    """The self-contained HTML page of one scan."""
    e = html.escape
    m = len(report.attention)
    top_positions = {t.position for t in report.top}
    peak = float(np.max(report.attention)) if m and np.max(report.attention) > 0 else 1.0
    columns = f"grid-template-columns:repeat({m},minmax(0,1fr))"
    thumbs = "".join(
        f'<img src="{data_uri(report.thumbnails[j])}" alt="sampled slice {j + 1}" '
        f'title="position {j + 1}, slice {int(report.slice_index[j]) + 1}, attention {report.attention[j]:.4f}"'
        f'{" class=top" if j in top_positions else ""}>'
        for j in range(m)
    )
    bars = "".join(
        f'<div class="bar{" top" if j in top_positions else ""}" '
        f'style="height:{max(1.0, 100 * float(report.attention[j]) / peak):.1f}%" '
        f'title="attention {report.attention[j]:.4f}"></div>'
        for j in range(m)
    )
    positions = "".join(f'<div class="posn">{j + 1}</div>' for j in range(m))
    large = "".join(
        f'<figure><img src="{data_uri(t.image)}" alt="rank {r + 1}: slice {t.slice_index + 1}">'
        f"<figcaption>#{r + 1}: slice {t.slice_index + 1} (position {t.position + 1}), "
        f"attention {t.attention:.4f}</figcaption></figure>"
        for r, t in enumerate(report.top)
    )
    rows = []
    for c, name in enumerate(report.class_names):
        p = float(report.prob[c])
        truth = ""
        if report.truth is not None and not np.isnan(report.truth[c]):
            truth = "positive" if report.truth[c] > 0.5 else "negative"
        rows.append(
            f'<tr class="{"positive" if p >= report.threshold else ""}"><td>{e(name)}</td><td>{p:.3f}</td>'
            f"<td>{'yes' if p >= report.threshold else 'no'}</td><td>{e(truth)}</td></tr>"
        )
    findings = report.findings
    verdict = (
        "This patient may have the following diseases: " + e(", ".join(findings))
        if findings
        else "No finding above the threshold."
    )
    prov = "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in report.provenance.items())
    phi = ""
    if report.phi:
        phi = "<h2>Patient (shown because --show-phi was given)</h2><table>" + "".join(
            f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in report.phi.items()
        ) + "</table>"
    n_slices = f" of {report.n_slices}" if report.n_slices else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>DrCT2 report {e(report.label)}</title>
<style>{_CSS}</style></head><body>
<h1>DrCT2 diagnostic report: {e(report.label)}</h1>
<p class="verdict">{verdict}</p>
<p class="note">Decision support only, not a diagnosis. Threshold {report.threshold:g}.</p>
{phi}
<h2>All {m} sampled slices{e(n_slices)} and the model's slice attention</h2>
<div class="strip" style="{columns}">{thumbs}</div>
<div class="hist" style="{columns}">{bars}</div>
<div class="strip" style="{columns}">{positions}</div>
<h2>The {len(report.top)} slices with the highest attention, suspicious area highlighted</h2>
<div class="large">{large}</div>
<p class="note">Highlight: last VGG16 convolution maps weighted by the model's feature attention (eq. 3) for that
slice, rectified and normalised.</p>
<h2>Predictions</h2>
<table><tr><th>class</th><th>probability</th><th>&ge; {report.threshold:g}</th><th>reference label</th></tr>
{"".join(rows)}</table>
<h2>Provenance</h2><table class="prov">{prov}</table>
</body></html>
"""


def render_png(report: ScanReport, path: str | Path, dpi: int = 100) -> Path:
    """A Figure-2-like PNG: thumbnail strip, attention histogram, top-5 overlays, predictions."""
    path = Path(path)
    m = max(1, len(report.attention))
    n_top = max(1, len(report.top))
    fig = plt.figure(figsize=(max(12, 0.42 * m), 9.2))
    grid = GridSpec(4, m, figure=fig, height_ratios=[1.0, 1.2, 4.0, 1.3], hspace=0.35, wspace=0.05)
    top_positions = {t.position for t in report.top}
    for j in range(len(report.attention)):
        ax = fig.add_subplot(grid[0, j])
        ax.imshow(report.thumbnails[j], cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_color("#d62728" if j in top_positions else "#cccccc")
            spine.set_linewidth(2 if j in top_positions else 0.5)
    ax = fig.add_subplot(grid[1, :])
    colours = ["#d62728" if j in top_positions else "#7a9cc6" for j in range(len(report.attention))]
    ax.bar(np.arange(1, len(report.attention) + 1), report.attention, color=colours, width=0.85)
    ax.set_xlim(0.5, len(report.attention) + 0.5)
    ax.set_ylabel("attention", fontsize=8)
    ax.tick_params(labelsize=7)
    sub = grid[2, :].subgridspec(1, n_top, wspace=0.05)
    for r, t in enumerate(report.top):
        ax = fig.add_subplot(sub[0, r])
        ax.imshow(t.image)
        ax.set_title(f"#{r + 1}: position {t.position + 1}, slice {t.slice_index + 1}\nattention {t.attention:.3f}", fontsize=9)
        ax.axis("off")
    ax = fig.add_subplot(grid[3, :])
    ax.axis("off")
    findings = report.findings
    verdict = (
        "This patient may have the following diseases: " + ", ".join(findings) if findings else "No finding above the threshold."
    )
    probs = "   ".join(f"{name} {float(p):.2f}" for name, p in zip(report.class_names, report.prob))
    ax.text(0, 0.75, verdict, fontsize=12, weight="bold", transform=ax.transAxes)
    ax.text(0, 0.35, f"{probs}   (threshold {report.threshold:g})", fontsize=8, transform=ax.transAxes)
    fig.suptitle(f"DrCT2 report: {report.label}", fontsize=13)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def write_report(report: ScanReport, out_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """Write <stem>.html and <stem>.png into out_dir; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path = out_dir / f"{stem}.html"
    html_path.write_text(render_html(report), encoding="utf-8")
    return html_path, render_png(report, out_dir / f"{stem}.png")
