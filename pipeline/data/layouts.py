"""The dataset layouts `dataset.layout` can select: one line each, name -> "module:LAYOUT" (a
Layout, pipeline/data/layout.py). The one list: the config schema, `drct extract --layout`,
`drct adapt --layout`, the layout guesser and `build_scan_index` read it. Adding a layout = its
module + one line here (CONTRIBUTING.md, "Add a dataset").

The order is that of every list of layouts (--help, messages) and the guesser's: it takes the
first layout whose `detect` says yes (a tree with both RSNA and CQ500 markers is guessed rsna),
so the catch-all `folder` comes last. No DICOM import here: the CLI lists the names in --help
and the config schema checks them; a layout's module is imported only when the layout is used.
An entry may also be a Layout itself (a test registering a toy layout).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.lazy import resolve

LAYOUTS: dict[str, object] = {
    "rsna": "pipeline.data.rsna:LAYOUT",  # RSNA 2019 ICH: flat ID_*.dcm + stage_2_train.csv
    "cq500": "pipeline.data.cq500:LAYOUT",  # CQ500 (qure.ai): patient folders + reads.csv
    "folder": "pipeline.data.folder:LAYOUT",  # any DICOM series, no labels (detects everything)
}

# The registered layouts `drct phantom` can write (pipeline/synthetic/phantom.py has a writer for
# each; tests/test_layouts.py checks both agree), in the order `drct phantom --layout` lists them.
PHANTOM_LAYOUTS = ("rsna", "cq500")


def names() -> tuple[str, ...]:
    """The registered layout names, in registry (guessing) order."""
    return tuple(LAYOUTS)


def phantom_names() -> tuple[str, ...]:
    """The layouts the phantom writes that are registered (`drct phantom --layout`, phantom.layout)."""
    return tuple(name for name in PHANTOM_LAYOUTS if name in LAYOUTS)


def get(name: str):
    """The Layout registered as `name`; ValueError naming the registered layouts."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}: expected one of {', '.join(LAYOUTS)}")
    return resolve(LAYOUTS[name])


def guess(root: str | Path) -> tuple[str, str]:
    """(layout, why) of the tree at root: the first registered layout whose `detect` says yes."""
    for name in LAYOUTS:
        layout = get(name)
        if layout.detect(Path(root)):
            return name, layout.looks_like
    raise ValueError(f"no registered layout ({', '.join(LAYOUTS)}) recognises {root}")
