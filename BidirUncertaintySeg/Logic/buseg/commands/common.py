"""What every sub-command shares: logging to stderr, the event sink, running a job safely.

``run_job`` is the one place that turns outcomes into exit codes and final events:

* success -> ``finished``/``completed``, exit 0;
* :class:`~buseg.errors.BusegError` (bad input, bad config, unwritable output) -> an
  ``error`` event with the message, ``finished``/``failed``, exit code of the error (2/3);
* cancel (SIGTERM/SIGINT) -> ``finished``/``cancelled``, exit 130;
* anything else (a bug, out of memory) -> ``error`` with the exception and traceback in
  ``detail``, ``finished``/``failed``, exit 1.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from ..errors import BusegError, Cancelled
from ..events import EventSink, JsonLinesSink, TerminalSink

EXIT_CANCELLED = 130


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress", choices=("auto", "bar", "plain", "jsonl", "none"), default="auto",
        help="How progress is reported: 'jsonl' = one JSON event per line on stdout (for programs, "
        "schema in docs/worker-protocol.md); 'bar'/'plain' = for people, on stderr; 'auto' = bar on a terminal.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="More detail in the log (stderr).")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(message)s")


def make_sink(mode: str) -> EventSink:
    if mode == "jsonl":
        return JsonLinesSink(sys.stdout)
    if mode == "none":
        return EventSink()
    return TerminalSink(sys.stderr, bar={"bar": True, "plain": False}.get(mode))


class StopFlag:
    """Set by the first SIGTERM/SIGINT; a second signal exits at once."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None

    def __call__(self) -> bool:
        return self._event.is_set()

    def set(self, name: str = "request") -> None:
        self.signal_name = name
        self._event.set()

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, frame: Any) -> None:
            if self._event.is_set():
                sys.stderr.write("second signal: exiting now\n")
                sys.stderr.flush()
                import os

                os._exit(EXIT_CANCELLED)
            self.set(signal.Signals(signum).name)
            sys.stderr.write(f"{self.signal_name}: finishing the current step, writing a checkpoint...\n")
            sys.stderr.flush()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def run_job(sink: EventSink, job: Callable[[], dict[str, Any]], *, job_name: str) -> int:
    """Run ``job`` (returns output paths) and report its end as an event and an exit code."""
    start = time.perf_counter()
    try:
        outputs = job()
    except Cancelled as exc:
        sink.emit("finished", status="cancelled", message=str(exc), outputs={}, job=job_name,
                  seconds=time.perf_counter() - start)
        return EXIT_CANCELLED
    except BusegError as exc:
        sink.emit("error", message=str(exc), kind=type(exc).__name__, path=exc.path, detail=exc.hint)
        sink.emit("finished", status="failed", outputs={}, job=job_name, seconds=time.perf_counter() - start)
        if not isinstance(sink, JsonLinesSink):
            pass
        return exc.exit_code
    except KeyboardInterrupt:
        sink.emit("finished", status="cancelled", outputs={}, job=job_name, seconds=time.perf_counter() - start)
        return EXIT_CANCELLED
    except MemoryError:
        sink.emit("error", message="out of memory", kind="MemoryError",
                  detail="lower --batch-size or --patch-size (training) or --sw-batch-size (prediction)")
        sink.emit("finished", status="failed", outputs={}, job=job_name, seconds=time.perf_counter() - start)
        return 3
    except Exception as exc:  # a bug or an environment failure: report it, never hang
        message = _oom_message(exc) or f"{type(exc).__name__}: {exc}"
        sink.emit("error", message=message, kind=type(exc).__name__, detail=traceback.format_exc())
        sink.emit("finished", status="failed", outputs={}, job=job_name, seconds=time.perf_counter() - start)
        return 1
    finally:
        sink.close()
    sink.emit("finished", status="completed", outputs=outputs, job=job_name, seconds=time.perf_counter() - start)
    return 0


def _oom_message(exc: Exception) -> str | None:
    text = str(exc)
    if "out of memory" in text.lower():
        return ("out of GPU memory: lower --batch-size or --patch-size (training), or --sw-batch-size "
                "(prediction); or use --device cpu")
    return None
