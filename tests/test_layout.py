"""The package's house rules that a reader relies on: no import cycle (every import counts, those inside functions
too) and no library module over 650 lines."""

import ast
import pathlib

import diffusers_memcontrol

PACKAGE = pathlib.Path(diffusers_memcontrol.__file__).parent
MAX_LINES = 650


def _modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    found = {}
    for f in root.rglob("*.py"):
        parts = f.relative_to(root.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return found


def import_graph(root: pathlib.Path) -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its body."""
    mods = _modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, file in mods.items():
        package = name if file.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                targets = [module, *(f"{module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                while target and target not in mods:
                    target = target.rsplit(".", 1)[0] if "." in target else ""
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
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
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return groups


def test_the_cycle_finder_sees_a_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")  # a lazy import still closes a cycle
    (pkg / "b.py").write_text("from . import a\n")
    (pkg / "c.py").write_text("from .a import f\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.b"]]


def test_no_import_cycle_in_the_package():
    assert cycles(import_graph(PACKAGE)) == []


def subpackage_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The import graph between subpackages (each root module counts as one of its own)."""
    def unit(module: str) -> str:
        return module.split(".")[1] if "." in module else "__init__"

    units: dict[str, set[str]] = {unit(m): set() for m in graph}
    for module, targets in graph.items():
        units[unit(module)] |= {unit(t) for t in targets} - {unit(module)}
    return units


def test_no_import_cycle_between_subpackages():
    assert cycles(subpackage_graph(import_graph(PACKAGE))) == []


def test_at_most_12_modules_at_the_root():
    root = sorted(f.name for f in PACKAGE.glob("*.py"))
    assert len(root) <= 12, root


def test_no_library_module_over_650_lines():
    long = {str(f.relative_to(PACKAGE)): n for f in PACKAGE.rglob("*.py")
            if (n := len(f.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}
