"""Run a buseg job in a background process and follow it, without blocking (no Qt).

The worker is the command line itself, ``python -m buseg <command> ... --progress jsonl``
(docs/worker-protocol.md). :class:`WorkerClient` starts it with a given Python, environment
and working folder, reads its JSON-line events on a thread, keeps its stderr as the log,
exposes a small state machine, cancels it (and its whole process tree) and reports the
result. The Slicer module polls it from a ``QTimer``; scripts call :meth:`WorkerClient.wait`::

    client = WorkerClient("train", ["--labeled", "data/labeled", "--out", "runs/a"])
    client.start()
    while not client.done:
        for event in client.poll():       # never blocks
            ...
    result = client.result                # status, outputs, message, exit_code, last_progress

States (:data:`STATES`)::

    idle --start()--> starting --'started' event--> running --process exit--> finished | failed | cancelled
                          \\---------cancel()-----------\\--> cancelling --process exit--> cancelled (| finished | failed)

``finished`` means the job completed; ``cancelled`` and ``failed`` are the other ends.
A client runs one job; make a new one for the next.

Not thread-safe by design: call every method from one thread (the GUI thread); the
reader threads only fill a queue.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from buseg.events import SCHEMA_VERSION, parse_event_line

IDLE = "idle"
STARTING = "starting"
RUNNING = "running"
CANCELLING = "cancelling"
FINISHED = "finished"
CANCELLED = "cancelled"
FAILED = "failed"
STATES = (IDLE, STARTING, RUNNING, CANCELLING, FINISHED, CANCELLED, FAILED)
FINAL_STATES = (FINISHED, CANCELLED, FAILED)

# Which state may follow which. A cancel can race with the end of the job, so
# 'cancelling' may still end 'finished' (the job completed first) or 'failed'.
TRANSITIONS: dict[str, tuple[str, ...]] = {
    IDLE: (STARTING,),
    STARTING: (RUNNING, CANCELLING, FINISHED, CANCELLED, FAILED),
    RUNNING: (CANCELLING, FINISHED, CANCELLED, FAILED),
    CANCELLING: (FINISHED, CANCELLED, FAILED),
    FINISHED: (),
    CANCELLED: (),
    FAILED: (),
}

# After the worker process has exited, wait at most this long for the end of its output
# (a grandchild that inherited the pipes could otherwise keep it open forever).
EOF_WAIT_SECONDS = 2.0
# While the worker runs, how often its descendants are listed (so that they are known if the
# process started - a launcher - ends first).
TREE_REFRESH_SECONDS = 1.0
LOG_TAIL_LINES = 20


@dataclass
class WorkerResult:
    """How a job ended.

    ``status`` is 'completed', 'cancelled' or 'failed' (the worker's ``finished`` event,
    or inferred from the exit when the worker could not say: killed, crashed, bad flags).
    ``message`` is for a person (the error event's message, the cancel message, or the
    end of the log when the worker died without a word).
    """

    status: str
    exit_code: int | None
    outputs: dict[str, Any] = field(default_factory=dict)
    message: str | None = None
    error: dict[str, Any] | None = None
    last_progress: dict[str, Any] | None = None
    seconds: float = 0.0


class WorkerStateMachine:
    """The client's state, driven by what happens to the worker; no processes, no threads.

    Call :meth:`launch`, then :meth:`launch_failed` or :meth:`on_event` for each event,
    :meth:`request_cancel` when the user cancels, and :meth:`on_exit` when the process has
    ended. ``transitions`` records every change (for tests and logs).
    """

    def __init__(self) -> None:
        self.state = IDLE
        self.cancel_requested = False
        self.finished_event: dict[str, Any] | None = None
        self.error_event: dict[str, Any] | None = None
        self.exit_code: int | None = None
        self.failure_message: str | None = None
        self.transitions: list[tuple[str, str]] = []

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def _go(self, new: str) -> None:
        if new == self.state:
            return
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"worker state cannot go from {self.state!r} to {new!r}")
        self.transitions.append((self.state, new))
        self.state = new

    def launch(self) -> None:
        if self.state != IDLE:
            raise RuntimeError(f"a worker client runs one job; this one is {self.state!r}")
        self._go(STARTING)

    def launch_failed(self, message: str) -> None:
        self.failure_message = message
        self._go(FAILED)

    def on_event(self, event: Mapping[str, Any]) -> None:
        kind = event.get("event")
        if kind == "started" and self.state == STARTING:
            self._go(RUNNING)
        elif kind == "error":
            self.error_event = dict(event)
        elif kind == "finished":
            self.finished_event = dict(event)

    def request_cancel(self) -> bool:
        """True if a cancel is now under way (False: nothing to cancel, or already cancelling)."""
        if self.state in (STARTING, RUNNING):
            self.cancel_requested = True
            self._go(CANCELLING)
            return True
        return False

    def on_exit(self, exit_code: int | None) -> None:
        if self.final:
            return
        self.exit_code = exit_code
        status = (self.finished_event or {}).get("status")
        if status == "completed" and exit_code == 0:
            self._go(FINISHED)
        elif status == "cancelled" or (status is None and self.cancel_requested):
            self._go(CANCELLED)
        else:
            if status == "completed":  # said completed but the process failed (e.g. another torchrun rank)
                self.failure_message = f"the worker reported completion but exited with code {exit_code}"
            self._go(FAILED)


class WorkerClient:
    """Launch ``python -m buseg <command> <args> --progress jsonl`` and follow it.

    Parameters
    ----------
    command:
        The buseg sub-command: ``"train"`` or ``"predict"`` (any sub-command that speaks
        the protocol).
    args:
        Its arguments, e.g. ``["--config", "run.json", "--out", "runs/a"]``
        (``--progress jsonl`` is appended).
    python:
        Python executable that has buseg installed (default: this one, ``sys.executable``;
        in Slicer: PythonSlicer).
    env:
        The worker's whole environment (default: a copy of this process's). The client
        adds ``PYTHONUNBUFFERED``, ``PYTHONIOENCODING``, ``BUSEG_PARENT_PID`` (the worker
        stops itself if this process dies) and ``BUSEG_CANCEL_FILE``.
    cwd:
        Working folder of the worker (relative paths in ``args`` are relative to it).
    log_path:
        If given, the worker's log (stderr, and stray stdout lines) is also appended to
        this file as it arrives.
    nproc_per_node:
        More than 1: run under ``python -m torch.distributed.run --standalone
        --nproc_per_node=N`` (multi-GPU training with DDP).
    grace_seconds:
        After :meth:`cancel`, how long the worker may take to write its checkpoint and exit
        before its whole process tree is killed.
    argv:
        Run this command line instead of ``[python, -m, buseg, command, *args]`` (custom
        launchers, tests); ``--progress jsonl`` is still appended.
    """

    def __init__(
        self,
        command: str,
        args: Sequence[str] = (),
        *,
        python: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        log_path: str | os.PathLike | None = None,
        nproc_per_node: int = 1,
        grace_seconds: float = 30.0,
        argv: Sequence[str] | None = None,
    ):
        self.command = command
        self.args = [str(a) for a in args]
        self.python = str(python or sys.executable)
        self.env = dict(os.environ if env is None else env)
        self.cwd = str(cwd) if cwd is not None else None
        self.log_path = Path(log_path) if log_path is not None else None
        self.nproc_per_node = int(nproc_per_node)
        self.grace_seconds = float(grace_seconds)
        self._argv_override = [str(a) for a in argv] if argv is not None else None

        self.machine = WorkerStateMachine()
        self.events: list[dict[str, Any]] = []
        self.started_event: dict[str, Any] | None = None
        self.last_progress: dict[str, Any] | None = None
        self.result: WorkerResult | None = None
        self.process: subprocess.Popen | None = None

        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._log_lines: list[str] = []
        self._log_lock = threading.Lock()
        self._log_file: TextIO | None = None
        self._threads: list[threading.Thread] = []
        self._open_streams = 0
        self._delivered = 0
        self._start_seconds = 0.0
        self._exited_seconds: float | None = None
        self._kill_at: float | None = None
        self._tree: list[Any] = []
        self._tree_seconds = 0.0
        self._private_dir: str | None = None
        self._cancel_file: str | None = None
        self._warned_schema = False

    # ----------------------------------------------------------------------------------
    # What the caller reads

    @property
    def argv(self) -> list[str]:
        """The command line the worker runs."""
        if self._argv_override is not None:
            base = list(self._argv_override)
        elif self.nproc_per_node > 1:
            base = [
                self.python,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={self.nproc_per_node}",
                "-m",
                "buseg",
                self.command,
                *self.args,
            ]
        else:
            base = [self.python, "-m", "buseg", self.command, *self.args]
        return [*base, "--progress", "jsonl"]

    @property
    def state(self) -> str:
        """One of :data:`STATES`."""
        return self.machine.state

    @property
    def done(self) -> bool:
        """The job has ended (finished, cancelled or failed) and :attr:`result` is set."""
        return self.machine.final

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def log_text(self) -> str:
        """The whole log so far: the worker's stderr, and any non-event lines of its stdout."""
        with self._log_lock:
            return "".join(self._log_lines)

    # ----------------------------------------------------------------------------------
    # Control

    def start(self) -> None:
        """Launch the worker (returns at once; the state is 'starting' until its 'started' event)."""
        self.machine.launch()
        self._start_seconds = time.monotonic()
        self._private_dir = tempfile.mkdtemp(prefix="buseg-worker-")
        self._cancel_file = os.path.join(self._private_dir, "cancel")
        env = dict(self.env)
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "PYTHONIOENCODING": "utf-8",
                "BUSEG_PARENT_PID": str(os.getpid()),
                "BUSEG_CANCEL_FILE": self._cancel_file,
            }
        )
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 - open for the job's life
        options: dict[str, Any] = {}
        if sys.platform == "win32":  # untested: no Windows machine in CI
            options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            options["start_new_session"] = True  # own process group: a terminal's Ctrl-C is ours to forward
        try:
            self.process = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                **options,
            )
        except OSError as exc:
            self._log(f"[client] cannot start the worker {self.argv[0]}: {exc}\n")
            self.machine.launch_failed(f"cannot start the worker ({self.argv[0]}): {exc.strerror or exc}")
            self._finalize()
            return
        self._log(f"$ {subprocess.list2cmdline(self.argv)}\n")
        for name, stream in (("stdout", self.process.stdout), ("stderr", self.process.stderr)):
            thread = threading.Thread(
                target=self._read, args=(name, stream), name=f"buseg-worker-{name}", daemon=True
            )
            self._open_streams += 1
            thread.start()
            self._threads.append(thread)

    def poll(self) -> list[dict[str, Any]]:
        """Events that arrived since the last call (never blocks); also advances the state."""
        self._pump(0.0)
        return self._take_new()

    def wait(self, timeout: float | None = None) -> WorkerResult:
        """Block until the job has ended; its result. Raises TimeoutError after ``timeout`` seconds.

        Events that arrive meanwhile are kept: the next :meth:`poll` returns them.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            if self.machine.state == IDLE:
                raise RuntimeError("the worker was not started")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"the worker is still {self.state} after {timeout} s")
            self._pump(0.1 if remaining is None else min(0.1, remaining))
        assert self.result is not None
        return self.result

    def cancel(self) -> bool:
        """Ask the worker to stop: it finishes the current step, saves a checkpoint and exits.

        The first call creates the cancel file and sends SIGTERM to the worker's whole process
        group (Windows: CTRL_BREAK_EVENT), so that a worker behind a launcher that forwards no
        signal (Slicer's PythonSlicer) hears it too; if the worker has not exited
        ``grace_seconds`` later, its whole process tree is killed (by :meth:`poll`/:meth:`wait`).
        A second call while cancelling kills the tree at once. The job ends (``cancelled``)
        only when every process of it has ended, not when the launcher has.
        Returns False if there was nothing to cancel.
        """
        if self.state == CANCELLING:
            self.kill()
            return True
        if not self.machine.request_cancel():
            return False
        self._snapshot_tree()
        if self._cancel_file:
            with contextlib.suppress(OSError):
                Path(self._cancel_file).touch()
        if self.process is not None and self._worker_alive():
            try:
                if sys.platform == "win32":  # untested here: to the process group made at start
                    self.process.send_signal(signal.CTRL_BREAK_EVENT)
                else:
                    # The whole process group: the process started may be a launcher (Slicer's
                    # PythonSlicer is CTK's AppLauncher) whose child, the real worker, gets no
                    # signal the launcher receives.
                    os.killpg(self.process.pid, signal.SIGTERM)
            except (OSError, ValueError) as exc:
                self._log(f"[client] could not signal the worker ({exc}); it will see the cancel file\n")
        self._kill_at = time.monotonic() + self.grace_seconds
        self._log(f"[client] cancel requested; the worker has {self.grace_seconds:.0f} s to save and exit\n")
        return True

    def kill(self) -> None:
        """Kill the worker and every process it started, now (no checkpoint)."""
        if self.process is None:
            return
        if self.state in (STARTING, RUNNING):
            self.machine.request_cancel()
        self._snapshot_tree()
        self._log("[client] killing the worker's process tree\n")
        _kill_tree(self.process, self._tree)
        self._kill_at = None

    def close(self) -> None:
        """Kill the worker if it still runs and release the log file (a client that is thrown away)."""
        if self.process is not None and self._worker_alive():
            self.kill()
            with contextlib.suppress(TimeoutError):
                self.wait(timeout=10)
        self._cleanup()

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------
    # Inside

    def _read(self, name: str, stream: TextIO) -> None:
        """Reader thread: one per pipe, until the worker closes it."""
        try:
            for line in stream:
                if name == "stdout":
                    event = parse_event_line(line)
                    if event is not None:
                        self._queue.put(("event", event))
                        continue
                    if line.strip():
                        self._log(f"[stdout] {line if line.endswith(chr(10)) else line + chr(10)}")
                else:
                    self._log(line if line.endswith("\n") else line + "\n")
        except (OSError, ValueError) as exc:  # pipe torn down under us
            self._log(f"[client] {name} reader stopped: {exc}\n")
        finally:
            self._queue.put(("eof", name))

    def _log(self, text: str) -> None:
        with self._log_lock:
            self._log_lines.append(text)
            if self._log_file is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._log_file.write(text)
                    self._log_file.flush()

    def _pump(self, block_seconds: float) -> None:
        """Handle queued reader output, enforce the cancel grace period, notice the exit."""
        if self.done or self.process is None:
            return
        try:
            item = self._queue.get(timeout=block_seconds) if block_seconds > 0 else self._queue.get_nowait()
        except queue.Empty:
            item = None
        while item is not None:
            self._handle(*item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                item = None
        if self._kill_at is not None and time.monotonic() >= self._kill_at and self._worker_alive():
            self._log(f"[client] the worker did not exit within {self.grace_seconds:.0f} s of the cancel\n")
            self.kill()
        exit_code = self.process.poll()
        if exit_code is None:
            self._refresh_tree()
            return
        if self._worker_alive():
            return  # a launcher ended, the worker it started has not: the job is not over
        if self._exited_seconds is None:
            self._exited_seconds = time.monotonic()
        if self._open_streams > 0 and time.monotonic() - self._exited_seconds < EOF_WAIT_SECONDS:
            return  # the last lines may still be in the pipes
        self.machine.on_exit(exit_code)
        self._finalize()

    def _handle(self, kind: str, value: Any) -> None:
        if kind == "eof":
            self._open_streams -= 1
            return
        event = value
        schema = event.get("schema")
        if isinstance(schema, int) and schema > SCHEMA_VERSION and not self._warned_schema:
            self._warned_schema = True
            self._log(
                f"[client] the worker speaks event schema {schema}; this client knows {SCHEMA_VERSION}\n"
            )
        self.events.append(event)
        if event.get("event") == "started":
            self.started_event = event
        elif event.get("event") == "progress":
            self.last_progress = event
        self.machine.on_event(event)

    def _take_new(self) -> list[dict[str, Any]]:
        new = self.events[self._delivered :]
        self._delivered = len(self.events)
        return new

    def _worker_alive(self) -> bool:
        """Whether any process of the job is left: the one started, a member of its process group
        (POSIX: what a launcher started) or a descendant seen before (Windows: no groups)."""
        if self.process is None:
            return False
        if self.process.poll() is None:
            return True
        if sys.platform != "win32" and _group_alive(self.process.pid):
            return True
        return any(_alive(p) for p in self._tree)

    def _refresh_tree(self) -> None:
        """Re-read the descendants about once a second while the process started lives."""
        now = time.monotonic()
        if now - self._tree_seconds >= TREE_REFRESH_SECONDS:
            self._tree_seconds = now
            self._snapshot_tree()

    def _snapshot_tree(self) -> None:
        """Remember the worker's descendants now: after the worker exits, orphans are hard to find."""
        if self.process is None:
            return
        import psutil

        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            return
        known = {p.pid for p in self._tree}
        self._tree.extend(p for p in children if p.pid not in known)

    def _finalize(self) -> None:
        m = self.machine
        finished = m.finished_event or {}
        error = m.error_event
        status = {FINISHED: "completed", CANCELLED: "cancelled"}.get(m.state, "failed")
        message = None
        if error is not None:
            message = error.get("message")
        elif m.failure_message:
            message = m.failure_message
        elif finished.get("message"):
            message = finished["message"]
        if status == "cancelled" and message is None:
            message = "cancelled" + (
                "" if m.finished_event else " (the worker was stopped before it could save)"
            )
        if status == "failed" and message is None:
            message = self._silent_failure_message(m.exit_code)
        self.result = WorkerResult(
            status=status,
            exit_code=m.exit_code,
            outputs=dict(finished.get("outputs") or {}),
            message=message,
            error=error,
            last_progress=self.last_progress,
            seconds=time.monotonic() - self._start_seconds if self._start_seconds else 0.0,
        )
        self._cleanup()

    def _silent_failure_message(self, exit_code: int | None) -> str:
        """Why a worker that said nothing failed: its signal, or the end of its log (e.g. a usage error)."""
        lines = [
            line.rstrip()
            for line in self.log_text().splitlines()
            if line.strip() and not line.startswith(("$ ", "[client]"))
        ]
        tail = "\n".join(lines[-LOG_TAIL_LINES:])
        if exit_code is not None and exit_code < 0:
            try:
                name = signal.Signals(-exit_code).name
            except ValueError:
                name = f"signal {-exit_code}"
            head = f"the worker was killed by {name}"
        else:
            head = f"the worker exited with code {exit_code} without reporting an error"
        return f"{head}:\n{tail}" if tail else head

    def _cleanup(self) -> None:
        if self._log_file is not None:
            with self._log_lock:
                self._log_file.close()
                self._log_file = None
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None


def _kill_tree(process: subprocess.Popen, known: Sequence[Any]) -> None:
    """Kill ``process``, its descendants now and those seen before (``known``)."""
    import psutil

    victims: dict[int, Any] = {p.pid: p for p in known}
    try:
        root = psutil.Process(process.pid)
        for child in root.children(recursive=True):
            victims.setdefault(child.pid, child)
        victims.setdefault(root.pid, root)
    except psutil.Error:
        pass
    if sys.platform != "win32":
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)  # the worker leads its own process group
    for victim in victims.values():
        with contextlib.suppress(psutil.Error):
            victim.kill()
    # Reap our own child through Popen (so that its exit status is kept); the descendants
    # are not ours to reap: give them a moment to go (a zombie counts as gone).
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        process.wait(timeout=5)
    others = [v for pid, v in victims.items() if pid != process.pid]
    deadline = time.monotonic() + 2
    while others and time.monotonic() < deadline:
        others = [v for v in others if _alive(v)]
        time.sleep(0.05)


def _group_alive(group_id: int) -> bool:
    """Whether a live (not zombie) process is left in a process group (POSIX)."""
    try:
        os.killpg(group_id, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone is there (not ours to signal)
    import psutil

    for pid in psutil.pids():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getpgid(pid) == group_id and _alive(psutil.Process(pid)):
                return True
    return False


def _alive(process: Any) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
