"""Result files name paths relative to the repository, not the machine that made them."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from paths import shown_command, shown_path  # noqa: E402


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
    command = shown_command("python benchmarks/quality.py", argv)
    assert (
        command == "python benchmarks/quality.py --data-root ../shared/data --work=benchmarks/work --seeds 1"
    )
    assert str(ROOT) not in command
