"""What every sub-command shares: logging to stderr, the event sink, cancel, running a job safely.

This is the worker side of docs/worker-protocol.md. A command does::

    setup_logging(args.verbose)
    sink = make_sink(args.progress)          # jsonl: events on stdout, everything else on stderr
    stop = StopFlag()                        # first SIGTERM/SIGINT sets it, a second exits at once
    return run_job(sink, job, job_name="predict", stop=stop)   # job polls stop() between steps

``run_job`` is the one place that turns outcomes into exit codes and final events:

* success -> ``finished``/``completed``, exit 0;
* :class:`~buseg.errors.BusegError` (bad input, bad config, unwritable output) -> an
  ``error`` event with the message, ``finished``/``failed``, exit code of the error (2; 3
  for :class:`~buseg.errors.ResourceError`);
* cancel (SIGTERM/SIGINT, or the parent process gone) -> ``finished``/``cancelled``, exit 130;
* out of memory -> ``error`` + ``finished``/``failed``, exit 3;
* anything else (a bug) -> ``error`` with the traceback in ``detail``,
  ``finished``/``failed``, exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from buseg.errors import BusegError, Cancelled
from buseg.events import EventSink, JsonLinesSink, TerminalSink

logger = logging.getLogger("buseg")

EXIT_COMPLETED = 0
EXIT_INTERNAL_ERROR = 1
EXIT_USER_ERROR = 2  # BusegError: input, config, model file, output (also argparse usage errors)
EXIT_RESOURCE = 3  # out of memory (ResourceError, MemoryError, CUDA out of memory)
EXIT_CANCELLED = 130  # cancelled by SIGTERM/SIGINT (128 + SIGINT, the shell convention)

# Environment variable the client sets to its own process id: the worker cancels itself
# (checkpoint and all) when that process disappears, e.g. when Slicer crashes.
PARENT_PID_ENV = "BUSEG_PARENT_PID"
# Environment variable naming a file whose appearance asks the worker to cancel (the
# client's cancel path that needs no signal: Windows GUI processes cannot send CTRL_BREAK).
CANCEL_FILE_ENV = "BUSEG_CANCEL_FILE"
WATCHDOG_POLL_SECONDS = 0.5
# torchrun forwards the signal it receives to its workers; a Ctrl-C in a terminal reaches
# both torchrun and the workers, so a worker sees two signals for one request. Under
# torchrun a repeat within this window is taken as the same request.
TORCHRUN_DEBOUNCE_SECONDS = 2.0


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        choices=("auto", "bar", "plain", "jsonl", "none"),
        default="auto",
        help="How progress is reported: 'jsonl' = one JSON event per line on stdout (for programs, "
        "schema in docs/worker-protocol.md); 'bar'/'plain' = for people, on stderr; 'auto' = bar on a terminal.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="More detail in the log (stderr).")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (a count)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def label_value(text: str) -> int:
    """argparse type: a foreground label value (1 .. 2**31 - 1, what a class can hold)."""
    from buseg.files.images import MAX_LABEL_VALUE

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a label value (a whole number), got {text!r}") from None
    if not 1 <= value <= MAX_LABEL_VALUE:
        raise argparse.ArgumentTypeError(
            f"a foreground label value is 1..{MAX_LABEL_VALUE} (0 is the background), got {value}"
        )
    return value


def check_numbers(config: Any, prefix: str = "") -> None:
    """Every number of a config (and of its sections) is finite and integers fit 64 bits.

    A NaN threshold or learning rate does not fail: comparisons with it are simply false, and
    the result is silently wrong (or a training diverges for hours); an integer beyond 64 bits
    ends in a traceback deep inside torch. Both are refused here, naming the flag.
    """
    import dataclasses
    import math

    from buseg.config import _flag_for
    from buseg.errors import ConfigError

    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            check_numbers(value, prefix=f.name)
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, bool):
                continue
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{_flag_for(prefix, f)} must be a finite number, got {item}")
            if isinstance(item, int) and not -(2**63) <= item < 2**63:
                raise ConfigError(f"{_flag_for(prefix, f)} is out of range (64-bit integers): {item}")


def _rank() -> int:
    """torchrun's RANK (0 outside torchrun); read from the environment, without importing torch."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def _under_torchrun() -> bool:
    return os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1")


