"""The package's import graph, read from the source: every import statement, those inside functions included, has
no cycle."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# cli/ installs as mobilenet_fn.cli
PACKAGES = {"mobilenet_fn": ROOT / "mobilenet_fn", "mobilenet_fn.cli": ROOT / "cli"}


def modules() -> dict[str, Path]:
    """Module name -> file, for every module of the package (a package's own name for its __init__.py)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.glob("*.py"):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` (at ``path``) imports anywhere in its code."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # `from pkg import sub` imports the submodule sub; `from mod import name` imports mod
            subs = {f"{base}.{alias.name}" for alias in node.names} & known
            targets.update(subs or {base})
    return {t for t in targets if t in known} - {name}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(name, path, set(found)) for name, path in found.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                result.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def test_the_graph_reader_sees_relative_absolute_and_function_level_imports(tmp_path):
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from pkg.c import thing\n")
    (tmp_path / "c.py").write_text("import pkg.a\n")
    known = {"pkg", "pkg.a", "pkg.b", "pkg.c"}
    graph = {name: imported(name, tmp_path / (name.rpartition(".")[2] + ".py"), known) for name in known - {"pkg"}}
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}}
    assert cycles({**graph, "pkg": set()}) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert {"mobilenet_fn.model", "mobilenet_fn.train", "mobilenet_fn.cli.train"} <= set(graph)
    assert "mobilenet_fn.weights" in graph["mobilenet_fn.train"] or "mobilenet_fn.checkpoint" in graph[
        "mobilenet_fn.train"]
    assert cycles(graph) == []
