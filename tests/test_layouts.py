"""One registry of dataset layouts (issue 18): pipeline/data/layouts.py is the only list of layout
names, and a layout is one module (CONTRIBUTING.md, "Add a dataset"): a toy layout registered
here, with no other file edited, is accepted by the config, guessed from its tree, indexed by
`build_scan_index` and extracted by `drct extract`."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from dicom_fixtures import write_slice

from cache.store import FeatureCache
from pipeline.config import ConfigError, load_config
from pipeline.data import layouts
from pipeline.data.index import build_scan_index
from pipeline.data.layout import IndexRequest, Layout
from pipeline.data.scan_index import ScanIndex, ScanRecord, SliceRef
from stages.cli import main
from stages.options import guess_layout

ROOT = Path(__file__).resolve().parent.parent


def literal_choices(names) -> str:
    """How pydantic words a Literal of `names`: 'a', 'b' or 'c'."""
    names = [repr(n) for n in names]
    return ", ".join(names[:-1]) + " or " + names[-1]


def test_the_registry_is_the_only_list_of_layouts():
    """The config schema, the --layout choices of extract, adapt and phantom, and the indexer offer
    exactly the registry's names, and no other source file spells out a list of them."""
    names = layouts.names()
    assert names[-1] == "folder"  # the catch-all, asked last by the guesser
    for name in names:
        assert load_config(None, {"dataset.layout": name})["dataset"]["layout"] == name
        assert layouts.get(name).name == name
    with pytest.raises(ConfigError, match=re.escape(f"Input should be {literal_choices(names)} (got 'rsn'; "
                                                    "did you mean 'rsna'?)")):
        load_config(None, {"dataset.layout": "rsn"})
    with pytest.raises(ValueError, match=re.escape(f"unknown layout 'nifti': expected one of {', '.join(names)}")):
        build_scan_index(ROOT, "nifti")

    from stages.adapt import adapt
    from stages.extract import extract
    from stages.phantom import phantom

    def choices(command) -> tuple:
        [option] = [p for p in command.params if p.name == "layout"]
        return tuple(option.type.choices)

    assert choices(extract) == choices(adapt) == names
    # the phantom writes some of the registered layouts: those it has a writer for
    from pipeline.synthetic.phantom import WRITERS

    assert choices(phantom) == layouts.phantom_names() == layouts.PHANTOM_LAYOUTS
    assert set(WRITERS) == set(layouts.PHANTOM_LAYOUTS) and set(WRITERS) < set(names)
    for name in names:
        if name in WRITERS:
            assert load_config(None, {"phantom.layout": name})["phantom"]["layout"] == name
        else:
            with pytest.raises(ConfigError, match="config key 'phantom.layout': Input should be"):
                load_config(None, {"phantom.layout": name})

    # no second list: outside the registry no literal tuple/list/set/dict names two or more layouts
    # and no comparison branches on a layout name; the phantom's own writers are the one exception
    offenders = set()
    for folder in ("pipeline", "stages", "bench", "cache"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "pipeline" / "data" / "layouts.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                items = node.keys if isinstance(node, ast.Dict) else \
                    node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else []
                if isinstance(node, ast.Compare):
                    items = [node.left, *node.comparators]
                named = {i.value for i in items if isinstance(i, ast.Constant) and i.value in names}
                if len(named) >= (1 if isinstance(node, ast.Compare) else 2):
                    offenders.add(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert {o.partition(":")[0] for o in offenders} <= {"pipeline/synthetic/phantom.py"}, sorted(offenders)


def toy_detect(root: Path) -> bool:
    return (Path(root) / "toy.json").is_file()


def toy_index(root: Path, request: IndexRequest) -> ScanIndex:
    """Each folder under root is one scan, its slices in file-name order; labels from toy.json."""
    truth = json.loads((root / "toy.json").read_text())
    index = ScanIndex(layout="toy", root=str(root), label_names=[])
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.dcm"))
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        slices = [SliceRef(str(f), float(k), str(h.SOPInstanceUID)) for k, (f, h) in enumerate(zip(files, headers))]
        index.scans.append(ScanRecord(scan_id=folder.name, patient_id=str(headers[0].PatientID), slices=slices,
                                      labels=[float(truth[folder.name])]))
    return index


TOY = Layout(name="toy", help="one folder of slices per scan + toy.json (scan labels)", detect=toy_detect,
             looks_like="this looks like a toy tree (toy.json)", index=toy_index, label_names=("bleed",))


def write_toy_tree(root: Path, n_scans: int = 3, n_slices: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for s in range(n_scans):
        for k in range(n_slices):
            write_slice(root / f"toy{s}" / f"{k}.dcm", rng.integers(900, 1200, size=(32, 32)).astype(np.int16),
                        ipp=(0.0, 0.0, 5.0 * k), instance_number=k + 1, series_uid=f"1.2.826.0.9.{s}",
                        patient_id=f"P{s}")
    (root / "toy.json").write_text(json.dumps({f"toy{s}": s % 2 for s in range(n_scans)}))
    return root


def test_a_layout_registered_by_one_line_is_configured_guessed_indexed_and_extracted(monkeypatch, tmp_path):
    """The proof the issue asks for: one module (here, TOY above) plus one registry line, and the
    config, the guesser, the indexer and `drct extract` take it with nothing else edited."""
    root = write_toy_tree(tmp_path / "toy")
    with pytest.raises(ConfigError, match="dataset.layout"):
        load_config(None, {"dataset.layout": "toy"})
    assert guess_layout(root)[0] == "folder"
    # first in the registry, so the guesser asks it before the catch-all folder layout
    monkeypatch.setattr(layouts, "LAYOUTS", {"toy": TOY, **layouts.LAYOUTS})
    assert load_config(None, {"dataset.layout": "toy"})["dataset"]["layout"] == "toy"
    assert guess_layout(root) == ("toy", "this looks like a toy tree (toy.json)")
    assert guess_layout(tmp_path)[0] == "folder"
    index = build_scan_index(root, "toy", progress=False)
    assert index.layout == "toy" and index.label_names == ["bleed"]
    assert [s.scan_id for s in index.scans] == ["toy0", "toy1", "toy2"] and [s.labels for s in index.scans] == [
        [0.0], [1.0], [0.0]]

    out = tmp_path / "features.h5"
    result = CliRunner().invoke(main, ["extract", "--data", str(root), "--out", str(out), "--workers", "0",
                                       "--resolutions", "32,48", "--weights", "random:0", "--keep-ids",
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "using --layout toy (this looks like a toy tree (toy.json))" in result.output
    with FeatureCache(out) as cache:
        assert cache.scan_ids == ["toy0", "toy1", "toy2"] and list(cache.table.n_slices) == [2, 2, 2]
        assert cache.label_names == ["bleed"]
