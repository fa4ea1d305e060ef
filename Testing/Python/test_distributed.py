"""Multi-process training (torchrun + DDP) on the CPU with gloo and 2 processes.

One event stream (rank 0's), a loadable model, every rank's random state in last.pt, and a
cancelled-then-resumed 2-process run ending with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from buseg.client import CANCELLED, FINISHED, WorkerClient
from buseg.events import validate_event
from buseg.model.checkpoint import load_model, read_checkpoint
from buseg.training.distributed import DistributedContext, init_distributed

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="torchrun + POSIX signals")


def ddp_args(data: dict[str, Path], out: Path) -> list[str]:
    return [
        "--method",
        "buarl",
        "--labeled",
        str(data["labeled"]),
        "--unlabeled",
        str(data["unlabeled"]),
        "--iterations",
        "26",
        "--pretrain-iterations",
        "4",
        "--out",
        str(out),
        "--device",
        "cpu",
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


def torchrun_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def ddp_run(tiny_dataset, tmp_path_factory):
    """An uninterrupted 2-process training: (output folder, events, completed process)."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "buseg",
        "train",
        *ddp_args(tiny_dataset, out),
        "--progress",
        "jsonl",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=torchrun_env())
    events = [json.loads(line) for line in done.stdout.splitlines()]  # every stdout line is an event
    return out, events, done


def test_two_gloo_processes_train_with_one_event_stream_and_a_loadable_model(ddp_run):
    out, events, done = ddp_run
    assert done.returncode == 0, done.stderr
    for event in events:
        assert validate_event(event) == []
    kinds = [e["event"] for e in events]
    assert kinds.count("started") == 1 and kinds.count("finished") == 1  # rank 0 only
    started = next(e for e in events if e["event"] == "started")
    assert started["world_size"] == 2 and started["global_batch_size"] == 8
    assert "rank 0 of 2" in started["device_reason"]
    progress = [e["iteration"] for e in events if e["event"] == "progress"]
    assert progress == sorted(set(progress)) and progress[-1] == 30
    assert events[-1]["status"] == "completed"

    model = load_model(out / "model.pt")
    assert model.metadata["iteration"] == 30 and model.metadata["method"] == "buarl"
    with torch.no_grad():
        assert model.network(torch.zeros(1, 1, 48, 48)).shape == (1, 4, 48, 48)
    state = read_checkpoint(out / "last.pt")["training_state"]
    per_rank = state["random_per_rank"]
    assert len(per_rank) == 2 and not per_rank[0]["sampler"].equal(per_rank[1]["sampler"])  # own batches
    # Rank 1 logs warnings only: the data summary (INFO) appears once, from rank 0.
    assert done.stderr.count("validation cases; classes") == 1, done.stderr


@pytest.mark.slow
def test_cancelled_and_resumed_ddp_run_equals_the_uninterrupted_one(ddp_run, tiny_dataset, tmp_path):
    reference, _, done = ddp_run
    assert done.returncode == 0, done.stderr
    out = tmp_path / "run"
    client = WorkerClient("train", ddp_args(tiny_dataset, out), nproc_per_node=2, env=torchrun_env())
    assert client.argv[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    client.start()
    deadline = time.monotonic() + 120
    while not client.done and time.monotonic() < deadline:
        for event in client.poll():
            if event["event"] == "progress" and event["iteration"] >= 6 and client.state != "cancelling":
                client.cancel()
        time.sleep(0.01)
    # torchrun itself exits 1 after a forwarded SIGTERM; the worker's own report decides.
    assert client.state == CANCELLED, client.log_text()
    assert client.result.status == "cancelled"
    assert sum(e["event"] == "finished" for e in client.events) == 1
    saved = read_checkpoint(out / "last.pt")["training_state"]
    assert 6 <= saved["iteration"] < 30 and len(saved["random_per_rank"]) == 2

    resumed = WorkerClient(
        "train", [*ddp_args(tiny_dataset, out), "--resume"], nproc_per_node=2, env=torchrun_env()
    )
    resumed.start()
    result = resumed.wait(timeout=180)
    assert resumed.state == FINISHED, resumed.log_text()
    a = read_checkpoint(reference / "last.pt")["training_state"]
    b = read_checkpoint(result.outputs["last"])["training_state"]
    for part in ("student", "teacher"):
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), f"{part}.{name} differs"


def test_single_process_context_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist = init_distributed("cpu")
    assert not dist.enabled and dist.is_main and dist.world_size == 1
    assert dist.any(True) is True and dist.any(False) is False
    assert dist.mean({"a": 1.5}) == {"a": 1.5}
    assert dist.gather({"x": 1}) == [{"x": 1}]
    module = nn.BatchNorm1d(3)
    module.running_mean.fill_(2.0)
    dist.sync_buffers(module)
    assert torch.equal(module.running_mean, torch.full((3,), 2.0))
    dist.barrier()
    dist.shutdown()
    assert DistributedContext().device_and_reason("cpu")[0] == torch.device("cpu")
