"""Per-scan reports (Figure 2): heat-map maths, HTML/PNG rendering, PHI, index, a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from report_fixtures import cache_from_index, run_from_cache, tiny_provenance

from pipeline.data.index import build_scan_index
from pipeline.interpret import top_positions
from pipeline.report.build import display_label, load_run_source, write_reports
from pipeline.report.heatmap import overlay, weighted_map
from pipeline.report.index import IndexRow, render_index
from stages.report import report as report_cmd

PATIENT_NAME = "Doe^Jane^Phiname"
BIRTH_DATE = "19450317"


def test_weighted_map_hand_case():
    maps = np.zeros((3, 2, 2), np.float32)
    maps[0] = [[1, 0], [0, 0]]
    maps[1] = [[0, 2], [0, 0]]
    maps[2] = [[0, 0], [5, 0]]
    got = weighted_map(maps, np.array([1.0, 1.0, -1.0]))  # relu(1, 2; -5, 0) / 2
    assert got.tolist() == [[0.5, 1.0], [0.0, 0.0]]
    assert weighted_map(np.zeros((2, 2, 2)), np.ones(2)).max() == 0
    with pytest.raises(ValueError, match="weights"):
        weighted_map(maps, np.ones(4))


def test_overlay_leaves_cold_pixels_grey():
    gray = np.full((4, 4), 0.5)
    heat = np.zeros((4, 4))
    heat[0, 0] = 1.0
    out = overlay(gray, heat, alpha=0.5, floor=0.3)
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3)
    assert out[1, 1].tolist() == [128, 128, 128]
    assert out[0, 0].tolist() == [191, 191, 64]  # 0.5*grey + 0.5*yellow


def test_display_label_hides_patient_id():
    assert display_label("CQ500-CT-427", "CQ500-CT-427") != "CQ500-CT-427"
    assert display_label("CQ500-CT-427", "CQ500-CT-427").startswith("scan-")
    assert display_label("CQ500-CT-427", "CQ500-CT-427", show_phi=True) == "CQ500-CT-427"
    assert display_label("ID_0e2c4f8c41", "ID_3d6095f6") == "ID_0e2c4f8c41"


def test_index_page_sorts_and_links():
    rows = [IndexRow("a", "scans/a.html", np.array([0.2, 0.9]), ["SDH"]), IndexRow("b", "scans/b.html", np.array([0.1, 0.3]), [])]
    page = render_index(rows, ["ICH", "SDH"], 0.5)
    assert page.count("<tr><td><a href=") == 2 and 'href="scans/a.html"' in page
    assert 'data-type="num"' in page and "addEventListener('click'" in page


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory):
    """One phantom RSNA scan whose DICOM headers carry a patient name and birth date."""
    from pipeline.synthetic.phantom import make_phantom

    root = tmp_path_factory.mktemp("phantom")
    make_phantom(root / "dicom", layout="rsna", scans=1, seed=3, size=64)
    for path in (root / "dicom" / "stage_2_train").glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.PatientName = PATIENT_NAME
        ds.PatientBirthDate = BIRTH_DATE
        ds.save_as(path)
    index = build_scan_index(root / "dicom", "rsna", workers=1, progress=False)
    provenance = tiny_provenance()
    cache = cache_from_index(index, root / "features.h5", provenance)
    return run_from_cache(root / "run", cache, index, provenance, m=8), index


def _check_reports(summary, source, out: Path, forbidden: list[str]):
    assert not summary["failed"]
    assert (out / "index.html").is_file()
    for entry, i in zip(summary["scans"], range(len(source.scan_id))):
        html_path, png_path = Path(entry["html"]), Path(entry["png"])
        assert html_path.is_file() and png_path.is_file() and png_path.read_bytes()[:4] == b"\x89PNG"
        # the five large slices are the five highest-attention positions, in rank order
        assert entry["top_positions"] == top_positions(source.slice_attention[i], 5).tolist()
        page = html_path.read_text()
        text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
        m = source.sample_idx.shape[1]
        assert len(re.findall(r'<img src="data:image/png;base64,', page)) == m + 2 * 5
        assert "http://" not in page and "https://" not in page
        for word in forbidden:
            assert word.lower() not in text.lower(), word
        index_page = (out / "index.html").read_text()
        for word in forbidden:
            assert word.lower() not in index_page.lower(), word
        assert not any(word.lower() in p.name.lower() for p in out.rglob("*") for word in forbidden)


def test_report_on_phantom_scan_has_no_phi(phantom_run, tmp_path):
    run_dir, index = phantom_run
    source = load_run_source(run_dir)
    summary = write_reports(source, tmp_path / "out")
    scan = index.scans[0]
    _check_reports(summary, source, tmp_path / "out", ["Doe", "Phiname", BIRTH_DATE, scan.patient_id])
    page = Path(summary["scans"][0]["html"]).read_text()
    assert scan.scan_id in page  # the study id is not the PatientID: shown
    for name, p in zip(source.label_names, source.prob[0]):
        assert f"<td>{name}</td><td>{p:.3f}</td>" in page


def test_show_phi_flag_shows_patient(phantom_run, tmp_path):
    run_dir, _ = phantom_run
    result = CliRunner().invoke(report_cmd, [str(run_dir), "--out", str(tmp_path / "o"), "--show-phi"])
    assert result.exit_code == 0, result.output
    page = next((tmp_path / "o" / "scans").glob("*.html")).read_text()
    assert "Doe^Jane^Phiname" in page and BIRTH_DATE in page


def test_report_cli_errors_are_messages(tmp_path, phantom_run):
    result = CliRunner().invoke(report_cmd, [str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "run.json" in result.output and "Traceback" not in result.output
    run_dir, _ = phantom_run
    result = CliRunner().invoke(report_cmd, [str(run_dir), "--out", str(tmp_path / "o"), "--scan", "nope"])
    assert result.exit_code == 2 and "'nope' is not among" in result.output


@pytest.fixture(scope="module")
def real_cq500_run(real_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("cq500")
    index = build_scan_index(real_data / "cq500", "cq500", labels_csv=real_data / "cq500" / "reads_subset.csv",
                             workers=1, progress=False)
    index.scans = [s for s in index.scans if s.scan_id == "CQ500-CT-427"]
    provenance = tiny_provenance()
    cache = cache_from_index(index, root / "features.h5", provenance)
    return run_from_cache(root / "run", cache, index, provenance, m=8, seed=1)


def test_report_on_real_cq500_scan(real_cq500_run, tmp_path):
    source = load_run_source(real_cq500_run)
    summary = write_reports(source, tmp_path / "out")
    _check_reports(summary, source, tmp_path / "out", ["CQ500-CT-427", "CQ500CT427", "CQ500CT 427"])
    assert summary["scans"][0]["scan"].startswith("scan-")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


_CHECK = """<script>window.addEventListener('load', function(){
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function(i){ return i.complete && i.naturalWidth > 0; }).length;
  var p = document.createElement('p'); p.id = 'imgcheck'; p.textContent = 'IMAGES ' + ok + '/' + imgs.length;
  document.body.appendChild(p);
});</script>"""


def test_html_report_renders_in_chromium(real_cq500_run, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install -y chromium)")
    source = load_run_source(real_cq500_run)
    summary = write_reports(source, tmp_path / "out")
    page = Path(summary["scans"][0]["html"])
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", _CHECK + "</body>"))
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    match = re.search(r"IMAGES (\d+)/(\d+)", result.stdout)
    assert match, f"no image check in the DOM; chromium stderr: {result.stderr[-2000:]}"
    m = source.sample_idx.shape[1]
    assert int(match.group(2)) == m + 2 * 5 and match.group(1) == match.group(2)
    json.dumps(summary)


def test_conv_maps_global_max_is_the_slice_vector():
    """The heat map's maps are the ones the cached vector is the global max of."""
    import torch

    from pipeline.features.encoder import load_encoder
    from pipeline.report.heatmap import conv_maps

    encoder, _ = load_encoder("random:0")
    x = torch.randn(2, 3, 64, 64)
    maps = conv_maps(encoder, x)
    assert maps.shape == (2, 512, 4, 4)
    with torch.inference_mode():
        vectors = encoder(x)
    torch.testing.assert_close(maps.amax(dim=(2, 3)), vectors)


