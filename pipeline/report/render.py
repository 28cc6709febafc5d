"""One scan's decision-support page, as in the paper's Figure 2: a self-contained HTML page and a PNG.

Contents: a warning banner when the model cannot have learned usable features (random encoder,
near-uniform slice attention); all m sampled slices as thumbnails with the slice-attention bar
chart (axis, uniform-attention line, slice positions in mm) under them; the five highest-attention
slices large, each beside its activation map with a colour bar (see `heatmap`); the model's
calls with probabilities, threshold (one, or one per class from the run's thresholds.json) and
reference labels; model and cache provenance.

The HTML comes from the Jinja2 templates in ``templates/`` (autoescaped) and embeds every image as
a ``data:image/png;base64`` URI with no external resource, so a report can be mailed or archived
as one file. Everything shown is passed in explicitly (`ScanReport`): this module never reads
DICOM, so it cannot leak a header field by accident; patient identifiers appear only if the
caller puts them into ``ScanReport.phi`` (``--show-phi``).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colormaps
from matplotlib.gridspec import GridSpec
from PIL import Image

TEMPLATES = Path(__file__).resolve().parent / "templates"
HEAT_CMAP = "inferno"


def class_thresholds(threshold: float | Sequence[float], n: int) -> np.ndarray:
    """One threshold or one per class (in class order) -> (n,) array: every call on a page is
    ``prob >= class_thresholds(...)``, so the pages agree with predictions.csv."""
    values = np.asarray(threshold, np.float64)
    if values.ndim == 0:
        return np.full(n, float(values))
    if values.shape != (n,):
        raise ValueError(f"{values.size} thresholds for {n} classes")
    return values


def threshold_text(threshold: float | Sequence[float], source: str | None = None,
                   names: Sequence[str] | None = None) -> str:
    """How the pages name their threshold: "threshold 0.5", or where the per-class ones came from
    (with `names`, followed by each class's value)."""
    if np.ndim(threshold) == 0:
        return f"threshold {float(threshold):g}"
    text = source or "per-class thresholds"
    return text + (": " + ", ".join(f"{n} {t:.3f}" for n, t in zip(names, threshold)) if names is not None else "")


@dataclass
class TopSlice:
    position: int          # position among the m sampled slices (0-based)
    slice_index: int       # index of the slice in the scan's z order (0-based)
    attention: float
    raw: np.ndarray        # (H, W) grey in [0, 1]: the slice in the brain window
    heat: np.ndarray       # (H, W) activation map in [0, 1] (0 outside the head)
    z_mm: float | None = None  # position along the slice normal, mm from the scan's first slice


@dataclass
class ScanReport:
    label: str                          # what the page calls the scan (anonymised unless --show-phi)
    attention: np.ndarray               # (m,) slice attention over the sampled slices
    slice_index: np.ndarray             # (m,) z-order index of each sampled slice
    thumbnails: np.ndarray              # (m, t, t) grey in [0, 1]
    top: list[TopSlice]                 # the five highest-attention slices, in rank order
    class_names: list[str]
    prob: np.ndarray                    # (C,) probabilities
    threshold: float | Sequence[float]  # one for every class, or (C,) one per class
    truth: np.ndarray | None = None     # (C,) reference labels where known (NaN unknown)
    provenance: dict = field(default_factory=dict)
    phi: dict | None = None             # {"PatientName": ..., ...} only with --show-phi
    n_slices: int | None = None         # slices in the whole scan
    z_mm: np.ndarray | None = None      # (m,) position of each sampled slice, mm from the scan's first slice
    banner: str | None = None           # why this model's output is not to be trusted, if it is not
    threshold_source: str | None = None  # where per-class thresholds came from (shown on the page)

    @property
    def thresholds(self) -> np.ndarray:
        return class_thresholds(self.threshold, len(self.class_names))

    @property
    def findings(self) -> list[str]:
        return [name for name, p, t in zip(self.class_names, self.prob, self.thresholds) if p >= t]


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


def heat_rgb(heat: np.ndarray) -> np.ndarray:
    """(H, W) activation in [0, 1] -> (H, W, 3) uint8 in the report's colour map."""
    return np.round(255 * colormaps[HEAT_CMAP](np.clip(np.asarray(heat, np.float32), 0, 1))[..., :3]).astype(np.uint8)


def colour_stops(n: int = 11) -> list[str]:
    """CSS colours of the colour bar, sampled from the same colour map as the activation images."""
    rgb = heat_rgb(np.linspace(0, 1, n)[None])[0]
    return [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in rgb]


def attention_ticks(peak: float) -> list[dict]:
    """Three y-axis ticks (0, half, peak) of the attention bar chart as {pct, text}."""
    return [{"pct": 100.0 * f, "text": f"{peak * f:.3f}"} for f in (0.0, 0.5, 1.0)]


# C0 controls but tab, line feed and carriage return; DEL; the C1 controls.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0))}


def escape_controls(value):
    """A template value with its control characters written as visible ``\\xNN`` text (a NUL or an
    ESC from a header tag such as PatientID would otherwise go raw into the page: autoescape only
    escapes ``<>&'"``). Applied to every ``{{ ... }}`` output, before autoescaping."""
    return value.translate(_CONTROL) if isinstance(value, str) else value


@lru_cache(maxsize=1)
def _environment():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    return Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html", "j2"]),
                       undefined=StrictUndefined, trim_blocks=False, finalize=escape_controls)


