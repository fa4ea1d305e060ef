"""The event schema, its validator, the sinks, and the documented examples (no training here)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from buseg.events import (
    EVENT_TYPES,
    SCHEMA_VERSION,
    JsonLinesSink,
    ListSink,
    TerminalSink,
    load_schema,
    make_event,
    parse_event_line,
    split_logs,
    validate_event,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "worker-protocol.md"


def documented_examples() -> list[dict]:
    """The example lines of docs/worker-protocol.md (the ```jsonl block after the marker)."""
    text = DOC.read_text(encoding="utf-8")
    block = re.search(r"<!-- examples:.*?-->\s*```jsonl\n(.*?)```", text, re.S)
    assert block, "docs/worker-protocol.md lost its example block"
    return [json.loads(line) for line in block.group(1).splitlines() if line.strip()]


def test_the_documented_examples_cover_every_event_type_and_are_valid():
    examples = documented_examples()
    assert sorted(e["event"] for e in examples) == sorted(EVENT_TYPES)
    for example in examples:
        assert validate_event(example) == [], example["event"]


def test_schema_file_ships_with_the_package_and_matches_the_code():
    schema = load_schema()
    assert schema["properties"]["schema"]["const"] == SCHEMA_VERSION
    assert schema["properties"]["event"]["enum"] == list(EVENT_TYPES)
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in schema["oneOf"]} == set(EVENT_TYPES)


def test_made_events_carry_type_version_and_time_and_refuse_unknown_types():
    event = make_event("progress", iteration=3, total=10, losses={"total": float("nan"), "supervised": 0.5})
    assert event["event"] == "progress" and event["schema"] == SCHEMA_VERSION and event["time"] > 1e9
    assert event["losses"]["total"] is None  # NaN is not JSON: sent as null
    assert validate_event(event) == []
    json.loads(json.dumps(event, allow_nan=False))
    with pytest.raises(ValueError, match="unknown event type"):
        make_event("progess")


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"iteration": None}, "$.iteration: expected integer"),
        ({"iteration": True}, "$.iteration: expected integer"),  # a bool is not an integer
        ({"iteration": -1}, "below the minimum"),
        ({"schema": 2}, "$.schema: must be 1"),
        ({"event": "progres"}, "$.event"),
        ({"losses": {"total": "low"}}, "$.losses.total: expected number or null"),
        ({"total": "10"}, "$.total: expected integer"),
    ],
)
def test_invalid_events_are_reported_with_the_field_at_fault(change, problem):
    event = make_event("progress", iteration=3, total=10, losses={"total": 0.5})
    event.update(change)
    errors = validate_event(event)
    assert any(problem in e for e in errors), errors


@pytest.mark.parametrize(
    ("event_type", "missing"),
    [
        ("started", "device_reason"),
        ("progress", "total"),
        ("checkpoint", "kind"),
        ("error", "message"),
        ("finished", "status"),
        ("validation", "metrics"),
    ],
)
def test_missing_required_fields_are_reported(event_type, missing):
    example = next(e for e in documented_examples() if e["event"] == event_type)
    del example[missing]
    assert f"missing required field {missing!r}" in " ".join(validate_event(example))


def test_finished_status_must_be_one_of_three():
    event = make_event("finished", status="done", outputs={}, job="train")
    assert any("status" in e for e in validate_event(event))


def test_parse_event_line_keeps_stray_output_apart():
    assert parse_event_line('{"event":"warning","schema":1,"time":1,"message":"x"}\n')["message"] == "x"
    for line in ("hello", "", "[1, 2]", '{"no": "event"}', '{"event": 3}', "{broken json"):
        assert parse_event_line(line) is None, line


def test_split_logs_separates_loss_parts_from_statistics():
    losses, stats = split_logs(
        {
            "total": 1.0,
            "supervised": 0.5,
            "crl": 0.3,
            "url": 0.2,
            "consistency": 0.1,
            "crl_threshold": 0.4,
            "crl_kept_fraction": 0.9,
            "url_selected_fraction": 0.1,
            "consistency_weight": 0.05,
        }
    )
    assert set(losses) == {"total", "supervised", "crl", "url", "consistency"}
    assert set(stats) == {"crl_threshold", "crl_kept_fraction", "url_selected_fraction", "consistency_weight"}


def test_json_lines_sink_writes_one_ascii_line_per_event():
    stream = io.StringIO()
    sink = JsonLinesSink(stream)
    sink.emit("warning", message="Größe ✓")
    sink.emit("progress", iteration=1, total=2)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and all(line.isascii() for line in lines)
    assert json.loads(lines[0])["message"] == "Größe ✓"


def test_json_lines_sink_survives_a_reader_that_went_away():
    class Broken(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    closed = []
    sink = JsonLinesSink(Broken(), on_close=lambda: closed.append(True))
    sink.emit("progress", iteration=1, total=2)  # must not raise: the job goes on
    sink.emit("progress", iteration=2, total=2)
    assert sink.broken
    sink.close()
    sink.close()
    assert closed == [True]  # on_close runs once


def test_terminal_sink_shows_errors_with_their_hint():
    stream = io.StringIO()
    sink = TerminalSink(stream, bar=False)
    sink.emit("error", message="a.nii: unreadable", kind="InputError", hint="check the file")
    sink.emit("finished", status="failed", outputs={}, job="train", message="a.nii: unreadable")
    text = stream.getvalue()
    assert (
        "error: a.nii: unreadable" in text and "hint: check the file" in text and "finished: failed" in text
    )


def test_list_sink_collects_in_order():
    sink = ListSink()
    for i in range(3):
        sink.emit("progress", iteration=i, total=3)
    assert [e["iteration"] for e in sink.events] == [0, 1, 2]
