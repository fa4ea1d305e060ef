"""How the benchmarks run and what their results name: each script is a module of the ``benchmarks``
package run from the repository root (``python -m benchmarks.<name>``), and result files name paths
relative to the repository, not the machine that made them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.paths import module_command, shown_command, shown_path

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"


def _scripts() -> list[str]:
    """The benchmark modules that are scripts (those with a ``__main__`` block)."""
    return sorted(p.stem for p in BENCHMARKS.glob("*.py") if 'if __name__ == "__main__":' in p.read_text())


def test_paths_inside_and_beside_the_repository_become_relative():
    assert shown_path(ROOT / "benchmarks" / "work") == "benchmarks/work"
    assert shown_path(ROOT.parent / "shared" / "data" / "ACDC") == "../shared/data/ACDC"
    assert shown_path("already/relative") == "already/relative"


def test_commands_show_relative_path_arguments():
    argv = [
        "--data-root",
        str(ROOT.parent / "shared" / "data"),
        f"--work={ROOT / 'benchmarks' / 'work'}",
        "--seeds",
        "1",
    ]
    command = shown_command(module_command(BENCHMARKS / "quality.py"), argv)
    assert (
        command == "python -m benchmarks.quality --data-root ../shared/data --work=benchmarks/work --seeds 1"
    )
    assert str(ROOT) not in command


def test_no_benchmark_edits_the_import_path():
    """The engine is installed and the benchmarks are a package: a path edit would only hide a
    script that cannot run as ``python -m benchmarks.<name>``."""
    for path in sorted(BENCHMARKS.glob("*.py")):
        text = path.read_text()
        assert "sys.path" not in text and "PYTHONPATH" not in text, f"{path.name} edits the import path"


def test_every_benchmark_script_runs_as_a_module_from_the_repository_root():
    """``python -m benchmarks.<name> --help`` from the root with no PYTHONPATH: the installed engine and
    the package are all a script needs, and its usage names the command that runs it."""
    scripts = _scripts()
    assert {"quality", "speed", "gpu_check", "annotation_loop"} <= set(scripts), scripts
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}

    def run(name: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", f"benchmarks.{name}", "--help"]
        return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=240)

    with ThreadPoolExecutor(max_workers=2) as pool:  # each imports torch: two at a time on two cores
        results = dict(zip(scripts, pool.map(run, scripts), strict=True))
    for name, result in results.items():
        assert result.returncode == 0, f"benchmarks.{name}: {result.stderr[-2000:]}"
        assert re.match(rf"usage: python -m benchmarks\.{name}\s", result.stdout), result.stdout[:300]
