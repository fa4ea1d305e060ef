"""The installed package: entry point, ``--help``/``--version``, package data, metadata, and an engine
that never imports Slicer, Qt or VTK and has no import circles."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata, resources
from pathlib import Path

import pytest

import buseg
from buseg.cli import COMMANDS

tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads pyproject.toml")

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
GUI_TOP_LEVEL = {
    "slicer",
    "qt",
    "ctk",
    "vtk",
    "vtkmodules",
    "mrml",
    "PythonQt",
    "PyQt5",
    "PyQt6",
    "PySide2",
    "PySide6",
    "tkinter",
}


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)


def test_console_entry_point_resolves_to_the_cli():
    (entry,) = [e for e in metadata.entry_points(group="console_scripts") if e.name == "buseg"]
    assert entry.value == "buseg.cli:main"
    assert entry.load() is buseg.cli.main


def test_buseg_help_lists_every_command():
    script = Path(sys.executable).with_name("buseg")  # the console script pip installed beside python
    command = [str(script)] if script.exists() else [sys.executable, "-m", "buseg"]
    result = _run(*command, "--help")
    assert result.returncode == 0, result.stderr
    for name in ("train", "predict", "evaluate", "rank", "demo"):
        assert name in COMMANDS
        assert f"    {name} " in result.stdout, f"{name} missing from --help:\n{result.stdout}"


def test_python_m_buseg_version():
    result = _run(sys.executable, "-m", "buseg", "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"buseg {buseg.__version__}"
    assert buseg.__version__ == PYPROJECT["project"]["version"] == metadata.version("buseg")


def test_metadata_declares_license_entry_point_and_extras():
    project = PYPROJECT["project"]
    assert project["name"] == "buseg"
    assert project["license"] == "Apache-2.0" and (ROOT / "LICENSE").is_file()
    assert project["scripts"] == {"buseg": "buseg.cli:main"}
    assert {"test", "slicer-tests"} <= set(project["optional-dependencies"])
    # Every dependency has a lower bound (and torch an upper one: a new major may break checkpoints).
    for requirement in project["dependencies"]:
        assert ">=" in requirement, requirement
    assert any(r.startswith("torch") and "<" in r for r in project["dependencies"])
    installed = metadata.metadata("buseg")
    assert installed["Name"] == "buseg"
    assert "test" in (installed.get_all("Provides-Extra") or [])


def test_schemas_are_package_data():
    schema = resources.files("buseg").joinpath("schemas/events.schema.json")
    assert json.loads(schema.read_text(encoding="utf-8"))["$defs"]
    assert "schemas/*.json" in PYPROJECT["tool"]["setuptools"]["package-data"]["buseg"]


def test_wheel_contains_every_module_and_the_schemas(tmp_path):
    """What a non-editable install gets: build the wheel (from a copy: no build files in the tree) and look inside."""
    source_tree = tmp_path / "src"
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (source_tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, source_tree / name)
    shutil.copytree(
        ROOT / "BidirUncertaintySeg" / "Logic" / "buseg",
        source_tree / "BidirUncertaintySeg" / "Logic" / "buseg",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    # The benchmarks package sits at the root beside the sources: it must stay out of the wheel.
    (source_tree / "benchmarks").mkdir()
    shutil.copy(ROOT / "benchmarks" / "__init__.py", source_tree / "benchmarks" / "__init__.py")
    # No build isolation: the environment's setuptools (the Makefile installs >= 77), no download.
    result = _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--quiet",
        "-w",
        str(tmp_path / "dist"),
        str(source_tree),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("buseg-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    source = ROOT / "BidirUncertaintySeg" / "Logic"
    expected = {str(p.relative_to(source).as_posix()) for p in (source / "buseg").rglob("*.py")}
    expected |= {str(p.relative_to(source).as_posix()) for p in (source / "buseg" / "schemas").glob("*.json")}
    assert expected <= names, sorted(expected - names)
    assert not any(n.startswith(("BidirUncertaintySegLib/", "Testing/", "benchmarks/")) for n in names)


def test_engine_imports_no_slicer_qt_or_vtk():
    """Import every buseg module in a fresh interpreter; none may pull a GUI or Slicer module."""
    code = f"""
import importlib, json, pkgutil, sys
import buseg
names = [m.name for m in pkgutil.walk_packages(buseg.__path__, 'buseg.')]
for name in names:
    importlib.import_module(name)
gui = sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(GUI_TOP_LEVEL)!r}))
print(json.dumps({{"modules": names, "gui": gui}}))
"""
    result = _run(sys.executable, "-c", code, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {
        "buseg.cli",
        "buseg.evaluation.demo",
        "buseg.evaluation.report",
        "buseg.commands.demo",
        "buseg.training.loop",
    } <= set(report["modules"])
    assert report["gui"] == []


def _engine_modules(package_root: Path) -> dict[str, Path]:
    """Module name -> file of every module of the package at ``package_root`` (named ``buseg...``)."""
    modules = {}
    for path in sorted(package_root.rglob("*.py")):
        parts = list(path.relative_to(package_root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(["buseg", *parts])] = path
    return modules


def _imported_engine_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The engine modules ``name`` imports anywhere in its file: at module level, inside functions and
    under ``if TYPE_CHECKING`` alike (a lazy import hides a circle, it does not remove it)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up level - 1 packages from this module's own
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            # 'from .x import y': x, and y where y is a module itself
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in modules and target != name}
    return found


def engine_import_cycles(package_root: Path) -> list[list[str]]:
    """The import circles among the modules under ``package_root``: each strongly connected component
    of more than one module of the graph 'imports', sorted."""
    modules = _engine_modules(package_root)
    graph = {name: _imported_engine_modules(name, path, modules) for name, path in modules.items()}
    order: dict[str, int] = {}
    lowest: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:  # Tarjan's algorithm; the graph is a few dozen modules deep at most
        order[module] = lowest[module] = len(order)
        stack.append(module)
        for imported in sorted(graph[module]):
            if imported not in order:
                visit(imported)
                lowest[module] = min(lowest[module], lowest[imported])
            elif imported in stack:
                lowest[module] = min(lowest[module], order[imported])
        if lowest[module] == order[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in order:
            visit(module)
    return sorted(cycles)


def test_engine_modules_import_no_module_that_imports_them_back(tmp_path):
    """No engine module imports (at module level or lazily) one that imports it back, directly or
    through others: the pipeline's layers depend one way."""
    (tmp_path / "buseg" / "sub").mkdir(parents=True)
    for name, text in {
        "__init__.py": "",
        "a.py": "from .b import f\n",
        "b.py": "def f():\n    from . import c\n",
        "c.py": "from buseg.sub import d\nfrom .a import f\n",
        "sub/__init__.py": "",
        "sub/d.py": "from ..b import f\n",
        "sub/e.py": "from .. import a\n",
    }.items():
        (tmp_path / "buseg" / name).write_text(text)
    # The finder itself: a lazy import and a package-relative one close circles too.
    assert engine_import_cycles(tmp_path / "buseg") == [["buseg.a", "buseg.b", "buseg.c", "buseg.sub.d"]]
    assert engine_import_cycles(ROOT / "BidirUncertaintySeg" / "Logic" / "buseg") == []
