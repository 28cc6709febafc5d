"""What a stage's outputs depend on besides its data: the first-party code it can run (the import
closure of its command modules) and the resolved config sections it reads, as small JSON files.

Why: DVC lists every dependency of every stage as a column of `dvc exp show` (issue 17: at most
40 columns), and a hand-written list of source files per stage drifts from the imports. The
`fingerprint` stage depends on the whole tree (pipeline/, stages/, cache/, configs/) and is
cheap; the expensive stages (adapt, extract, train, sweep) depend on its small JSON files
instead, which change only when their own closure or config does, so DVC still reruns only them.

The graph is read with `ast` (every import statement, lazy ones too) plus the
"package.module:attribute" strings of the registries (pipeline/lazy.py). A module inside a
subpackage (pipeline/features/encoder.py) brings its whole package folder, templates included;
a top-level module (pipeline/config.py) brings only its own file and its packages' __init__.py.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import NamedTuple

from pipeline.config import DEFAULTS_PATH, deep_merge, read_yaml, validate_config

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = DEFAULTS_PATH.relative_to(ROOT).as_posix()  # configs/defaults.yaml, read from the tree hashed
FIRST_PARTY = ("pipeline", "stages", "cache")

# Modules in a closure that change no output: the run summaries only report (timings, counts).
# Rewording them must not rerun hours of feature extraction.
NO_OUTPUT_EFFECT = ("pipeline.run_summary",)


class Manifest(NamedTuple):
    """One fingerprint file: the command modules whose closure it hashes, the config sections it
    resolves (merged with the defaults), files whose bytes it hashes, and the packages the
    closure reaches only to validate names (`not_run`, see VALIDATORS), whose code never runs."""

    roots: tuple[str, ...]
    sections: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    not_run: tuple[str, ...] = ()


# The modules that import a registry only to check the names a config or a flag gives
# (pipeline/config.py validates model.name against the heads and dataset.layout against the
# layouts; stages/options.py lists the layouts for --layout). Through them every config reader
# "imports" every head and every reader; `not_run` cuts those edges and nothing else
# (tests/test_fingerprint.py checks that no other module of a closure reaches a cut package).
VALIDATORS = ("pipeline.config", "stages.options")

# The DVC pipeline's fingerprints. Stage one's holds its sections merged with the defaults, so a
# head default in configs/defaults.yaml never reruns extraction; the heads hash the defaults file.
MANIFESTS = {
    "stage_one.json": Manifest(("stages.extract", "stages.adapt"), ("dataset", "extract", "adapt"),
                               not_run=("pipeline.heads", "pipeline.training")),
    "heads.json": Manifest(("stages.train", "stages.sweep"), files=(DEFAULTS,), not_run=("pipeline.data",)),
}

_REGISTRY_ENTRY = re.compile(r"^((?:{})(?:\.\w+)+)(?::\w+)?$".format("|".join(FIRST_PARTY)))


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Absolute module names imported anywhere in a file (relative imports resolved)."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    return set(_imports_in(path.read_text(), package))


def registry_entries(path: Path) -> set[str]:
    """Modules a file names in "package.module:attribute" strings (imported on use, pipeline/lazy.py)."""
    return set(_registry_in(path.read_text()))


@functools.cache
def _imports_in(text: str, package: str) -> frozenset[str]:
    # cached by content: the tests compute many fingerprints of one tree, editing a file at a time
    found: set[str] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # `from pipeline.data import rsna` imports the submodule pipeline.data.rsna.
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return frozenset(found)


@functools.cache
def _registry_in(text: str) -> frozenset[str]:
    return frozenset(match.group(1) for node in ast.walk(ast.parse(text))
                     if isinstance(node, ast.Constant) and isinstance(node.value, str)
                     and (match := _REGISTRY_ENTRY.match(node.value)))


def module_files(root: Path = ROOT, packages=FIRST_PARTY) -> dict[str, Path]:
    return {module_name(path, root): path for package in packages for path in sorted((root / package).rglob("*.py"))
            if "__pycache__" not in path.parts}


def module_graph(root: Path = ROOT, packages=FIRST_PARTY, with_registries: bool = False) -> dict[str, set[str]]:
    """First-party module -> the first-party modules it imports (anywhere in the file).

    `from pipeline.data import rsna` is an edge to pipeline.data and to pipeline.data.rsna;
    `from cache.store import write_cache` one to cache.store (write_cache is no module). The
    parent packages a dotted import runs implicitly (cache/__init__.py for cache.store) are no
    edges: a package that imports its own submodules is no circle. `with_registries` adds the
    modules named by registry strings (what runs, rather than what is imported)."""
    files = module_files(root, packages)
    graph = {}
    for name, path in files.items():
        named = imported_modules(path, root) | (registry_entries(path) if with_registries else set())
        graph[name] = {m for m in named if m in files and m != name}
    return graph


def inside(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def closure(roots, graph: dict[str, set[str]], not_run=()) -> set[str]:
    """The roots and every module they reach, minus the modules that change no output and the
    packages in `not_run`."""
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name in NO_OUTPUT_EFFECT or inside(name, *not_run):
            continue
        seen.add(name)
        todo.extend(graph.get(name, ()))
    return seen


def source_files(modules, root: Path = ROOT) -> list[Path]:
    """The files `modules` run or read: each module's file, its packages' __init__.py and, for a
    module inside a subpackage, every file of that subpackage's folder (data files included)."""
    files = module_files(root)
    found: set[Path] = set()
    for name in modules:
        parts = name.split(".")
        for depth in range(1, len(parts)):  # the __init__.py of every enclosing package
            init = root.joinpath(*parts[:depth], "__init__.py")
            if init.is_file():
                found.add(init)
        found.add(files[name])
        if len(parts) >= 3 or (len(parts) == 2 and files[name].name == "__init__.py"):
            package = root.joinpath(*parts[:2])
            found.update(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                         and p.suffix != ".pyc")
    return sorted(found)