def render_template(name: str, **context) -> str:
    return _environment().get_template(name).render(**context)


def _mm(values, j) -> float | None:
    return None if values is None or not np.isfinite(values[j]) else float(values[j])


def render_html(report: ScanReport) -> str:
    """The self-contained HTML page of one scan (templates/report.html.j2)."""
    m = len(report.attention)
    top_positions = {t.position for t in report.top}
    peak = float(np.max(report.attention)) if m and np.max(report.attention) > 0 else 1.0
    slices = [
        {"n": j + 1, "slice": int(report.slice_index[j]) + 1, "attention": float(report.attention[j]),
         "mm": _mm(report.z_mm, j), "top": j in top_positions, "uri": data_uri(report.thumbnails[j]),
         "height": max(1.0, 100 * float(report.attention[j]) / peak)}
        for j in range(m)
    ]
    top = [
        {"rank": r + 1, "slice": t.slice_index + 1, "position": t.position + 1, "attention": t.attention,
         "mm": t.z_mm, "raw": data_uri(t.raw), "heat": data_uri(heat_rgb(t.heat))}
        for r, t in enumerate(report.top)
    ]
    rows, thresholds = [], report.thresholds
    for c, name in enumerate(report.class_names):
        p = float(report.prob[c])
        called = p >= thresholds[c]
        truth = ""
        css = "positive" if called else ""
        if report.truth is not None and not np.isnan(report.truth[c]):
            positive = report.truth[c] > 0.5
            truth = "positive" if positive else "negative"
            if positive and not called:
                truth, css = "positive (missed by the model)", "missed"
        rows.append({"name": name, "prob": p, "threshold": float(thresholds[c]), "call": "yes" if called else "no",
                     "truth": truth, "css": css})
    return render_template(
        "report.html.j2", r=report, m=m, slices=slices, top=top, rows=rows, yticks=attention_ticks(peak),
        uniform_pct=min(100.0, 100.0 / max(m, 1) / peak), colour_stops=colour_stops(),
        has_mm=report.z_mm is not None, per_class=np.ndim(report.threshold) > 0,
        threshold_text=threshold_text(report.threshold, report.threshold_source),
    )


def _montage(images: list[np.ndarray], gap: int = 2) -> np.ndarray:
    """(H, W, 3) uint8 images of one height side by side with white gaps (one axes draws them all:
    a subplot per image costs matplotlib ~60 ms each)."""
    spacer = np.full((images[0].shape[0], gap, 3), 255, np.uint8)
    parts = []
    for k, image in enumerate(images):
        parts += [spacer, image] if k else [image]
    return np.concatenate(parts, axis=1)


def _grey_rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(np.round(np.clip(np.asarray(image, np.float32), 0, 1) * 255).astype(np.uint8)[..., None], 3, -1)


