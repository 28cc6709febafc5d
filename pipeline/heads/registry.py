"""The heads `model.name` can select: one line each, name -> "module:SPEC" (a HeadSpec,
pipeline/heads/head.py). The one list: the config schema, `drct train --model`, departures and
bench/heads.py read it. Adding a head = its module + one line here (CONTRIBUTING.md).

No torch import: the CLI lists the names in --help and the config schema checks them; a head's
module is imported only when its spec is asked for. An entry may also be a HeadSpec itself (a
test registering a toy head).
"""

from __future__ import annotations

from pipeline.lazy import resolve

HEADS: dict[str, object] = {
    "drct1": "pipeline.heads.drct2:DRCT1",  # the primary network only (paper V.A)
    "drct2": "pipeline.heads.drct2:DRCT2",  # primary + APS + knowledge fusion (paper V)
    "pooled_logistic": "pipeline.heads.pooled_logistic:SPEC",  # baselines (issue 15): what every DrCT
    "meanpool": "pipeline.heads.meanpool:SPEC",  # figure is compared with, on the same cache, folds
    "abmil": "pipeline.heads.abmil:SPEC",  # and sampler
}


def names() -> tuple[str, ...]:
    """The registered head names, in registry order."""
    return tuple(HEADS)


def spec(name: str):
    """The HeadSpec of head `name` (case-insensitive); ValueError naming the registered heads."""
    key = str(name).lower()
    if key not in HEADS:
        raise ValueError(f"unknown model '{name}'; choose from {', '.join(HEADS)}")
    return resolve(HEADS[key])


def source(name: str) -> str:
    """The file that defines head `name` (for messages), e.g. pipeline/heads/abmil.py."""
    entry = HEADS.get(str(name).lower())
    if isinstance(entry, str):
        return entry.partition(":")[0].replace(".", "/") + ".py"
    build = getattr(entry, "build", None)
    return str(getattr(build, "__module__", "?")).replace(".", "/") + ".py"