def reached_only_to_validate(spec: Manifest, graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """The edges into a `not_run` package from a module of the closure other than VALIDATORS: each
    one would be code that runs but is not hashed (empty when the cut is sound)."""
    return sorted((name, target) for name in closure(spec.roots, graph, spec.not_run) if name not in VALIDATORS
                  for target in graph.get(name, ()) if inside(target, *spec.not_run))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(spec: Manifest, config_path=None, root: Path = ROOT) -> dict:
    """{"code": {relative path: sha256}, "config": {section: resolved values}, "files": {...}};
    the same tree and config give the same dict on any machine and in any folder."""
    graph = module_graph(root, with_registries=True)
    unknown = [r for r in spec.roots if r not in graph]
    if unknown:
        raise ValueError(f"no such first-party module: {', '.join(unknown)}")
    modules = closure(spec.roots, graph, spec.not_run)
    code = {p.relative_to(root).as_posix(): _sha256(p) for p in source_files(modules, root)}
    config = {}
    if spec.sections:  # as pipeline.config.load_config, with the defaults of the tree hashed
        config = validate_config(deep_merge(read_yaml(root / DEFAULTS), read_yaml(config_path) if config_path else {}))
    return {
        "roots": sorted(spec.roots),
        "code": code,
        "config": {section: config[section] for section in spec.sections},
        "files": {name: _sha256(root / name) for name in spec.files},
    }


def write_manifests(out_dir, config_path, root: Path = ROOT) -> dict[str, Path]:
    """Write MANIFESTS into out_dir; a file whose content is unchanged is left untouched."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, spec in MANIFESTS.items():
        text = json.dumps(manifest(spec, config_path, root), indent=1, sort_keys=True) + "\n"
        path = out_dir / name
        if not path.is_file() or path.read_text() != text:
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(text)
            tmp.replace(path)
        written[name] = path
    return written