def test_report_refuses_other_encoder_weights(phantom_run, tmp_path):
    run_dir, _ = phantom_run
    other = tmp_path / "run"
    shutil.copytree(run_dir, other)
    meta = json.loads((other / "run.json").read_text())
    meta["weights_digest"] = "f" * 64
    (other / "run.json").write_text(json.dumps(meta))
    result = CliRunner().invoke(report_cmd, [str(other), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "heat maps would not match" in result.output


# -- a report a reader can trust (issue 12) -------------------------------------------------------


def test_trust_banner_random_encoder_and_uniform_attention():
    from pipeline.report.build import NOT_LEARNED, trust_banner

    peaked = np.array([0.02] * 8 + [0.84])
    assert NOT_LEARNED in trust_banner({"weights": "random:0"}, peaked) and "random:0" in trust_banner({"weights": "random:0"}, peaked)
    assert trust_banner({"weights": "imagenet"}, peaked) is None
    uniform = np.full(16, 1 / 16) + np.linspace(-0.01, 0.01, 16)
    assert "near uniform" in trust_banner({"weights": "imagenet"}, uniform)
    # a batch: warned when most scans are near uniform
    assert trust_banner({"weights": "imagenet"}, np.stack([uniform] * 3)) is not None
    assert trust_banner({"weights": "imagenet"}, np.stack([np.r_[0.9, [0.1 / 15] * 15]] * 3)) is None


def test_index_shows_reference_labels_and_flags_false_negatives():
    rows = [
        IndexRow("hit", "scans/hit.html", np.array([0.9, 0.1]), ["ICH"], truth=np.array([1.0, 0.0])),
        IndexRow("missed", "scans/missed.html", np.array([0.2, 0.1]), [], truth=np.array([1.0, 0.0])),
        IndexRow("extra", "scans/extra.html", np.array([0.2, 0.8]), ["SDH"], truth=np.array([0.0, 0.0])),
    ]
    page = render_index(rows, ["ICH", "SDH"], 0.5, banner="This model has not learned usable features: x")
    assert "reference labels" in page and "agreement" in page
    assert page.count('<tr class="fn">') == 1 and 'href="scans/missed.html"' in page.split('<tr class="fn">')[1].split("</tr>")[0]
    assert "missed: ICH" in page and "extra: SDH" in page and '<td class="correct">correct</td>' in page
    assert "1 of 3 scans" in page and "1 scan(s) with a missed finding" in page
    assert 'id="banner"' in page and "not a diagnosis" in page
    # new scans (predict): no reference columns
    plain = render_index([IndexRow("n", "scans/n.html", np.array([0.2, 0.8]), ["SDH"])], ["ICH", "SDH"], 0.5)
    assert "agreement" not in plain and "No reference labels" in plain


def test_scan_page_is_decision_support_with_axis_mm_and_colour_bar(phantom_run, tmp_path):
    run_dir, _index = phantom_run
    source = load_run_source(run_dir)
    summary = write_reports(source, tmp_path / "out")
    page = Path(summary["scans"][0]["html"]).read_text()
    assert "decision support" in page.lower() and "diagnostic report" not in page.lower()
    assert 'id="banner"' in page and "has not learned usable features" in page  # random:0 encoder
    assert 'id="attention-axis"' in page and 'class="ytitle">attention' in page and 'class="uniform"' in page
    assert 'id="colour-bar"' in page and "linear-gradient(to right,#" in page
    # slice positions in mm: the sampled slices' z from the cache, relative to the scan's first slice
    z = np.asarray(source.cache.table.z[source.cache.table.rows(0)], float)
    first_top = summary["scans"][0]["top_positions"][0]
    mm = abs(z[source.sample_idx[0][first_top]] - z[0])
    assert f"z {mm:.1f} mm (position {first_top + 1})" in page
    index_page = (tmp_path / "out" / "index.html").read_text()
    assert 'id="banner"' in index_page and "reference labels" in index_page


def test_html_is_escaped_by_the_templates(phantom_run, tmp_path):
    from pipeline.report.render import render_html

    run_dir, _ = phantom_run
    source = load_run_source(run_dir)
    source.label_names = ["<script>alert(1)</script>", *source.label_names[1:]]
    summary = write_reports(source, tmp_path / "out")
    page = Path(summary["scans"][0]["html"]).read_text()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert callable(render_html)


def test_report_pages_screenshot_in_headless_chromium(phantom_run, tmp_path):
    """The scan page and the index, rendered by a real browser into PNG screenshots: the pages
    are not blank, the warning banner's colour and the activation colour map are on screen."""
    from PIL import Image

    browser = _chromium()
    if browser is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install -y chromium)")
    run_dir, _ = phantom_run
    summary = write_reports(load_run_source(run_dir), tmp_path / "out")
    for name, page in (("scan", Path(summary["scans"][0]["html"])), ("index", Path(summary["index"]))):
        shot = tmp_path / f"{name}.png"
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--no-first-run", f"--user-data-dir={tmp_path / ('profile-' + name)}", "--hide-scrollbars",
               "--window-size=1400,1600", f"--screenshot={shot}", page.as_uri()]
        result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
        assert shot.is_file(), f"no screenshot; chromium stderr: {result.stderr[-2000:]}"
        image = np.asarray(Image.open(shot).convert("RGB"))
        assert image.shape[:2] == (1600, 1400)
        colours = {tuple(c) for c in image.reshape(-1, 3)[::7]}
        assert len(colours) > 50, f"{name} page looks blank ({len(colours)} colours)"
        banner = np.all(image == (0xFF, 0xF3, 0xCD), axis=-1)  # the banner's background
        assert banner.sum() > 5000, f"{name}: the warning banner is not visible"
        if name == "scan":
            from pipeline.report.render import colour_stops

            hot = tuple(int(colour_stops()[-1][k:k + 2], 16) for k in (1, 3, 5))  # top of the colour bar
            near = np.abs(image.astype(int) - np.array(hot)).sum(axis=-1) < 30
            assert near.sum() > 20, "the activation colour bar is not on screen"


