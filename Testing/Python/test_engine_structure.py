"""The engine's shape: packages by pipeline stage, no import circles, nothing imported upward.

docs/architecture.md draws the stages; these tests hold the code to that drawing. Every import
counts, also the ones inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[2] / "BidirUncertaintySeg" / "Logic" / "buseg"

# The pipeline's stages, lowest first: a module may import its own stage and the ones before it.
STAGES = (
    (
        "foundation",
        ("buseg", "buseg.errors", "buseg.events", "buseg.device", "buseg.memory", "buseg.metrics"),
    ),
    ("catalogs", ("buseg.catalogs",)),
    ("configuration", ("buseg.config",)),
    ("files", ("buseg.files",)),
    ("model", ("buseg.model",)),
    ("data", ("buseg.data",)),
    ("prediction", ("buseg.prediction",)),
    ("training", ("buseg.training",)),
    ("evaluation", ("buseg.evaluation",)),
    ("interface", ("buseg.cli", "buseg.__main__", "buseg.client", "buseg.commands")),
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ENGINE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(ENGINE.rglob("*.py"))}


def stage_of(module: str) -> int:
    """Index of ``module``'s stage (the stage whose prefix matches it most closely)."""
    best = None
    for index, (_, prefixes) in enumerate(STAGES):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > best[1]
            ):
                best = (index, len(prefix))
    if best is None:
        raise AssertionError(f"{module} is in no stage of STAGES: place it in docs/architecture.md and here")
    return best[0]


def imported_modules(module: str) -> set[str]:
    """The engine modules ``module`` imports anywhere in its code (``from x import y``: x.y if a module)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names
            ]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # "buseg.files.images.read_image" -> its module
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


GRAPH = {module: imported_modules(module) for module in MODULES}


def test_every_engine_module_belongs_to_a_stage_and_each_package_says_what_it_owns():
    for module, path in MODULES.items():
        stage_of(module)
        if path.name == "__init__.py":
            docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
            assert docstring and len(docstring.split()) >= 8, f"{path}: a package says what it owns"


def test_no_engine_module_imports_a_later_stage():
    upward = [
        f"{module} ({STAGES[stage_of(module)][0]}) imports {target} ({STAGES[stage_of(target)][0]})"
        for module, targets in GRAPH.items()
        for target in sorted(targets)
        if stage_of(target) > stage_of(module)
    ]
    assert not upward, "\n".join(upward)


def _circle_through(start: str) -> list[str] | None:
    """A shortest import path start -> ... -> start, if there is one."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for module in frontier:
            for target in sorted(GRAPH[module]):
                if target == start:
                    return [*paths[module], start]
                if target not in paths:
                    paths[target] = [*paths[module], target]
                    following.append(target)
        frontier = following
    return None


def test_no_engine_module_imports_one_that_imports_it_back():
    circles = {tuple(circle) for module in GRAPH if (circle := _circle_through(module))}
    assert not circles, "\n".join(" -> ".join(c) for c in sorted(circles))


def test_the_structure_checks_catch_what_they_are_for(monkeypatch):
    """The checks above are not vacuous: an upward import and a circle are found when present."""
    monkeypatch.setitem(GRAPH, "buseg.files.images", GRAPH["buseg.files.images"] | {"buseg.prediction.case"})
    with pytest.raises(
        AssertionError, match=re.escape("buseg.files.images (files) imports buseg.prediction.case")
    ):
        test_no_engine_module_imports_a_later_stage()
    with pytest.raises(AssertionError, match=re.escape("buseg.files.images -> ")):
        test_no_engine_module_imports_one_that_imports_it_back()


def test_the_catalogs_import_nothing_of_the_engine():
    """The configuration and the Slicer module read the catalogs without torch: a catalog names each
    plug-in's code by module path instead of importing it."""
    for module, targets in GRAPH.items():
        if module.startswith("buseg.catalogs"):
            outside = {t for t in targets if not t.startswith("buseg.catalogs")}
            assert not outside, f"{module} imports {sorted(outside)}"
