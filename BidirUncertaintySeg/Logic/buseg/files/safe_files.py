"""Writing into the user's folders safely: atomic writes, output folders, the folder lock, and
the clean-up of what a killed writer left.

Everything buseg writes goes to a temporary file in the destination folder first (its name
starts with :data:`TEMPORARY_PREFIX`) and is renamed into place, so a crash or a kill never
leaves a half-written file under the final name; a second job writing to the same folder is
refused by a :class:`FolderLock`. The image formats themselves are :mod:`buseg.files.images`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from buseg.errors import OutputError

# Every temporary file buseg writes into a user's folder starts with this, and the clean-up of
# what a killed run left removes nothing else (a user's '.backup.tmp' is the user's).
TEMPORARY_PREFIX = ".buseg-tmp-"


def is_utf8(path: str | Path) -> bool:
    """Whether a path is valid UTF-8 text (a name in another encoding holds surrogate escapes)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_utf8_output(path: str | Path) -> None:
    """Refuse a path that is not UTF-8 text: the image library aborts the process on one."""
    if not is_utf8(path):
        raise OutputError(
            "the path is not valid UTF-8 text; the image library cannot write there (it would abort)",
            path=path,
            hint="choose an output folder whose name is plain text",
        )


def file_in_the_way(folder: str | Path) -> OutputError | None:
    """The error to raise when ``folder``, or a folder above it, exists as a file (so that the
    folder cannot be created), or None. It names that file, instead of the system's bare 'File exists'."""
    folder = Path(folder)
    for candidate in (folder, *folder.parents):
        try:
            if not candidate.exists():
                continue
            if candidate.is_dir():
                return None
        except OSError:
            return None  # reported by the operation that needs the folder
        need = "the outputs go into it" if candidate == folder else f"to hold {folder}"
        return OutputError(
            f"is a file, but it must be a folder ({need})",
            path=candidate,
            hint="choose another output folder, or move that file away",
        )
    return None


def ensure_output_folder(folder: str | Path) -> Path:
    """Create ``folder`` if needed and check that files can be created in it, before any work is done."""
    folder = Path(folder)
    check_utf8_output(folder)
    blocking = file_in_the_way(folder)
    if blocking is not None:
        raise blocking
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=f"{TEMPORARY_PREFIX}write-test.", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write to the output folder: {exc.strerror or exc}", path=folder) from None
    return folder


# The one image suffix of two parts (buseg.files.images.IMAGE_SUFFIXES): writers choose the format from the
# whole of it, so a temporary file must end in it too.
_COMPOUND_SUFFIX = ".nii.gz"


def _temporary_suffix(path: Path) -> str:
    if path.name.lower().endswith(_COMPOUND_SUFFIX):
        return path.name[-len(_COMPOUND_SUFFIX) :]
    return path.suffix


