"""The benchmark scripts are not imported by the suite, so a moved library name would break them unseen: every
`from diffusers_memcontrol... import name` in benchmarks/ must resolve."""

import ast
import importlib
import pathlib

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _package_imports(path: pathlib.Path) -> list[tuple[str, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffusers_memcontrol"):
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.startswith("diffusers_memcontrol")]
    return found


def _missing(path: pathlib.Path) -> list[str]:
    missing = []
    for module, name in _package_imports(path):
        imported = importlib.import_module(module)
        if name and not hasattr(imported, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{module}.{name}")
    return missing


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_benchmark_imports_resolve(script):
    missing = _missing(BENCHMARKS / script)
    assert not missing, f"{script} imports names the package no longer has: {missing}"


def test_the_check_sees_a_moved_name(tmp_path):
    script = tmp_path / "old.py"
    script.write_text("from diffusers_memcontrol.search.study import dmem_exposures, select_trial\n"
                      "from diffusers_memcontrol import metrics\n", encoding="utf-8")
    assert _missing(script) == ["diffusers_memcontrol.search.study.dmem_exposures"]
