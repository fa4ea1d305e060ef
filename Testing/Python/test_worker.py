"""The worker: ``python -m buseg train --progress jsonl`` as a real subprocess on generated data.

Events on stdout (and nothing else), validated against the schema; cancel by signal with a
checkpoint and ``--resume``; a second signal; bad input; how outcomes map to exit codes;
and, in-process, that an interrupted-then-resumed run ends with the weights of an
uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from buseg.commands.common import CANCEL_FILE_ENV, EXIT_CANCELLED, PARENT_PID_ENV, StopFlag, run_job
from buseg.config import TrainConfig
from buseg.device import resolve_device
from buseg.errors import Cancelled, InputError, ResourceError
from buseg.events import ListSink, validate_event
from buseg.model.checkpoint import load_model, read_checkpoint
from buseg.training.loop import train

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

SMALL = [
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
]


def worker_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "buseg", "train", *args, "--progress", "jsonl"]


def parse_stdout(text: str) -> list[dict]:
    """Every stdout line must be a valid event: nothing else may reach stdout."""
    events = []
    for line in text.splitlines():
        event = json.loads(line)
        assert validate_event(event) == [], (event, validate_event(event))
        events.append(event)
    return events


def semi_args(data: dict[str, Path], out: Path, iterations: int, pretrain: int = 4) -> list[str]:
    return [
        "--method",
        "buarl",
        "--labeled",
        str(data["labeled"]),
        "--unlabeled",
        str(data["unlabeled"]),
        "--iterations",
        str(iterations),
        "--pretrain-iterations",
        str(pretrain),
        "--out",
        str(out),
        *SMALL,
    ]


def test_worker_reports_a_whole_training_as_valid_events(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    args = [
        *semi_args(tiny_dataset, out, iterations=16),
        "--crl",  # both of our method's parts report their losses (CRL is off by default)
        "--validation",
        str(tiny_dataset["test"]),
        "--validation-interval",
        "10",
    ]
    done = subprocess.run(worker_argv(*args), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    events = parse_stdout(done.stdout)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished" and kinds.count("finished") == 1

    started = events[0]
    assert started["device"] == str(resolve_device("auto")[0]) and started["device_reason"].startswith("auto")
    assert started["total"] == 20 and started["start_iteration"] == 0 and started["resumed"] is False
    assert started["num_threads"] == 1 and started["config"]["method"]["name"] == "buarl"
    if started["device"] == "cpu":
        assert started["amp"] is None  # mixed precision is for CUDA only

    progress = [e for e in events if e["event"] == "progress"]
    iterations = [e["iteration"] for e in progress]
    assert iterations == sorted(set(iterations)) and iterations[-1] == 20  # strictly increasing, to the end
    assert {e["stage"] for e in progress} == {"pretrain", "train"}
    last = progress[-1]
    assert {"total", "supervised", "crl", "url"} <= set(last["losses"])
    assert {"crl_threshold", "crl_kept_fraction", "url_selected_fraction"} <= set(last["stats"])
    assert last["lr"] > 0 and last["iterations_per_second"] > 0 and last["eta_seconds"] == 0

    validations = [e for e in events if e["event"] == "validation"]
    assert [v["iteration"] for v in validations] == [10, 20] and 0 <= validations[-1]["metrics"]["dice"] <= 1
    checkpoints = {e["kind"] for e in events if e["event"] == "checkpoint"}
    assert checkpoints == {"last", "best", "final"}

    finished = events[-1]
    assert finished["status"] == "completed" and finished["exit_code"] == 0
    outputs = finished["outputs"]
    assert Path(outputs["model"]).is_absolute() and Path(outputs["model"]) == out / "model.pt"
    for key in ("model", "last", "best"):
        assert Path(outputs[key]).is_file()
    assert load_model(outputs["model"]).metadata["method"] == "buarl"
    assert "INFO" in done.stderr  # the human log went to stderr


def test_nothing_but_events_reaches_stdout_in_jsonl_mode(tmp_path):
    """Prints from Python and from C level during a job end up on stderr, not between the events."""
    script = textwrap.dedent("""
        import os, sys
        from buseg.commands.common import make_sink, run_job
        sink = make_sink("jsonl")
        def job():
            print("a stray print")
            sys.stdout.flush()
            os.write(1, b"a C-level write\\n")
            return {"ok": "yes"}
        code = run_job(sink, job, job_name="train")
        print("after the job")  # stdout is given back afterwards
        sys.exit(code)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [json.loads(line)["event"] for line in lines[:-1]] == ["finished"]
    assert lines[-1] == "after the job"
    assert "a stray print" in done.stderr and "a C-level write" in done.stderr