def setup_logging(verbose: bool) -> None:
    """Human logs on stderr; processes other than rank 0 (torchrun) log warnings only."""
    rank = _rank()
    level = logging.DEBUG if verbose else logging.INFO
    fmt = "%(levelname)s %(message)s"
    if rank:
        level, fmt = logging.WARNING, f"rank {rank}: %(levelname)s %(message)s"
    logging.basicConfig(stream=sys.stderr, level=level, format=fmt)
    logging.captureWarnings(True)  # Python warnings through logging, i.e. to stderr


# --------------------------------------------------------------------------------------
# The event sink, and keeping stdout for events only


def _real_fd(stream: Any) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # pytest's capture, Slicer's console: no fd
        return None


def claim_stdout() -> tuple[TextIO, Callable[[], None]] | None:
    """Keep the process's stdout (fd 1) for events; send everything else printed there to stderr.

    Libraries that print (a progress bar, a C extension, a stray ``print``) would corrupt
    the event stream, so fd 1 is pointed at stderr and the events get a private duplicate
    of the original stdout. Returns (events stream, function that undoes it), or None when
    ``sys.stdout`` is not the process's fd 1 (captured in a test, an embedded console).
    """
    if _real_fd(sys.stdout) != 1:
        return None
    sys.stdout.flush()
    saved = os.dup(1)
    events = os.fdopen(os.dup(1), "w", encoding="utf-8", newline="\n")
    os.dup2(_real_fd(sys.stderr) or 2, 1)

    def restore() -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
        with contextlib.suppress(OSError, ValueError):
            events.close()
        os.dup2(saved, 1)
        os.close(saved)

    return events, restore


class _QuietSink(EventSink):
    """Drops events (torchrun ranks other than 0); gives stdout back when closed."""

    def __init__(self, on_close: Callable[[], None] | None):
        self._on_close = on_close

    def close(self) -> None:
        callback, self._on_close = self._on_close, None
        if callback is not None:
            callback()


def make_sink(mode: str) -> EventSink:
    """The sink for ``--progress mode``. Under torchrun only rank 0 reports; the others drop events."""
    if _rank() != 0:
        if mode == "jsonl":
            claimed = claim_stdout()  # keep the shared stdout clean of other ranks' prints
            return _QuietSink(on_close=claimed[1] if claimed else None)
        return EventSink()
    if mode == "jsonl":
        claimed = claim_stdout()
        if claimed is None:
            return JsonLinesSink(sys.stdout)
        stream, restore = claimed
        return JsonLinesSink(stream, on_close=restore)
    if mode == "none":
        return EventSink()
    return TerminalSink(sys.stderr, bar={"bar": True, "plain": False}.get(mode))


# --------------------------------------------------------------------------------------
# Cancel


def _say(text: str) -> None:
    """Write to stderr from a signal handler (no Python-level buffer: no reentrancy error)."""
    with contextlib.suppress(OSError):
        os.write(2, text.encode("utf-8", "replace"))


