"""The demo's modules never import each other in a circle, not even lazily inside a function
(fast: parses the sources, imports nothing)."""

import ast
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "jaxalign" / "demo"
PACKAGE = "jaxalign.demo"


def _demo_imports(source: str, modules: set[str]) -> set[str]:
    """The ``jaxalign.demo`` modules one file imports, at module level or inside functions.

    ``from jaxalign.demo import X`` counts as importing module ``X`` when ``X.py`` exists and as
    importing ``__init__`` otherwise; relative imports are resolved against the package.
    """
    def module_of(name: str) -> str | None:
        if name == PACKAGE:
            return "__init__"
        if name.startswith(PACKAGE + "."):
            module = name[len(PACKAGE) + 1:].split(".")[0]
            return module if module in modules else "__init__"
        return None

    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(module_of(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # the demo has no subpackages: relative means jaxalign.demo
                base = f"{PACKAGE}.{base}" if base else PACKAGE
            for alias in node.names:  # a submodule if one has that name, else the base module
                is_module = base == PACKAGE and alias.name in modules
                found.add(module_of(f"{base}.{alias.name}" if is_module else base))
    return found - {None}


def _import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    modules = set(sources)
    return {name: _demo_imports(text, modules) - {name} for name, text in sources.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or ``None`` if the graph is acyclic."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after

    def visit(node, path):
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target, path + [target])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_cycle_finder_sees_a_lazy_import_circle():
    """The check can fail: the old layout (pipeline importing align inside ``run_demo``, align
    importing ``Context`` from pipeline) is a cycle."""
    old = {"pipeline": "def run_demo():\n    from jaxalign.demo import ai_feedback, align\n",
           "align": "from jaxalign.demo.pipeline import Context, progress\n",
           "ai_feedback": "from .pipeline import Context\n"}
    graph = _import_graph(old)
    assert graph["pipeline"] == {"ai_feedback", "align"}
    assert _find_cycle(graph) in (["align", "pipeline", "align"],
                                  ["ai_feedback", "pipeline", "ai_feedback"])


def test_demo_import_graph_is_acyclic():
    sources = {path.stem: path.read_text(encoding="utf-8") for path in DEMO.glob("*.py")}
    graph = _import_graph(sources)
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    # the graph is the real one: the orchestration imports the stage modules, they the context
    assert {"align", "ai_feedback", "report", "context"} <= graph["pipeline"]
    assert "context" in graph["align"] and "context" in graph["ai_feedback"]
    assert "pipeline" not in set().union(*(graph[m] for m in ("align", "ai_feedback", "report",
                                                               "context")))
