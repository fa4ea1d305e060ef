"""The worker client: its state machine on its own, fake workers, and the real worker with cancel."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from buseg.client import (
    CANCELLED,
    CANCELLING,
    FAILED,
    FINISHED,
    IDLE,
    RUNNING,
    STARTING,
    WorkerClient,
    WorkerStateMachine,
)
from buseg.events import validate_event
from buseg.model.checkpoint import load_model, read_checkpoint

# --------------------------------------------------------------------------------------
# The state machine, driven by hand


def _events(*statuses):
    return [{"event": "finished", "status": s} for s in statuses]


def test_state_machine_normal_run():
    m = WorkerStateMachine()
    assert m.state == IDLE and not m.final
    m.launch()
    assert m.state == STARTING
    m.on_event({"event": "warning", "message": "x"})
    assert m.state == STARTING  # only 'started' means running
    m.on_event({"event": "started"})
    m.on_event({"event": "progress", "iteration": 1, "total": 2})
    assert m.state == RUNNING
    m.on_event(_events("completed")[0])
    assert m.state == RUNNING  # final only once the process has exited
    m.on_exit(0)
    assert m.state == FINISHED and m.final
    assert m.transitions == [(IDLE, STARTING), (STARTING, RUNNING), (RUNNING, FINISHED)]


@pytest.mark.parametrize(
    ("finished", "exit_code", "expected"),
    [
        ("cancelled", 130, CANCELLED),  # the worker saved and said so
        (None, -9, CANCELLED),  # killed after the grace period: still what the user asked for
        (None, 130, CANCELLED),  # second signal: exited without a word
        ("completed", 0, FINISHED),  # the job ended before the cancel took effect
        ("failed", 2, FAILED),
    ],
)
def test_state_machine_cancel(finished, exit_code, expected):
    m = WorkerStateMachine()
    m.launch()
    m.on_event({"event": "started"})
    assert m.request_cancel() is True and m.state == CANCELLING
    assert m.request_cancel() is False  # already cancelling
    if finished:
        m.on_event({"event": "finished", "status": finished})
    m.on_exit(exit_code)
    assert m.state == expected


@pytest.mark.parametrize(
    ("events", "exit_code"),
    [
        ([{"event": "error", "message": "bad"}, *_events("failed")], 2),
        ([], 2),  # usage error: no events at all
        ([], -11),  # crashed (segfault)
        (_events("completed"), 1),  # said completed, yet the process failed
    ],
)
def test_state_machine_failures(events, exit_code):
    m = WorkerStateMachine()
    m.launch()
    for event in events:
        m.on_event(event)
    m.on_exit(exit_code)
    assert m.state == FAILED and m.exit_code == exit_code


def test_state_machine_refuses_what_cannot_happen():
    m = WorkerStateMachine()
    assert m.request_cancel() is False  # nothing to cancel
    m.launch()
    with pytest.raises(RuntimeError, match="one job"):
        m.launch()
    m.launch_failed("no python")
    assert m.state == FAILED and m.failure_message == "no python"
    assert m.request_cancel() is False
    m.on_exit(0)  # ignored once final
    assert m.state == FAILED


# --------------------------------------------------------------------------------------
# Fake workers (any command line that speaks the protocol)


def fake_worker(tmp_path: Path, body: str, **kwargs) -> WorkerClient:
    script = tmp_path / "fake_worker.py"
    script.write_text(textwrap.dedent(body))
    return WorkerClient("train", argv=[sys.executable, str(script)], **kwargs)


EVENT = '{{"event":"{kind}","schema":1,"time":0{extra}}}'


def test_client_reads_events_and_keeps_other_output_as_log(tmp_path):
    started = EVENT.format(
        kind="started", extra=',"job":"train","config":{},"device":"cpu","device_reason":"x","total":2'
    )
    progress = EVENT.format(kind="progress", extra=',"iteration":1,"total":2')
    finished = EVENT.format(
        kind="finished", extra=',"status":"completed","outputs":{"model":"m.pt"},"job":"train"'
    )
    client = fake_worker(
        tmp_path,
        f"""
        import sys, time
        print('{started}', flush=True)
        print("a stray line on stdout", flush=True)
        print("[1, 2]", flush=True)
        print("log line on stderr", file=sys.stderr, flush=True)
        time.sleep(0.3)
        print('{progress}', flush=True)
        print('{finished}', flush=True)
    """,
        log_path=tmp_path / "logs" / "worker.log",
    )
    assert client.argv[-2:] == ["--progress", "jsonl"]
    assert client.state == IDLE and client.poll() == []
    client.start()
    assert client.state == STARTING
    seen = []
    deadline = time.monotonic() + 30
    while not client.done and time.monotonic() < deadline:
        seen += client.poll()
        time.sleep(0.01)
    seen += client.poll()
    assert [e["event"] for e in seen] == ["started", "progress", "finished"]
    assert client.state == FINISHED and client.result.status == "completed"
    assert client.result.outputs == {"model": "m.pt"} and client.result.exit_code == 0
    assert client.last_progress["iteration"] == 1 and client.started_event["device"] == "cpu"
    log = client.log_text()
    assert (
        "[stdout] a stray line on stdout" in log and "[stdout] [1, 2]" in log and "log line on stderr" in log
    )
    assert "log line on stderr" in (tmp_path / "logs" / "worker.log").read_text()
    assert client.poll() == []  # each event is delivered once


def test_a_worker_that_dies_without_a_word_fails_with_its_log(tmp_path):
    client = fake_worker(
        tmp_path,
        """
        import sys
        print("usage: buseg train [-h] ...", file=sys.stderr)
        print("buseg train: error: unrecognized arguments: --bogus", file=sys.stderr)
        sys.exit(2)
    """,
    )
    client.start()
    result = client.wait(timeout=30)
    assert client.state == FAILED and result.status == "failed" and result.exit_code == 2
    assert "unrecognized arguments: --bogus" in result.message and "code 2" in result.message


def test_a_worker_that_cannot_be_launched_fails_at_once(tmp_path):
    client = WorkerClient("train", python=tmp_path / "no" / "python")
    client.start()
    assert client.state == FAILED and client.done
    assert "cannot start the worker" in client.result.message
    assert client.wait(timeout=1).status == "failed"


def test_wait_times_out_and_a_stubborn_worker_is_killed_with_its_children(tmp_path):
    client = fake_worker(
        tmp_path,
        """
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a worker that does not listen
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print('{"event":"started","schema":1,"time":0,"job":"train","config":{},"device":"cpu",'
              '"device_reason":"x","total":1}', flush=True)
        print(child.pid, file=sys.stderr, flush=True)
        time.sleep(120)
    """,
        grace_seconds=1.0,
    )
    client.start()
    with pytest.raises(TimeoutError):
        client.wait(timeout=2)
    assert client.state == RUNNING
    worker = psutil.Process(client.pid)
    children = worker.children(recursive=True)
    assert len(children) == 1
    assert client.cancel() is True and client.state == CANCELLING
    start = time.monotonic()
    result = client.wait(timeout=30)
    assert time.monotonic() - start < 15
    assert result.status == "cancelled" and result.exit_code is not None and result.exit_code < 0
    assert "before it could save" in result.message
    assert not any(_alive(p) for p in [worker, *children])
    assert client.cancel() is False  # nothing left to cancel


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# --------------------------------------------------------------------------------------
# The real worker


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_client_runs_cancels_and_resumes_a_real_training(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    args = [
        "--method",
        "buarl",
        "--labeled",
        str(tiny_dataset["labeled"]),
        "--unlabeled",
        str(tiny_dataset["unlabeled"]),
        "--iterations",
        "36",
        "--pretrain-iterations",
        "4",
        "--out",
        "run",
        "--patch-size",
        "48",
        "48",
        "--batch-size",
        "4",
        "--num-threads",
        "1",
        "--log-interval",
        "2",
        "--base-channels",
        "8",
        "--validation-interval",
        "0",
    ]
    client = WorkerClient("train", args, cwd=tmp_path)  # --out relative to cwd
    client.start()
    states, cancelled_at = set(), None
    deadline = time.monotonic() + 120
    while not client.done and time.monotonic() < deadline:
        states.add(client.state)
        for event in client.poll():
            assert validate_event(event) == []
            if event["event"] == "progress" and cancelled_at is None:
                assert client.cancel() is True
                cancelled_at = time.monotonic()
        time.sleep(0.01)
    assert client.done and time.monotonic() - cancelled_at < 10
    assert {STARTING, RUNNING, CANCELLING} <= states
    result = client.result
    assert client.state == CANCELLED and result.status == "cancelled" and result.exit_code == 130
    assert Path(result.outputs["last"]) == out / "last.pt"
    saved = read_checkpoint(out / "last.pt")["training_state"]["iteration"]
    assert result.last_progress["iteration"] <= saved < 40
    assert "SIGTERM" in client.log_text()

    resumed = WorkerClient("train", [*args, "--resume"], cwd=tmp_path)
    resumed.start()
    result = resumed.wait(timeout=180)
    assert resumed.state == FINISHED, resumed.log_text()
    assert result.status == "completed" and result.exit_code == 0 and result.last_progress["iteration"] == 40
    assert resumed.started_event["resumed"] is True and resumed.started_event["start_iteration"] == saved
    assert load_model(result.outputs["model"]).metadata["iteration"] == 40
