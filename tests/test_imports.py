"""The package's import graph: no circles, and data flows one way (config → CLI → module → algorithm → policy,
sampler, rewards). Read from the source with ``ast``, so imports inside functions and under TYPE_CHECKING count."""

import ast
from pathlib import Path

import prefalign

ROOT = Path(prefalign.__file__).parent


def import_graph() -> dict[str, set[str]]:
    """Module name -> the prefalign modules it imports (``from a import b`` counts ``a.b`` where that is a module)."""
    files = {".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_circles():
    graph = import_graph()
    assert len(graph) > 40 and "prefalign.algorithms.grpo" in graph  # the walk found the package
    assert cycles(graph) == []


def test_imports_run_one_way():
    """Algorithms see a Policy, never the LightningModule (nor Lightning: their losses run without it); the data
    package reads data and imports no model code; the sampler and the policy know nothing of the module."""
    graph = import_graph()
    above_algorithms = {"prefalign.module", "prefalign.cli", "prefalign.build", "prefalign.weights",
                        "prefalign.reference", "prefalign.checkpoints"}
    for name, imports in graph.items():
        if name.startswith(("prefalign.algorithms", "prefalign.rewards")) or name in ("prefalign.policy",
                                                                                      "prefalign.sampling"):
            assert not imports & above_algorithms, (name, imports & above_algorithms)
        if name.startswith("prefalign.data"):
            assert not {i for i in imports if i.startswith(("prefalign.algorithms", "prefalign.module",
                                                            "prefalign.preprocess", "prefalign.build"))}, name
    for path in (ROOT / "algorithms").glob("*.py"):
        assert "lightning" not in path.read_text(), path.name
