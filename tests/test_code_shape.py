"""The shape of the code, over hpcgan/'s ast and import graph: no import circle (counting imports inside
functions, which used to defuse three), no function over 80 lines, no module over 400 lines, and each
model family registered by its module (docs/architecture.md)."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "hpcgan"
MAX_FUNCTION_LINES, MAX_MODULE_LINES = 80, 400


def modules() -> dict:
    """Dotted module name -> path, for every module of hpcgan."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(node, package: str, known: dict) -> set:
    """The hpcgan modules an import statement loads (a `from X import name` of a submodule counts it)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
        # `from package import submodule` loads the submodule; `from module import name`, the module.
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    return {name for name in names if name in known}


def import_graph() -> dict:
    known = modules()
    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        graph[name] = set().union(
            *(imported(n, package, known) for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
        )
    return graph


def circles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan), plus modules importing themselves."""
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

    for v in graph:
        if v not in index:
            visit(v)
    return found + [[v] for v, targets in graph.items() if v in targets]


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_circle_finder_finds_one():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_long_function_or_module():
    too_long = []
    for path in modules().values():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(REPO)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines} lines")
    assert too_long == []


def test_each_family_is_one_module_in_the_registry():
    from hpcgan.models import FAMILIES

    family_modules = {p.stem for p in Path(PACKAGE / "models").glob("*.py")} - {"__init__", "config", "layers"}
    assert family_modules == set(FAMILIES)
    for arch, module in FAMILIES.items():
        assert module.__name__ == f"hpcgan.models.{arch}"
        assert all(hasattr(module, name) for name in ("Generator", "Discriminator", "check_config")), arch