class StopFlag:
    """Set by the first SIGTERM/SIGINT (SIGBREAK on Windows); a second signal exits at once.

    Call it (``stop()``) to ask whether to stop; a job checks it between steps, finishes
    the current one, saves what it needs and raises :class:`~buseg.errors.Cancelled`.
    With ``immediate`` (jobs with nothing to save: predict, rank, evaluate) the first signal
    raises ``KeyboardInterrupt`` at once wherever the job is (reading a model
    file, validating it, writing): its outputs are atomic, so the unwinding removes the
    temporary files and the lock, and nothing half-written stays.
    :meth:`install` also starts a watchdog thread when the client asked for it through the
    environment: ``BUSEG_CANCEL_FILE`` (the flag is set when that file appears: cancel
    without signals, for Windows GUI parents) and ``BUSEG_PARENT_PID`` (the flag is set
    when that process is gone). Only signals count towards "a second signal exits". The
    flag is a plain attribute (no lock), so the signal handler never blocks on it.
    """

    def __init__(self, *, immediate: bool = False) -> None:
        self.immediate = immediate
        self.raising = False  # run_job sets it while the job itself runs
        self._set = False
        self._signals = 0
        self._first_signal_seconds = 0.0
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._watchdog: threading.Thread | None = None
        self._watching = False

    def __call__(self) -> bool:
        return self._set

    def set(self, name: str = "request") -> None:
        if not self._set:
            self.signal_name = name
        self._set = True

    def _handler(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self._signals:
            if _under_torchrun() and now - self._first_signal_seconds < TORCHRUN_DEBOUNCE_SECONDS:
                return
            _say(f"{name} again: exiting now, without a checkpoint\n")
            os._exit(EXIT_CANCELLED)
        self._signals, self._first_signal_seconds = 1, now
        self.set(name)
        if self.immediate and self.raising:
            self.raising = False
            _say(f"{name}: stopping now (outputs already written stay; nothing half-written is left)\n")
            # KeyboardInterrupt, not Cancelled: no ``except Exception`` on the way may swallow it.
            raise KeyboardInterrupt(f"cancelled by {name}")
        _say(
            f"{name}: finishing the current step, then writing a checkpoint and stopping "
            "(send it again to stop at once)\n"
        )

    def install(self) -> None:
        """Handle SIGTERM/SIGINT (and SIGBREAK on Windows; only in the main thread) and start the watchdog."""
        if threading.current_thread() is threading.main_thread() and not self._previous:
            signals = [signal.SIGTERM, signal.SIGINT]
            if hasattr(signal, "SIGBREAK"):  # Windows: the client sends CTRL_BREAK_EVENT
                signals.append(signal.SIGBREAK)
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handler)
        self._start_watchdog()

    def restore(self) -> None:
        """Put back the signal handlers that were there before :meth:`install`; stop the watchdog."""
        for sig, previous in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
        self._watching = False

    def _start_watchdog(self) -> None:
        parent = os.environ.get(PARENT_PID_ENV, "")
        cancel_file = os.environ.get(CANCEL_FILE_ENV, "")
        if self._watchdog is not None or not (parent.isdigit() or cancel_file):
            return
        self._watching = True
        self._watchdog = threading.Thread(
            target=self._watch,
            args=(int(parent) if parent.isdigit() else None, cancel_file or None),
            name="buseg-stop-watchdog",
            daemon=True,
        )
        self._watchdog.start()

    def _watch(self, parent_pid: int | None, cancel_file: str | None) -> None:
        import psutil

        created = None
        if parent_pid is not None:
            try:
                created = psutil.Process(parent_pid).create_time()
            except psutil.Error:
                created = None
        while self._watching and not self._set:
            if cancel_file and os.path.exists(cancel_file):
                logger.info("cancel requested (%s exists)", cancel_file)
                self.set("cancel file")
                break
            if parent_pid is not None:
                try:
                    alive = created is not None and psutil.Process(parent_pid).create_time() == created
                except psutil.Error:
                    alive = False
                if not alive:  # gone (or its pid reused by another process)
                    logger.warning("the process that started this job (pid %d) is gone: stopping", parent_pid)
                    self.set("parent process exited")
                    break
            time.sleep(WATCHDOG_POLL_SECONDS)
        self._watchdog = None


# --------------------------------------------------------------------------------------
# Running a job


def _out_of_memory(exc: BaseException) -> bool:
    return (
        isinstance(exc, MemoryError)
        or type(exc).__name__ == "OutOfMemoryError"
        or "out of memory" in str(exc).lower()
    )


OOM_HINT = (
    "lower --batch-size or --patch-size (training) or --sw-batch-size (prediction), or use --device cpu"
)


