"""Progress events: what a running job tells its caller.

A job (training or prediction) reports through an :class:`EventSink`. The worker process
writes events as JSON lines on stdout (``--progress jsonl``; schema in
``schemas/events.schema.json``, documented in docs/worker-protocol.md, version
:data:`SCHEMA_VERSION`); on a terminal a progress bar is drawn instead. In-process
callers (tests, notebooks) can collect events in a list.

Every event is a flat JSON object with ``event`` (its type), ``schema`` (the version),
``time`` (unix seconds) and type-specific fields. :func:`validate_event` checks an event
against the schema without any extra dependency (a hand-written subset of JSON Schema:
the keywords the schema file uses).
"""

from __future__ import annotations

import functools
import json
import math
import sys
import threading
import time
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any, TextIO

SCHEMA_VERSION = 1

EVENT_TYPES = (
    "started",  # job, config, device, device_reason, total
    "progress",  # iteration, total, stage, losses{...}, stats{...}, lr, iterations_per_second, eta_seconds
    "validation",  # iteration, metrics{...}, best, best_iteration
    "checkpoint",  # iteration, path, kind ('last' | 'best' | 'final')
    "case",  # prediction: index, total, case, outputs{...}, seconds
    "warning",  # message, detail
    "error",  # message, kind, path, hint, detail
    "finished",  # status ('completed' | 'cancelled' | 'failed'), outputs{...}, job, seconds
)

FINISHED_STATUSES = ("completed", "cancelled", "failed")

# Method log keys that are not loss parts but numbers about the step (thresholds, kept
# fractions, ramp weights): progress events report them under ``stats``, not ``losses``.
STAT_SUFFIXES = ("_fraction", "_threshold", "_weight")


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


def split_logs(logs: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """Split a method's logged numbers into (loss parts, other statistics) by key name."""
    losses, stats = {}, {}
    for key, value in logs.items():
        (stats if key.endswith(STAT_SUFFIXES) else losses)[key] = value
    return losses, stats


# --------------------------------------------------------------------------------------
# Schema validation (no jsonschema dependency)


@functools.cache
def load_schema() -> dict[str, Any]:
    """The event schema shipped with the package (``buseg/schemas/events.schema.json``)."""
    text = resources.files("buseg").joinpath("schemas/events.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def validate_event(event: Any) -> list[str]:
    """Problems of ``event`` against the schema; an empty list means valid.

    The top-level ``oneOf`` is resolved by the ``event`` field (a discriminator), so the
    problems listed are those of the event's own type, not of all eight alternatives.
    """
    schema = load_schema()
    errors: list[str] = []
    base = {k: v for k, v in schema.items() if k != "oneOf"}
    _check(event, base, schema, "$", errors)
    if errors:
        return errors
    definition = schema["$defs"].get(event["event"])
    if definition is None:  # pragma: no cover - the enum above already refuses it
        return [f"$.event: no definition for {event['event']!r}"]
    _check(event, definition, schema, "$", errors)
    return errors


_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def _check(value: Any, schema: Any, root: dict[str, Any], path: str, errors: list[str]) -> None:
    """Validate ``value`` against the JSON Schema subset the event schema uses."""
    if schema is True or schema == {}:
        return
    if schema is False:
        errors.append(f"{path}: not allowed")
        return
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        _check(value, target, root, path, errors)
    for sub in schema.get("allOf", ()):
        _check(value, sub, root, path, errors)
    if "oneOf" in schema:
        results = []
        for sub in schema["oneOf"]:
            sub_errors: list[str] = []
            _check(value, sub, root, path, sub_errors)
            results.append(sub_errors)
        passing = sum(not r for r in results)
        if passing != 1:
            errors.append(
                f"{path}: matches {passing} of the {len(results)} alternatives (expected exactly one)"
            )
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](value) for t in types):
            errors.append(f"{path}: expected {' or '.join(types)}, got {type(value).__name__} {value!r:.60}")
            return
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: must be {schema['const']!r}, got {value!r:.60}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r:.60} is not one of {schema['enum']}")
    if _TYPES["number"](value) and "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{path}: {value} is below the minimum {schema['minimum']}")
    if isinstance(value, dict):
        for name in schema.get("required", ()):
            if name not in value:
                errors.append(f"{path}: missing required field {name!r}")
        properties = schema.get("properties", {})
        for name, item in value.items():
            if name in properties:
                _check(item, properties[name], root, f"{path}.{name}", errors)
            elif "additionalProperties" in schema:
                _check(item, schema["additionalProperties"], root, f"{path}.{name}", errors)
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            _check(item, schema["items"], root, f"{path}[{index}]", errors)


def parse_event_line(line: str) -> dict[str, Any] | None:
    """The event on one stdout line, or None if the line is not an event (a stray print)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("event"), str):
        return None
    return value


# --------------------------------------------------------------------------------------
# Sinks


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
    """One JSON object per line on ``stream`` (stdout for the worker), flushed per event.

    Lines are pure ASCII (``ensure_ascii``), so no console code page can garble them. If
    the reader has gone (broken pipe), events are dropped instead of crashing the job: the
    job still finishes its work or, under the client, is stopped by the parent watchdog
    (:mod:`buseg.commands.common`). ``on_close`` runs once when the sink is closed (the
    worker uses it to give stdout back).
    """

    def __init__(self, stream: TextIO | None = None, *, on_close: Callable[[], None] | None = None):
        self.stream = stream or sys.stdout
        self.broken = False
        self._lock = threading.Lock()
        self._on_close = on_close

    def handle(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, separators=(",", ":"), ensure_ascii=True)
        with self._lock:
            if self.broken:
                return
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (BrokenPipeError, ValueError, OSError):  # reader gone or stream closed
                self.broken = True

    def close(self) -> None:
        callback, self._on_close = self._on_close, None
        if callback is not None:
            callback()


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
            self._write(
                f"{event.get('job', 'job')} started on {event.get('device')} ({event.get('device_reason', '')})"
            )
            if event.get("precision"):  # which arithmetic (and for prediction, engine) runs, and why
                self._write(f"  precision: {event['precision']}")
            if self.bar_enabled and event.get("total"):
                from tqdm import tqdm

                self._bar = tqdm(
                    total=event["total"],
                    initial=event.get("start_iteration") or 0,
                    file=self.stream,
                    dynamic_ncols=True,
                    unit="it",
                )
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
                self._write(
                    f"[{event.get('iteration')}/{event.get('total')}] {event.get('stage', '')} {text}{eta_text}"
                )
        elif kind == "validation":
            metrics = event.get("metrics") or {}
            text = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
            self._write(f"validation @ {event.get('iteration')}: {text} (best {event.get('best')})")
        elif kind == "case":
            self._write(
                f"[{event.get('index')}/{event.get('total')}] {event.get('case')} ({event.get('seconds', 0):.1f} s)"
            )
        elif kind == "checkpoint":
            pass
        elif kind in ("warning", "error"):
            hint = event.get("hint")
            self._write(f"{kind}: {event.get('message')}" + (f"\n  hint: {hint}" if hint else ""))
        elif kind == "finished":
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            message = event.get("message")
            self._write(f"finished: {event.get('status')}" + (f" ({message})" if message else ""))

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
