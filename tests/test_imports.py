"""The package's import graph: no circles, and no arrow from a lower layer of the pipeline to a higher one.

Every ``import`` of a project module counts, at module level and inside functions alike (a deferred
import still makes the lower module depend on the higher one); imports under ``if TYPE_CHECKING:``
do not, since they never run. The layers follow the pipeline, lowest first.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "ablations")

# Lowest first; a module belongs to the layer of the longest name that is it or a package above it.
LAYERS = (
    ("harness", "harness.errors", "harness.quiet", "harness.fsutil", "harness.stats", "harness.distributed"),
    ("harness.data",),
    ("harness.adapters", "harness.models"),
    ("harness.config", "harness.tuned_rates"),  # one RunConfig, checked against the adapters' specs and the known models; the default rates
    ("harness.train", "harness.evaluate", "harness.contamination", "harness.fingerprint", "harness.tracking",
     "harness.export"),
    ("harness.diagnostics", "harness.report", "harness.plots", "harness.resultfile", "harness.rundir",
     "harness.reuse"),  # reuse: what a study worker's trials share (base model, task suite, base measures)
    ("harness.run", "harness.compare", "harness.equivalence"),
    ("ablations",),
)
# Within one layer: the diagnostics sit beside the report and draw with harness.plots, never through it.
FORBIDDEN = {("harness.diagnostics", "harness.report")}

# Known circles to remove, each listed exactly (a new one fails the test, and so does one that is gone): none.
KNOWN_CIRCLES: list[list[str]] = []
KNOWN_FORBIDDEN: set[tuple[str, str]] = set()


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "tasks" in path.relative_to(ROOT).parts:  # lm-eval's task folder: data, loaded by lm-eval
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its body, except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    type_only = {id(n) for node in ast.walk(tree)
                 if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                 for stmt in node.body for n in ast.walk(stmt)}
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & set(known)
            found |= submodules
            if len(submodules) < len(node.names):
                found.add(base)
    parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return {m for m in found if m in known and m != name and m not in parents}


def layer_of(name: str) -> int:
    matches = [(len(prefix), i) for i, names in enumerate(LAYERS) for prefix in names
               if name == prefix or name.startswith(prefix + ".")]
    assert matches, f"{name} has no layer: add it to LAYERS"
    return max(matches)[1]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v), on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_walk_sees_the_imports_that_matter():
    edges = graph()
    assert "harness.data.keys" in edges["harness.data.records"]  # a module-level import
    assert "harness.train" in edges["harness.run"]  # an import inside a function counts too
    assert all(layer_of(name) >= 0 for name in edges)


def test_no_import_circles_beyond_the_known_ones():
    assert circles(graph()) == KNOWN_CIRCLES


def test_no_arrow_from_a_lower_layer_to_a_higher_one():
    upward = sorted(f"{a} -> {b}" for a, targets in graph().items() for b in targets if layer_of(b) > layer_of(a))
    assert upward == []


def test_forbidden_edges_within_a_layer():
    edges = graph()
    assert any(src.startswith("harness.diagnostics") for src in edges)  # the rule looks at real modules
    present = {(a, b) for a, b in FORBIDDEN
               if any(src == a or src.startswith(a + ".") for src in edges
                      for dst in edges[src] if dst == b or dst.startswith(b + "."))}
    assert present == KNOWN_FORBIDDEN


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