@contextlib.contextmanager
def locked_output_folder(folder: str | Path, job: str) -> Iterator[Path]:
    """Create ``folder``, hold its lock while the block runs (a second job into the same folder
    refuses instead of silently replacing this one's files), and first remove the temporary
    files that an interrupted job left there. A folder created here and left empty (the job
    failed before writing) is removed again."""
    from buseg.files.safe_files import FolderLock, ensure_output_folder, remove_stale_temporaries

    folder = Path(folder)
    created = not folder.exists()
    ensure_output_folder(folder)
    try:
        with FolderLock(folder, job=f"buseg {job}"):
            for stale in remove_stale_temporaries(folder, depth=1):
                logger.info("removed %s, left by an interrupted run", stale)
            yield folder
    finally:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty


def _user_error_from(exc: Exception) -> BusegError | None:
    """An OS-level error on a file (a name too long, a FIFO, no space, a vanished file ...) as the
    usual one-line error naming the path: every such error on a user's path, wherever raised."""
    from buseg.files.images import error_from_os_error

    if isinstance(exc, OSError) and not _out_of_memory(exc):
        return error_from_os_error(exc)
    return None


def _report_user_error(sink: EventSink, exc: BusegError) -> tuple[str, int, str]:
    message = f"{exc.path}: {exc.message}" if exc.path else exc.message  # the hint has its own field
    sink.emit("error", message=message, kind=type(exc).__name__, path=exc.path, hint=exc.hint, detail=None)
    if not isinstance(sink, TerminalSink):
        logger.error("%s", exc)
    return "failed", exc.exit_code, message


def run_job(
    sink: EventSink, job: Callable[[], dict[str, Any] | None], *, job_name: str, stop: StopFlag | None = None
) -> int:
    """Run ``job`` (returns output paths) and report its end as events and an exit code.

    With ``stop``, its signal handlers are installed for the job's duration. The
    ``finished`` event is always the last event, then the sink is closed.
    """
    start = time.perf_counter()
    if stop is not None:
        stop.install()
    outputs: dict[str, Any] = {}
    message: str | None = None
    try:
        try:
            if stop is not None:
                stop.raising = True
            outputs = job() or {}
        finally:
            if stop is not None:
                stop.raising = False
        status, code = "completed", EXIT_COMPLETED
    except (Cancelled, KeyboardInterrupt) as exc:
        status, code = "cancelled", EXIT_CANCELLED
        message = str(exc) or "cancelled"
        outputs = dict(getattr(exc, "outputs", None) or {})
        logger.info("%s", message)
    except BusegError as exc:
        status, code, message = _report_user_error(sink, exc)
    except Exception as exc:  # a bug, out of memory, an environment failure: report it, never hang
        detail = traceback.format_exc()
        user_error = _user_error_from(exc)
        if user_error is not None:
            status, code, message = _report_user_error(sink, user_error)
            logger.debug("%s", detail.rstrip())
            detail = ""
        elif _out_of_memory(exc):
            status, code = "failed", EXIT_RESOURCE
            where = "GPU " if "cuda" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError" else ""
            message = f"out of {where}memory: {OOM_HINT}"
            sink.emit("error", message=message, kind="ResourceError", path=None, hint=OOM_HINT, detail=detail)
        else:
            status, code = "failed", EXIT_INTERNAL_ERROR
            message = f"{type(exc).__name__}: {exc}"
            sink.emit(
                "error",
                message=message,
                kind=type(exc).__name__,
                path=None,
                hint="this is a bug or an environment problem; the log has the details",
                detail=detail,
            )
        if detail:
            logger.error("%s\n%s", message, detail.rstrip())
    finally:
        if stop is not None:
            stop.restore()
    sink.emit(
        "finished",
        status=status,
        outputs=outputs,
        job=job_name,
        message=message,
        seconds=time.perf_counter() - start,
        exit_code=code,
    )
    sink.close()
    return code