@pytest.mark.slow
def test_cancel_writes_a_checkpoint_exits_promptly_and_resume_completes(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    args = semi_args(tiny_dataset, out, iterations=36)
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(worker_argv(*args), stdout=subprocess.PIPE, stderr=stderr, text=True)
        lines = []
        for line in process.stdout:
            lines.append(line)
            if json.loads(line)["event"] == "progress":
                break
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=60)
        seconds = time.monotonic() - signalled
    assert process.returncode == EXIT_CANCELLED, (tmp_path / "stderr.txt").read_text()
    assert seconds < 10, f"took {seconds:.1f} s to stop"
    events = parse_stdout("".join(lines) + rest)
    finished = events[-1]
    assert finished["event"] == "finished" and finished["status"] == "cancelled"
    assert "resume" in finished["message"]
    last = Path(finished["outputs"]["last"])
    state = read_checkpoint(last)["training_state"]  # a valid, resumable checkpoint
    saved = state["iteration"]
    assert 2 <= saved < 40
    assert [e for e in events if e["event"] == "checkpoint"][-1]["iteration"] == saved

    done = subprocess.run(worker_argv(*args, "--resume"), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    resumed = parse_stdout(done.stdout)
    # Warnings found while loading (here: no validation data) may come before 'started'.
    started = next(e for e in resumed if e["event"] != "warning")
    assert started["event"] == "started" and started["resumed"] is True
    assert started["start_iteration"] == saved
    progress = [e["iteration"] for e in resumed if e["event"] == "progress"]
    assert progress[0] > saved and progress[-1] == 40 and progress == sorted(set(progress))
    assert resumed[-1]["status"] == "completed"
    assert load_model(out / "model.pt").metadata["iteration"] == 40


def test_a_second_signal_exits_at_once(tiny_dataset, tmp_path):
    # Slow iterations (large slices), so that a graceful stop could not win the race.
    args = [
        "--method",
        "supervised",
        "--labeled",
        str(tiny_dataset["labeled"]),
        "--iterations",
        "400",
        "--out",
        str(tmp_path / "run"),
        "--patch-size",
        "256",
        "256",
        "--batch-size",
        "8",
        "--num-threads",
        "1",
    ]
    process = subprocess.Popen(worker_argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while json.loads(process.stdout.readline())["event"] != "started":
        pass
    # Two different signals: the kernel would merge two pending signals of the same kind.
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGINT)
    start = time.monotonic()
    rest, stderr = process.communicate(timeout=60)
    assert time.monotonic() - start < 5
    assert process.returncode == EXIT_CANCELLED
    assert "exiting now" in stderr
    assert "finished" not in [json.loads(line)["event"] for line in rest.splitlines()]


def test_bad_input_gives_an_error_event_naming_the_file_and_a_non_zero_exit(dataset_copy, tmp_path):
    broken = dataset_copy["labeled"] / "images" / "labeled_001.nii.gz"
    broken.write_bytes(b"this is not an image")
    args = [
        "--method",
        "supervised",
        "--labeled",
        str(dataset_copy["labeled"]),
        "--iterations",
        "4",
        "--out",
        str(tmp_path / "run"),
        *SMALL,
    ]
    done = subprocess.run(worker_argv(*args), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    events = parse_stdout(done.stdout)
    assert [e["event"] for e in events] == ["error", "finished"]
    assert str(broken) in events[0]["message"] and events[0]["kind"] == "InputError"
    assert events[-1]["status"] == "failed" and events[-1]["exit_code"] == 2
    assert str(broken) in done.stderr  # the log says it too
    assert not (tmp_path / "run" / "model.pt").exists()


def test_an_unavailable_device_is_an_error_not_a_fallback(tiny_dataset, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from buseg.cli import main

    code = main(
        [
            "train",
            "--method",
            "supervised",
            "--labeled",
            str(tiny_dataset["labeled"]),
            "--device",
            "cuda",
            "--out",
            str(tmp_path / "run"),
            "--progress",
            "jsonl",
            *SMALL,
        ]
    )
    assert code == 2
    error = next(e for e in parse_stdout(capsys.readouterr().out) if e["event"] == "error")
    assert "CUDA is not available" in error["message"] and error["hint"]


# --------------------------------------------------------------------------------------
# run_job and StopFlag, in-process


class ClosingSink(ListSink):
    def __init__(self):
        super().__init__()
        self.closed_after = None

    def close(self):
        self.closed_after = len(self.events)


def _raise(exc):
    def job():
        raise exc

    return job


def _cancelled():
    exc = Cancelled("cancelled at iteration 3 of 9; resume with --resume")
    exc.outputs = {"last": "/x/last.pt", "out_dir": "/x"}
    raise exc


@pytest.mark.parametrize(
    ("job", "code", "status", "kind", "message"),
    [
        (lambda: {"model": "/x/model.pt"}, 0, "completed", None, None),
        (_cancelled, 130, "cancelled", None, "resume with --resume"),
        (
            _raise(InputError("cannot be read", path="/data/a.nii.gz", hint="re-export it")),
            2,
            "failed",
            "InputError",
            "/data/a.nii.gz: cannot be read",
        ),
        (_raise(ResourceError("would need 80 GB")), 3, "failed", "ResourceError", "80 GB"),
        (_raise(MemoryError()), 3, "failed", "ResourceError", "out of memory"),
        (
            _raise(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")),
            3,
            "failed",
            "ResourceError",
            "out of GPU memory",
        ),
        (_raise(ZeroDivisionError("division by zero")), 1, "failed", "ZeroDivisionError", "division by zero"),
    ],
)
def test_run_job_turns_every_outcome_into_events_and_an_exit_code(job, code, status, kind, message):
    sink = ClosingSink()
    assert run_job(sink, job, job_name="train") == code
    for event in sink.events:
        assert validate_event(event) == []
    finished = sink.events[-1]
    assert finished["event"] == "finished" and finished["status"] == status and finished["exit_code"] == code
    assert sink.closed_after == len(sink.events)  # closed after the last event
    errors = [e for e in sink.events if e["event"] == "error"]
    if kind is None:
        assert errors == []
    else:
        assert errors[0]["kind"] == kind and message in errors[0]["message"]
    if status == "cancelled":
        assert finished["outputs"]["last"] == "/x/last.pt" and message in finished["message"]
    if kind == "ZeroDivisionError":
        assert "Traceback" in errors[0]["detail"]
    if kind == "InputError":
        assert errors[0]["path"] == "/data/a.nii.gz" and errors[0]["hint"] == "re-export it"


def test_stop_flag_catches_the_first_signal_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    stop = StopFlag()
    stop.install()
    try:
        assert not stop()
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not stop() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop() and stop.signal_name == "SIGTERM"
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is before


def _wait_for(flag, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not flag() and time.monotonic() < deadline:
        time.sleep(0.05)
    return flag()


def test_stop_flag_sees_the_cancel_file(tmp_path, monkeypatch):
    cancel = tmp_path / "cancel"
    monkeypatch.setenv(CANCEL_FILE_ENV, str(cancel))
    monkeypatch.delenv(PARENT_PID_ENV, raising=False)
    stop = StopFlag()
    stop.install()
    try:
        assert not _wait_for(stop, 0.8)
        cancel.touch()
        assert _wait_for(stop, 5) and stop.signal_name == "cancel file"
    finally:
        stop.restore()


def test_stop_flag_stops_when_the_parent_process_is_gone(monkeypatch):
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setenv(PARENT_PID_ENV, str(parent.pid))
    monkeypatch.delenv(CANCEL_FILE_ENV, raising=False)
    stop = StopFlag()
    stop.install()
    try:
        assert not _wait_for(stop, 1.2)
        parent.kill()
        parent.wait()
        assert _wait_for(stop, 5) and stop.signal_name == "parent process exited"
    finally:
        stop.restore()
        parent.kill()


# --------------------------------------------------------------------------------------
# Interrupted + resumed == uninterrupted (in-process, CPU, same seed)


def _config(data: dict[str, Path], out: Path) -> TrainConfig:
    c = TrainConfig()
    c.method.name = "buarl"
    c.data.labeled, c.data.unlabeled = str(data["labeled"]), str(data["unlabeled"])
    c.model.patch_size, c.model.base_channels = [48, 48], 8
    c.optim.iterations, c.optim.pretrain_iterations, c.optim.batch_size = 6, 4, 4
    c.out_dir, c.validation_interval, c.log_interval, c.checkpoint_interval = str(out), 0, 3, 5
    c.num_threads = 1
    return c


@pytest.mark.parametrize("stop_after", [2, 4, 7])  # in pre-training, at the stage boundary, in self-training
def test_interrupted_then_resumed_equals_uninterrupted(tiny_dataset, tmp_path, stop_after):
    reference = train(_config(tiny_dataset, tmp_path / "reference"))
    polls = {"count": 0}

    def should_stop() -> bool:
        polls["count"] += 1
        return polls["count"] > stop_after  # the first poll is before the first iteration

    with pytest.raises(Cancelled) as cancelled:
        train(_config(tiny_dataset, tmp_path / "interrupted"), should_stop=should_stop)
    assert cancelled.value.outputs["last"] == str(tmp_path / "interrupted" / "last.pt")
    assert read_checkpoint(tmp_path / "interrupted" / "last.pt")["training_state"]["iteration"] == stop_after
    resumed = train(_config(tiny_dataset, tmp_path / "interrupted"), resume=True)
    assert resumed.iterations == reference.iterations == 10

    a = read_checkpoint(reference.last_path)["training_state"]
    b = read_checkpoint(resumed.last_path)["training_state"]
    for part in ("student", "teacher"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), f"{part}.{name} differs"
    assert a["random"]["sampler"].equal(b["random"]["sampler"])


def test_device_choice_says_why_and_refuses_what_is_not_there():
    from buseg.device import autocast_dtype, configure_threads
    from buseg.errors import ConfigError

    device, reason = resolve_device("auto")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert device == torch.device("cpu") and reason.startswith("auto: no GPU (")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:0")
    assert resolve_device("CPU") == (torch.device("cpu"), "requested")
    with pytest.raises(ConfigError, match="use auto, cpu, cuda, cuda:N or mps"):
        resolve_device("tpu")
    assert autocast_dtype(torch.device("cpu")) is None  # mixed precision only on CUDA
    with pytest.raises(ConfigError, match="num-threads"):
        configure_threads(-1)
