"""export/ has no import circle: the graph of its modules, built from the source (module-level and
function-level imports alike), is acyclic, and the ONNX Runtime engine imports nothing above it."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPORT = REPO / "export"
PACKAGE = "ctxmem.export"
MODULES = sorted(p.stem for p in EXPORT.glob("*.py"))


def _targets(node: ast.AST) -> list[str]:
    """The export/ modules one import statement names (relative or absolute)."""
    if isinstance(node, ast.Import):
        return [a.name[len(PACKAGE) + 1:].split(".")[0] for a in node.names if a.name.startswith(PACKAGE + ".")]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level == 1 or node.module == PACKAGE or (node.module or "").startswith(PACKAGE + "."):
        base = node.module if node.level == 1 else (node.module or "")[len(PACKAGE) + 1:]
        if base:  # from .runtime import X / from ctxmem.export.runtime import X
            return [base.split(".")[0]]
        return [a.name for a in node.names if a.name in MODULES]  # from . import runtime
    return []


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name in MODULES:
        tree = ast.parse((EXPORT / f"{name}.py").read_text(), filename=f"export/{name}.py")
        graph[name] = {t for node in ast.walk(tree) for t in _targets(node) if t in MODULES and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_graph_builder_sees_relative_absolute_and_function_level_imports():
    graph = import_graph()
    assert "runtime" in graph["verify"]  # module level, relative
    assert "resolve" in graph["evaluate"]  # inside open_backend()
    assert "pyfunc" in graph["pyfunc_model"]  # absolute: from ctxmem.export.pyfunc import ...
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_export_modules_import_each_other_without_a_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle in export/: {' -> '.join(cycle)}"


def test_the_onnx_runtime_engine_imports_nothing_above_it():
    graph = import_graph()
    below = reachable(graph, "runtime")
    above = {"resolve", "store", "registry", "evaluate", "verify", "onnx_export", "pyfunc", "pyfunc_model", "cli"}
    assert not below & above, f"runtime.py reaches {sorted(below & above)}"
    assert below <= {"errors", "contract", "providers"}


def test_the_engine_and_the_resolver_do_not_import_mlflow_at_module_level():
    for name in ("runtime", "providers", "resolve", "store"):
        tree = ast.parse((EXPORT / f"{name}.py").read_text())
        top = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
        top += [n.module or "" for n in tree.body if isinstance(n, ast.ImportFrom)]
        assert not [m for m in top if m.split(".")[0] in ("mlflow", "onnxruntime", "torch")], name


def test_the_public_api_is_one_resolver_and_one_provider_choice():
    import ctxmem.export as export
    from ctxmem.export import providers, registry, resolve, runtime

    assert export.resolve_model is resolve.resolve_model is registry.resolve_model
    assert export.choose_provider is resolve.choose_provider is providers.choose_provider is runtime.choose_provider
    assert export.choose_provider("auto") in ("cpu", "cuda")
    assert export.choose_provider("cpu") == "cpu"
