"""Progress events: what a running job tells its caller.

A job (training or prediction) reports through an :class:`EventSink`. The worker process
writes events as JSON lines on stdout (``--progress jsonl``; schema in
docs/worker-protocol.md, version :data:`SCHEMA_VERSION`); on a terminal a progress bar
is drawn instead. In-process callers (tests, notebooks) can collect events in a list.

Every event is a flat JSON object with ``event`` (its type), ``schema`` (the version),
``time`` (unix seconds) and type-specific fields.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

SCHEMA_VERSION = 1

EVENT_TYPES = (
    "started",      # job, config, device, device_reason, total
    "progress",     # iteration, total, losses{...}, lr, iterations_per_second, eta_seconds, stage
    "validation",   # iteration, metrics{...}, best, best_iteration
    "checkpoint",   # iteration, path, kind ('last' | 'best' | 'final')
    "case",         # prediction: index, total, case, outputs{...}, seconds
    "warning",      # message, detail
    "error",        # message, detail, kind
    "finished",     # status ('completed' | 'cancelled' | 'failed'), outputs{...}, seconds
)

FINISHED_STATUSES = ("completed", "cancelled", "failed")


def _finite(value: Any) -> Any:
    """JSON has no NaN/Infinity: send null instead so every line parses everywhere."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def make_event(event_type: str, /, **fields: Any) -> dict[str, Any]:
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    return _finite({"event": event_type, "schema": SCHEMA_VERSION, "time": round(time.time(), 3), **fields})


class EventSink:
    """Receives events. The base class ignores them; subclasses print, collect or forward."""

    def emit(self, event_type: str, /, **fields: Any) -> None:
        self.handle(make_event(event_type, **fields))

    def handle(self, event: dict[str, Any]) -> None:  # pragma: no cover - default does nothing
        pass

    def close(self) -> None:
        pass


class ListSink(EventSink):
    """Collects events in ``self.events`` (tests, notebooks)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def handle(self, event: dict[str, Any]) -> None:
        self.events.append(event)


class CallbackSink(EventSink):
    def __init__(self, callback: Callable[[dict[str, Any]], None]):
        self.callback = callback

    def handle(self, event: dict[str, Any]) -> None:
        self.callback(event)


class JsonLinesSink(EventSink):
    """One JSON object per line on ``stream`` (stdout for the worker), flushed per event."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self._lock = threading.Lock()

    def handle(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, separators=(",", ":"))
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()


class TerminalSink(EventSink):
    """A progress bar (tqdm) and short messages on stderr, for people at a terminal."""

    def __init__(self, stream: TextIO | None = None, *, bar: bool | None = None):
        self.stream = stream or sys.stderr
        self.bar_enabled = self.stream.isatty() if bar is None else bar
        self._bar = None

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def handle(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "started":
            self._write(f"{event.get('job', 'job')} started on {event.get('device')} ({event.get('device_reason', '')})")
            if self.bar_enabled and event.get("total"):
                from tqdm import tqdm

                self._bar = tqdm(total=event["total"], file=self.stream, dynamic_ncols=True, unit="it")
        elif kind == "progress":
            losses = event.get("losses") or {}
            text = " ".join(f"{k}={v:.3f}" for k, v in losses.items() if isinstance(v, (int, float)))
            if self._bar is not None:
                self._bar.n = event.get("iteration", self._bar.n)
                self._bar.set_postfix_str(f"{event.get('stage', '')} {text}".strip(), refresh=False)
                self._bar.refresh()
            else:
                eta = event.get("eta_seconds")
                eta_text = f" eta {eta / 60:.1f} min" if isinstance(eta, (int, float)) else ""
                self._write(f"[{event.get('iteration')}/{event.get('total')}] {event.get('stage', '')} {text}{eta_text}")
        elif kind == "validation":
            metrics = event.get("metrics") or {}
            text = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
            self._write(f"validation @ {event.get('iteration')}: {text} (best {event.get('best')})")
        elif kind == "case":
            self._write(f"[{event.get('index')}/{event.get('total')}] {event.get('case')} ({event.get('seconds', 0):.1f} s)")
        elif kind == "checkpoint":
            pass
        elif kind in ("warning", "error"):
            self._write(f"{kind}: {event.get('message')}")
        elif kind == "finished":
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self._write(f"finished: {event.get('status')}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class MultiSink(EventSink):
    def __init__(self, *sinks: EventSink):
        self.sinks = [s for s in sinks if s is not None]

    def handle(self, event: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.handle(event)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