def test_control_characters_in_phi_are_escaped_in_the_html(tmp_path):
    """Issue 16, weak case: with --show-phi a NUL (or ESC, DEL, C1) byte of PatientID went raw into
    the page (autoescape only escapes <>&'"); every template value shows them as visible \\xNN."""
    from bad_inputs import retag, series

    from pipeline.report.build import read_phi
    from pipeline.report.render import ScanReport, TopSlice, render_html

    dicom = retag(series(tmp_path, "1.9.1", n=1)[0], PatientID="AB\x00CD\x1b[31m", PatientName="Doe\x7fJane\x85")
    phi = read_phi(dicom)
    assert "\x00" in phi["PatientID"]  # the header gives the byte back: the page must escape it
    grey = np.full((8, 8), 0.5)
    report = ScanReport(label="scan\x07-1", attention=np.array([0.6, 0.4]), slice_index=np.array([0, 1]),
                        thumbnails=np.stack([grey, grey]), top=[TopSlice(0, 0, 0.6, grey, grey)],
                        class_names=["ICH"], prob=np.array([0.7]), threshold=0.5, phi=phi)
    page = render_html(report)
    controls = [chr(c) for c in (*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0))]
    assert not any(c in page for c in controls)
    assert "AB\\x00CD\\x1b[31m" in page and "Doe\\x7fJane\\x85" in page and "scan\\x07-1" in page
    index_page = render_index([IndexRow("scan\x00-2<b>", "scans/a.html", np.array([0.2]), [])], ["ICH"], 0.5)
    assert "\x00" not in index_page and "scan\\x00-2&lt;b&gt;" in index_page