@contextlib.contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The temporary name, ``.buseg-tmp-<name>.<random><suffix>``, keeps the suffix (writers
    choose the format from it) and starts with :data:`TEMPORARY_PREFIX`, so that the clean-up of
    a killed writer's files (:func:`remove_stale_temporaries`) can never take a user's file for
    one. Refuses to replace an existing file unless ``overwrite``. Translates permission and
    disk-full errors into :class:`OutputError` naming the file.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(
            "is a folder; a file of this name cannot replace it",
            path=path,
            hint="move the folder away, or choose another output folder",
        )
    if path.exists() and not overwrite:
        raise OutputError(
            "exists already; refusing to overwrite it", path=path, hint="pass --overwrite to replace it"
        )
    blocking = file_in_the_way(path.parent)
    if blocking is not None:
        raise blocking
    suffix = _temporary_suffix(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(
            prefix=f"{TEMPORARY_PREFIX}{path.name}.", suffix=suffix, dir=path.parent
        )
        os.close(handle)
    except OSError as exc:
        raise OutputError(f"cannot write here: {exc.strerror or exc}", path=path) from None
    temp = Path(temp_name)
    try:
        yield temp
        os.replace(temp, path)
    except OSError as exc:
        raise OutputError(f"cannot be written: {exc.strerror or exc}", path=path) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def write_bytes_atomic(path: str | Path, data: bytes, *, overwrite: bool = True) -> None:
    with atomic_path(path, overwrite=overwrite) as temp, open(temp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_json_atomic(path: str | Path, data: Any, *, overwrite: bool = True) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode(), overwrite=overwrite)


class FolderLock:
    """A lock file in an output folder: a second job writing to the same folder refuses.

    The file holds the owner's process id, job and process start time. A lock whose process is
    gone (killed), or whose process id now belongs to another process (started at another time:
    the id was reused, e.g. pid 1 after a container restart), is taken over. Use as a context
    manager, or :meth:`acquire` / :meth:`release`.
    """

    def __init__(self, folder: str | Path, *, name: str = "buseg.lock", job: str = "buseg") -> None:
        self.path = Path(folder) / name
        self.job = job
        self.held = False

    def _owner(self) -> tuple[int, str, float | None]:
        """(process id, job, process start time or None) written in the lock; (0, ...) if unreadable."""
        try:
            lines = self.path.read_text(encoding="utf-8", errors="replace").split("\n")
            pid = int(lines[0].strip() or 0)
        except (OSError, ValueError):
            return 0, "job", None
        job = (lines[1].strip() if len(lines) > 1 else "") or "job"
        try:
            started = float(lines[2]) if len(lines) > 2 and lines[2].strip() else None
        except ValueError:
            started = None
        return pid, job, started

    def _held_by_a_live_owner(self) -> tuple[bool, int, str]:
        """Whether the process that wrote the lock still runs (not merely a process of that id)."""
        pid, job, started = self._owner()
        if not pid:
            # Empty: another job created it this instant and is writing its id, or (if it is older)
            # a job was killed between the two.
            return self._age_seconds() < _LOCK_BEING_WRITTEN_SECONDS, pid, job
        if pid == os.getpid():
            return False, pid, job
        running = _process_start_time(pid)
        if running is None:
            return False, pid, job
        if started is not None:
            return abs(running - started) < _START_TIME_TOLERANCE_SECONDS, pid, job
        # A lock of an earlier version holds no start time: its owner was a Python process.
        return _looks_like_buseg(pid), pid, job

    def _age_seconds(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return float("inf")

    def acquire(self) -> FolderLock:
        started = _process_start_time(os.getpid())  # before the lock exists: it is written at once
        for _ in range(3):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                live, pid, job = self._held_by_a_live_owner()
                if live:
                    owner = f"another {job} (process {pid})" if pid else "another job"
                    raise OutputError(
                        f"{owner} is writing to this folder",
                        path=self.path.parent,
                        hint="wait for it, cancel it, or choose another output folder; if no buseg job "
                        f"writes there, delete the lock file {self.path}",
                    ) from None
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()  # the lock of a process that is gone
                continue
            except OSError as exc:
                raise OutputError(
                    f"cannot write to the output folder: {exc.strerror or exc}", path=self.path.parent
                ) from None
            with os.fdopen(handle, "w", encoding="utf-8") as lock_file:
                lock_file.write(f"{os.getpid()}\n{self.job}\n{'' if started is None else repr(started)}\n")
            self.held = True
            return self
        raise OutputError("cannot take the lock of this folder", path=self.path)

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.held = False

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


# psutil derives start times from clock ticks since boot: the same process reads the same value.
_START_TIME_TOLERANCE_SECONDS = 0.05


# An empty lock younger than this is being written by the job that just created it.
_LOCK_BEING_WRITTEN_SECONDS = 10.0


def _process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None if there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _looks_like_buseg(pid: int) -> bool:
    """Whether process ``pid`` may be a buseg job (a Python process or Slicer); True when unknown."""
    import psutil

    try:
        process = psutil.Process(pid)
        words = " ".join([process.name(), *process.cmdline()[:3]]).lower()
    except psutil.AccessDenied:
        return True
    except psutil.Error:
        return False
    return any(word in words for word in ("python", "buseg", "slicer"))


# The write probe of earlier versions: a name no user file has. Their atomic_path names
# ('.<name>.<8 random>.tmp<suffix>') are not cleaned up: '.backup.20240101.tmp' has that form too.
_OLD_WRITE_PROBE = r"^\.buseg-write-test\.[a-z0-9_]{8}$"


def is_stale_temporary_name(name: str) -> bool:
    """Whether a file name is one that buseg's writers give their temporary files (and only they)."""
    import re

    return name.startswith(TEMPORARY_PREFIX) or re.match(_OLD_WRITE_PROBE, name) is not None


def remove_stale_temporaries(folder: str | Path, *, depth: int = 1) -> list[Path]:
    """Remove the temporary files that a killed writer left in ``folder`` (and its sub-folders down
    to ``depth``); only the holder of the folder's :class:`FolderLock` may call this (another job
    could be writing its own). Only names with buseg's own prefix are touched: a user's hidden
    file that merely looks temporary ('.notes.draft_v2.tmp.md') stays. Returns what was removed."""
    removed: list[Path] = []
    folders = [Path(folder)]
    for _ in range(depth + 1):
        children: list[Path] = []
        for current in folders:
            try:
                entries = list(os.scandir(current))
            except OSError:
                continue
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    children.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False) and is_stale_temporary_name(entry.name):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                        removed.append(Path(entry.path))
        folders = children
    return removed
