"""Paths in result files: relative to the repository, so that a reader's copy makes sense.

Result files are committed and read on other machines; an absolute path of the machine that
made them (``/home/someone/data/ACDC``) says nothing there. Paths inside the repository are
written relative to its root, paths beside it (the shared data folder) as ``../...``.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def shown_path(path: str | os.PathLike) -> str:
    """``path`` relative to the repository root (``../`` for a sibling such as the data folder);
    unchanged when it is relative already or lies on another drive."""
    text = os.fspath(path)
    if not os.path.isabs(text):
        return text
    try:
        return os.path.relpath(text, ROOT)
    except ValueError:  # Windows: another drive
        return text


def module_command(script_file: str | os.PathLike) -> str:
    """How the benchmark script ``script_file`` (its ``__file__``) is run from the repository root:
    ``python -m benchmarks.<name>`` - its argparse ``prog`` and the command its results record."""
    return f"python -m benchmarks.{Path(script_file).stem}"


def shown_command(script: str, argv: Sequence[str]) -> str:
    """The command line that made a result (``script`` as given, e.g. "python -m benchmarks.x"), with absolute path
    arguments shown relative to the repository (``--data-root /x/shared/data`` -> ``--data-root ../shared/data``)."""
    words = []
    for word in argv:
        option, equals, value = word.partition("=")
        if equals and option.startswith("--") and os.path.isabs(value):
            words.append(f"{option}={shown_path(value)}")
        else:
            words.append(shown_path(word) if os.path.isabs(word) else word)
    return " ".join([script, *(shlex.quote(w) for w in words)])
