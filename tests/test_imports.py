"""The import structure of the whole tree (pipeline/, stages/, cache/), issue 18's house rules:

* no import circle anywhere among first-party modules;
* the cache (cache/, the contract between stage one and stage two) is a leaf: it imports
  nothing from `pipeline` or `stages`;
* the library (pipeline/, cache/) never imports the commands (`stages`);
* the made-up data (pipeline/synthetic: the phantom, the synthetic and planted caches) is
  imported only by itself and by the commands (`drct phantom`), besides tests and benchmarks;
* stage two (heads, training, evaluation, ...) reaches stage one's features only through the
  cache contract, never by importing `pipeline.features`.

Parsed with `ast` (every import statement, including those inside functions), so a lazy
import cannot hide a dependency or a circle.
"""

from __future__ import annotations

from pipeline.fingerprint import ROOT, imported_modules, inside, module_graph, module_name

# The graph (every import statement, lazy ones too, read with ast) is pipeline/fingerprint.py's,
# which the DVC pipeline also uses to know what code a stage runs.


def importers(graph: dict[str, set[str]], prefix: str) -> dict[str, list[str]]:
    """{module: [the modules named `prefix` or under it that it imports]}, for those that do."""
    hits = {name: sorted(m for m in deps if inside(m, prefix)) for name, deps in graph.items()}
    return {name: mods for name, mods in hits.items() if mods}


# Import circles that are known and accepted for now, each as the sorted tuple of its modules.
# (Issue 18 removed stages.interpret <-> stages.sweep: their shared code is now pipeline/sweep.py.)
# (Issue 18 also removed pipeline.training.rundir <-> pipeline.training.checkpoint: the atomic
# writers are pipeline/training/atomic.py now, which both import.)
KNOWN_CIRCLES: set[tuple[str, ...]] = set()

# Stage two: the packages and modules that train, evaluate and interpret heads from a cache.
STAGE_TWO = ("pipeline.heads", "pipeline.training", "pipeline.evaluation", "pipeline.interpret",
             "pipeline.metrics", "pipeline.calibration", "pipeline.oof", "pipeline.readers", "pipeline.plots",
             "pipeline.sweep", "pipeline.departures", "pipeline.presets", "pipeline.export")
# Stage-two modules that need stage one's code itself, not only its vectors: the report draws
# Grad-CAM heatmaps with the encoder and the preprocessing (issue 18: they stay).
STAGE_TWO_NEEDS_THE_ENCODER = ("pipeline.report",)