def render_png(report: ScanReport, path: str | Path, dpi: int = 100) -> Path:
    """A Figure-2-like PNG: thumbnail strip, attention bars (axis in mm where known), the top-k
    slices each beside its activation map with a colour bar, the model's calls."""
    from matplotlib.patches import Rectangle

    path = Path(path)
    m = len(report.attention)
    fig = plt.figure(figsize=(14, 8.6))
    grid = GridSpec(5, 2, figure=fig, height_ratios=[0.45, 1.0, 1.3, 3.4, 1.1], width_ratios=[1, 0.015],
                    hspace=0.5, wspace=0.03)
    top_positions = {t.position for t in report.top}
    banner = fig.add_subplot(grid[0, 0])
    banner.axis("off")
    if report.banner:
        banner.text(0.5, 0.5, report.banner, ha="center", va="center", fontsize=9, wrap=True, color="#5c4000",
                    bbox={"facecolor": "#fff3cd", "edgecolor": "#c98a00"}, transform=banner.transAxes)
    if m:
        ax = fig.add_subplot(grid[1, 0])
        size, gap = report.thumbnails.shape[1], 2
        ax.imshow(_montage([_grey_rgb(t) for t in report.thumbnails], gap))
        for j in sorted(top_positions):
            ax.add_patch(Rectangle((j * (size + gap) - 0.5, -0.5), size, size, fill=False, edgecolor="#d62728", linewidth=2))
        ax.axis("off")
        ax = fig.add_subplot(grid[2, 0])
        colours = ["#d62728" if j in top_positions else "#7a9cc6" for j in range(m)]
        positions = np.arange(1, m + 1)
        ax.bar(positions, report.attention, color=colours, width=0.85)
        ax.axhline(1.0 / m, color="#333", linestyle="--", linewidth=0.8, label=f"uniform 1/{m}")
        ax.set_xlim(0.5, m + 0.5)
        ax.set_xticks(positions)
        if report.z_mm is not None:
            ax.set_xticklabels([f"{j}\n{z:.0f}" for j, z in zip(positions, report.z_mm)])
            ax.set_xlabel("sampled slice position / z in mm from the first slice", fontsize=8)
        else:
            ax.set_xlabel("sampled slice position", fontsize=8)
        ax.set_ylabel("slice attention", fontsize=8)
        ax.legend(fontsize=7, loc="upper right")
        ax.tick_params(labelsize=7)
    if report.top:
        ax = fig.add_subplot(grid[3, 0])
        pairs = [_montage([_grey_rgb(t.raw), heat_rgb(t.heat)], 2) for t in report.top]
        ax.imshow(_montage(pairs, 12))
        width = pairs[0].shape[1] + 12
        for r, t in enumerate(report.top):
            where = f", z {t.z_mm:.1f} mm" if t.z_mm is not None else ""
            ax.text(r * width + pairs[0].shape[1] / 2, -4, f"#{r + 1}: slice {t.slice_index + 1}{where}\n"
                    f"attention {t.attention:.3f}  (slice | activation)", ha="center", va="bottom", fontsize=8)
        ax.axis("off")
        bar = fig.colorbar(plt.cm.ScalarMappable(cmap=HEAT_CMAP), cax=fig.add_subplot(grid[3, 1]))
        bar.set_label("activation (0-1, per slice)", fontsize=7)
        bar.ax.tick_params(labelsize=7)
    ax = fig.add_subplot(grid[4, 0])
    ax.axis("off")
    findings = report.findings
    verdict = "The model flags: " + ", ".join(findings) if findings else "No finding above the threshold."
    probs = "   ".join(f"{name} {float(p):.2f}" for name, p in zip(report.class_names, report.prob))
    ax.text(0, 0.75, verdict, fontsize=12, weight="bold", transform=ax.transAxes)
    if np.ndim(report.threshold) == 0:
        ax.text(0, 0.35, f"{probs}   (threshold {float(report.threshold):g})", fontsize=8, transform=ax.transAxes)
    else:
        ax.text(0, 0.35, probs, fontsize=8, transform=ax.transAxes)
        ax.text(0, 0.05, threshold_text(report.threshold, report.threshold_source, report.class_names), fontsize=7,
                transform=ax.transAxes)
    fig.suptitle(f"DrCT2 decision support (not a diagnosis): {report.label}", fontsize=13)
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