# -- per-class thresholds on the pages (issue 17) --------------------------------------------------

NOTE = "per-class thresholds from RUN/thresholds.json (F1-maximising on out-of-fold predictions)"


def test_per_class_thresholds_call_each_class_at_its_own(tmp_path):
    """ICH 0.4 >= its 0.3 is flagged though below 0.5; SDH 0.6 < its 0.7 is not though above 0.5."""
    from pipeline.report.render import ScanReport, TopSlice, render_html, render_png

    grey = np.full((8, 8), 0.5)
    prob, truth = np.array([0.4, 0.6]), np.array([1.0, 1.0])
    report = ScanReport(label="s", attention=np.array([0.6, 0.4]), slice_index=np.array([0, 1]),
                        thumbnails=np.stack([grey, grey]), top=[TopSlice(0, 0, 0.6, grey, grey)],
                        class_names=["ICH", "SDH"], prob=prob, threshold=[0.3, 0.7], truth=truth,
                        threshold_source=NOTE)
    assert report.findings == ["ICH"]
    page = render_html(report)
    assert "The model flags: ICH</p>" in page and NOTE in page and "<th>threshold</th><th>&ge; threshold</th>" in page
    assert '<tr class="positive"><td>ICH</td><td>0.400</td><td>0.300</td><td>yes</td>' in page
    assert '<tr class="missed"><td>SDH</td><td>0.600</td><td>0.700</td><td>no</td>' in page
    assert render_png(report, tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    index = render_index([IndexRow("s", "scans/s.html", prob, report.findings, truth=truth)], ["ICH", "SDH"],
                         [0.3, 0.7], threshold_source=NOTE)
    assert '</a></td><td>ICH</td>' in index and "missed: SDH" in index and NOTE in index
    assert 'class="hit">0.400</td>' in index and 'class="">0.600</td>' in index
    assert "&ge; 0.300" in index and "&ge; 0.700" in index
    # one threshold: the pages as before
    report.threshold = 0.5
    page = render_html(report)
    assert "threshold 0.5." in page and "<th>&ge; 0.5</th>" in page and "The model flags: SDH</p>" in page
    assert "per-class" not in render_index([IndexRow("s", "scans/s.html", prob, ["SDH"])], ["ICH", "SDH"], 0.5)


def test_report_cli_uses_the_runs_thresholds_and_threshold_overrides(phantom_run, tmp_path):
    """RUN/thresholds.json (drct evaluate --threshold-from oof) sets the pages' calls; --threshold wins."""
    from pipeline.calibration import write_thresholds

    run_dir = tmp_path / "run"
    shutil.copytree(phantom_run[0], run_dir)
    source = load_run_source(run_dir)
    names, prob = source.label_names, source.prob[0]
    # every call flips against 0.5: below 0.5 flagged at half its probability, above it not
    thresholds = np.where(prob < 0.5, prob / 2, (1 + prob) / 2)
    write_thresholds(run_dir, names, thresholds)
    for args, cut in (([], thresholds), (["--threshold", "0.5"], np.full(len(names), 0.5))):
        out = tmp_path / f"out{len(args)}"
        result = CliRunner().invoke(report_cmd, [str(run_dir), "--out", str(out), *args])
        assert result.exit_code == 0, result.output
        assert ("per-class thresholds from" in result.output) == (not args)
        page = next((out / "scans").glob("*.html")).read_text()
        flagged = [n for n, p, t in zip(names, prob, cut) if p >= t]
        assert flagged == ([n for n, p in zip(names, prob) if p < 0.5] if not args else
                           [n for n, p in zip(names, prob) if p >= 0.5])
        for n, p, t in zip(names, prob, cut):
            shown = f"<td>{t:.3f}</td>" if not args else ""
            assert f"<td>{n}</td><td>{p:.3f}</td>{shown}<td>{'yes' if p >= t else 'no'}</td>" in page
        assert ("thresholds.json (F1-maximising" in page) == (not args)
        assert f"</a></td><td>{', '.join(flagged) or '-'}</td>" in (out / "index.html").read_text()


def test_report_cli_refuses_a_corrupt_thresholds_file(phantom_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(phantom_run[0], run_dir)
    for text in ("{not json", '{"thresholds": {"any": 0.3}}'):
        (run_dir / "thresholds.json").write_text(text)
        result = CliRunner().invoke(report_cmd, [str(run_dir), "--out", str(tmp_path / "o")])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and "is not a thresholds file" in result.output