def find_cycle(graph: dict[str, set[str]], known: set[tuple[str, ...]] = frozenset()) -> list[str] | None:
    """One import circle of `graph` as a list of modules (first repeated last), or None.
    Circles in `known` (the sorted tuple of their modules) are skipped."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                if tuple(sorted(stack[stack.index(nxt) :])) in known:
                    continue
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle_anywhere():
    graph = module_graph()
    assert {"pipeline.training.trainer", "stages.cli", "cache.store"} <= set(graph)  # the whole tree
    cycle = find_cycle(graph, KNOWN_CIRCLES)
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"
    for known in KNOWN_CIRCLES:  # an exception that no longer holds is dropped from the list
        sub = {name: graph.get(name, set()) & set(known) for name in known}
        assert find_cycle(sub), f"{' <-> '.join(known)} is no circle any more: drop it from KNOWN_CIRCLES"


def test_cache_imports_nothing_from_pipeline_or_stages():
    graph = module_graph()
    cache = {name: deps for name, deps in graph.items() if inside(name, "cache")}
    assert {**importers(cache, "pipeline"), **importers(cache, "stages")} == {}
    # also names that are no module of the tree (the graph keeps only existing modules)
    for path in sorted((ROOT / "cache").rglob("*.py")):
        assert not {m for m in imported_modules(path) if inside(m, "pipeline", "stages")}, path


def test_the_library_never_imports_the_commands():
    graph = module_graph()
    library = {name: deps for name, deps in graph.items() if inside(name, "pipeline", "cache")}
    assert importers(library, "stages") == {}


def test_only_the_commands_import_the_synthetic_data():
    graph = module_graph()
    outside = {name: deps for name, deps in graph.items() if not inside(name, "pipeline.synthetic", "stages")}
    assert importers(outside, "pipeline.synthetic") == {}
    assert "pipeline.synthetic.phantom" in graph["stages.phantom"]  # the rule is not vacuous


def test_stage_two_reaches_stage_one_only_through_the_cache():
    graph = module_graph()
    stage_two = {name: deps for name, deps in graph.items() if inside(name, *STAGE_TWO)}
    assert "pipeline.training.trainer" in stage_two and "pipeline.heads.drct2" in stage_two
    assert importers(stage_two, "pipeline.features") == {}
    # the one known exception is still needed (drop it from STAGE_TWO_NEEDS_THE_ENCODER when it is not)
    report = {name: deps for name, deps in graph.items() if inside(name, *STAGE_TWO_NEEDS_THE_ENCODER)}
    assert importers(report, "pipeline.features")


def test_pipeline_data_has_no_import_circle():
    paths = sorted((ROOT / "pipeline" / "data").glob("*.py"))
    names = {module_name(path) for path in paths}
    graph = {module_name(path): {m for m in imported_modules(path) if m in names} for path in paths}
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"
    # The dispatcher reaches the readers through the layout registry, which imports them by name
    # when used (an edge the graph cannot see, hence the checks): the registry imports no
    # first-party module, the readers import the shared helpers, never the dispatcher or registry.
    from pipeline.data import layouts

    assert "pipeline.data.layouts" in graph["pipeline.data.index"] and graph["pipeline.data.layouts"] == set()
    for entry in layouts.LAYOUTS.values():
        reader = entry.partition(":")[0]
        assert "pipeline.data.series" in graph[reader], reader
        assert not {"pipeline.data.index", "pipeline.data.layouts"} & graph[reader], reader


def test_checker_sees_lazy_and_relative_imports_and_circles(tmp_path):
    # The checker itself must see circles (including lazy imports), or the tests above prove nothing.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"a"}}, known={("a", "b")}) is None
    assert find_cycle({"a": {"b"}, "b": {"a", "c"}, "c": {"b"}}, known={("a", "b")}) == ["b", "c", "b"]
    probe = tmp_path / "pkg" / "sub" / "mod.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("def f():\n    from pipeline.data.index import build_scan_index\nfrom . import other\n")
    assert {"pipeline.data.index", "pkg.sub.other"} <= imported_modules(probe, root=tmp_path)


def test_graph_sees_circles_and_forbidden_imports_in_a_tree(tmp_path):
    # A small tree with each kind of breakage the rules above forbid, in lazy imports too.
    files = {
        "pipeline/__init__.py": "",
        "pipeline/a.py": "def f():\n    from pipeline import b\n",
        "pipeline/b.py": "from pipeline.a import f\n",
        "pipeline/synthetic/__init__.py": "",
        "pipeline/synthetic/phantom.py": "",
        "pipeline/training/__init__.py": "",
        "pipeline/training/trainer.py": "import pipeline.synthetic.phantom\n",
        "cache/__init__.py": "",
        "cache/store.py": "def g():\n    import pipeline.a\n    from stages import cli\n",
        "stages/__init__.py": "",
        "stages/cli.py": "from pipeline.synthetic.phantom import *\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = module_graph(tmp_path)
    assert find_cycle(graph) == ["pipeline.a", "pipeline.b", "pipeline.a"]
    assert importers(graph, "stages") == {"cache.store": ["stages", "stages.cli"]}
    cache = {n: d for n, d in graph.items() if inside(n, "cache")}
    assert importers(cache, "pipeline") == {"cache.store": ["pipeline.a"]}
    outside = {n: d for n, d in graph.items() if not inside(n, "pipeline.synthetic", "stages")}
    assert importers(outside, "pipeline.synthetic") == {
        "pipeline.training.trainer": ["pipeline.synthetic.phantom"]}
