"""Faults (issue 8): a killed worker, a full disk, an unwritable output folder, out of memory, two
trainings into one folder, inputs left untouched, no silent overwrite.

The kills and the lock use the real worker subprocess (``python -m buseg ... --progress
jsonl``) and SIGKILL at random moments (the seed is printed; set ``BUSEG_FAULT_SEED`` to
replay one); a full disk and out-of-memory are simulated by patching the write / the
network call to raise the errors the system would raise (tests run as root, so permission
bits cannot make a folder read-only; a path under a regular file is unwritable for everyone).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from model_files import model_metadata, write_untrained_model

from buseg.cli import main
from buseg.config import PredictConfig, TrainConfig
from buseg.data.synthetic import write_dataset
from buseg.errors import OutputError, ResourceError
from buseg.files.images import read_image, read_label
from buseg.files.safe_files import TEMPORARY_PREFIX
from buseg.model.checkpoint import load_model, read_checkpoint, save_checkpoint
from buseg.model.networks import UNet2D, VNet, build_network
from buseg.prediction.case import predict_case
from buseg.prediction.predict_files import predict_files
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
    "1",
    "--base-channels",
    "4",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _seed() -> int:
    seed = int(os.environ.get("BUSEG_FAULT_SEED") or random.SystemRandom().randrange(10**6))
    print(f"fault-injection seed: {seed} (BUSEG_FAULT_SEED={seed} replays it)")
    return seed


def _events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _worker(command: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "buseg", command, *args, "--progress", "jsonl"]


def _tree_hashes(folder: Path) -> dict[str, tuple[str, int]]:
    """Content hash and modification time of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _assert_final_files_complete(folder: Path) -> None:
    """Every file under a final (not temporary) name is whole; the others are hidden temporary files."""
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        name = path.name
        if name.startswith(TEMPORARY_PREFIX):
            continue  # safe_files.atomic_path's temporary file: hidden, never under the final name
        if name.endswith(".pt"):
            read_checkpoint(path)
        elif name.endswith(".json"):
            json.loads(path.read_text())
        elif name.endswith(".seg.nrrd") or "_label." in name:
            read_label(path)
        elif name.endswith((".nii.gz", ".nrrd")):
            read_image(path)
        elif name not in ("train.lock", "buseg.lock"):  # a killed run's lock: the next run takes it over
            raise AssertionError(f"unexpected file {path}")


def _wait_for_a_random_moment(process: subprocess.Popen, rng: random.Random) -> str:
    """Read ``process``'s events up to a random moment to kill it at, and say which.

    Counted in the run's own checkpoints, not in seconds, so that the kill lands inside the training
    on a fast machine as on a slow one: after 2-8 checkpoints (at most 24 of the 80 iterations over
    three kills), a random part of the last checkpoint-to-checkpoint time later - mid-iteration or
    mid-write (from the second checkpoint on, that time is one iteration, not the start-up). One time in five, during start-up instead (a random fraction of a second after the
    first event, before or around the first checkpoint).
    """
    if rng.random() < 0.2:
        process.stdout.readline()
        delay = rng.uniform(0.0, 0.5)
        time.sleep(delay)
        return f"{delay:.2f} s after start-up"
    checkpoints = rng.randint(2, 8)
    seen, last, interval = 0, time.monotonic(), 0.0
    for line in process.stdout:
        event = json.loads(line)
        if event["event"] == "finished":
            return "after it finished (missed)"
        if event["event"] == "checkpoint" and event["kind"] == "last":
            now = time.monotonic()
            interval, last, seen = now - last, now, seen + 1
            if seen == checkpoints:
                break
    else:
        return "after its output ended (missed)"
    delay = rng.uniform(0.0, 1.0) * interval
    time.sleep(delay)
    return f"{delay:.3f} s after checkpoint {seen} of this run"


# --------------------------------------------------------------------------------------
# Killed at any moment


@pytest.mark.slow
def test_sigkill_at_random_moments_of_training_leaves_a_whole_checkpoint_and_resume_finishes(
    tiny_dataset, tmp_path
):
    rng = random.Random(_seed())
    out = tmp_path / "run"
    total = 80
    args = [
        "--method",
        "buarl",
        "--labeled",
        str(tiny_dataset["labeled"]),
        "--unlabeled",
        str(tiny_dataset["unlabeled"]),
        "--iterations",
        str(total - 4),
        "--pretrain-iterations",
        "4",
        "--checkpoint-interval",
        "1",
        "--out",
        str(out),
        *SMALL,
    ]  # a checkpoint every iteration: kills hit writes
    saved = 0
    kills = 0
    for _ in range(3):
        resume = ["--resume"] if (out / "last.pt").exists() else ["--overwrite"]
        process = subprocess.Popen(
            _worker("train", *args, *resume),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=ENV,
        )
        moment = _wait_for_a_random_moment(process, rng)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        process.stdout.close()
        kills += process.returncode == -signal.SIGKILL
        _assert_final_files_complete(out)
        if (out / "last.pt").exists():
            state = read_checkpoint(out / "last.pt")["training_state"]
            assert state["iteration"] >= saved  # never older than before the kill
            saved = state["iteration"]
        left = [p.name for p in out.iterdir() if p.name.startswith(".")]
        print(
            f"killed {moment}: exit {process.returncode}, last.pt whole at iteration {saved}, "
            f"temporary files left: {left}"
        )
        assert not (out / "model.pt").exists() or saved == total
    assert kills >= 2
    done = subprocess.run(
        _worker("train", *args, "--resume" if (out / "last.pt").exists() else "--overwrite"),
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    events = _events(done.stdout)
    started = next(e for e in events if e["event"] == "started")
    assert started["start_iteration"] == saved and started["resumed"] == (saved > 0)
    assert events[-1]["status"] == "completed"
    assert load_model(out / "model.pt").metadata["iteration"] == total
    assert read_checkpoint(out / "last.pt")["training_state"]["iteration"] == total
    # The temporary files a kill left behind are removed by the next run (it holds the lock).
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert not (out / "train.lock").exists()


@pytest.fixture(scope="module")
def model_2d(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return write_untrained_model(path, model_metadata(["background", "a", "b"]))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    return write_dataset(
        tmp_path_factory.mktemp("images"), labeled=0, unlabeled=0, test=6, shape_zyx=(24, 96, 96)
    )


@pytest.mark.slow
def test_sigkill_during_prediction_leaves_no_half_written_output(tmp_path, model_2d, images):
    rng = random.Random(_seed())
    out = tmp_path / "out"
    # Flip averaging: each case takes about 0.1 s here (reading, 4 passes per slice, 4 files written).
    args = [
        str(images["test"]),
        "--model",
        str(model_2d),
        "--out",
        str(out),
        "--num-threads",
        "1",
        "--uncertainty",
        "tta",
        "--samples",
        "4",
    ]
    for _ in range(3):
        start = time.time()
        process = subprocess.Popen(
            _worker("predict", *args, "--overwrite"),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=ENV,
        )
        # Kill at a random moment of a random case: after k cases were reported, within the next one.
        cases = rng.randrange(0, 6)
        for line in process.stdout:
            if cases == 0:
                break
            cases -= json.loads(line)["event"] == "case"
        delay = rng.uniform(0.0, 0.15)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        process.stdout.close()
        _assert_final_files_complete(out)
        temporary = [p.name for p in out.rglob(".*") if p.is_file()]
        fresh = [
            p
            for p in out.rglob("*")
            if p.is_file() and not p.name.startswith(".") and p.stat().st_mtime > start
        ]
        print(
            f"predict killed {delay:.2f} s into a case: exit {process.returncode}, {len(fresh)} output file(s) "
            f"written by this run, temporary files left: {temporary}"
        )
        # Whatever summary.json lists as done has all of its outputs.
        if (out / "summary.json").exists():
            for case in json.loads((out / "summary.json").read_text())["cases"]:
                assert all((out / p).is_file() for p in case["outputs"].values()), case
    done = subprocess.run(
        _worker("predict", *args, "--overwrite"), capture_output=True, text=True, timeout=240, env=ENV
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [c["status"] for c in summary["cases"]] == ["ok"] * 6
    _assert_final_files_complete(out)
    # The rerun took over the killed runs' lock and removed their temporary files.
    assert not (out / "buseg.lock").exists()
    assert not [p for p in out.rglob(".*") if p.is_file()]


# --------------------------------------------------------------------------------------
# Disk full, unwritable output folder


def _fail_writes_to(monkeypatch, name_part: str, *, after: int = 0) -> list[str]:
    """Make fsync of files whose name contains ``name_part`` fail with 'No space left on device'
    (after ``after`` successful ones): a full disk shows when the data are flushed."""
    real_fsync = os.fsync
    seen: list[str] = []

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if name_part in Path(target).name:
            seen.append(target)
            if len(seen) > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the file being flushed")
def test_a_full_disk_stops_training_with_a_clear_error_and_keeps_the_previous_checkpoint(
    tiny_dataset, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    _fail_writes_to(monkeypatch, "last.pt", after=1)
    code = main(
        [
            "train",
            "--method",
            "supervised",
            "--labeled",
            str(tiny_dataset["labeled"]),
            "--iterations",
            "8",
            "--checkpoint-interval",
            "2",
            "--out",
            str(out),
            "--progress",
            "jsonl",
            *SMALL,
        ]
    )
    events = _events(capsys.readouterr().out)
    assert code == 2
    error = next(e for e in events if e["event"] == "error")
    assert error["kind"] == "OutputError" and error["path"] == str(out / "last.pt")
    assert "No space left on device" in error["message"]
    assert read_checkpoint(out / "last.pt")["training_state"]["iteration"] == 2  # the previous one, whole
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert not (out / "train.lock").exists() and not (out / "model.pt").exists()


def test_a_full_disk_during_prediction_leaves_no_output_of_that_case(tmp_path, model_2d, images, monkeypatch):
    import SimpleITK as sitk

    real_write = sitk.WriteImage

    def write(image, path, *args, **kwargs):
        if "uncertainty" in Path(path).name:
            raise RuntimeError("ITK ERROR: NiftiImageIO: Write: No space left on device")
        return real_write(image, path, *args, **kwargs)

    monkeypatch.setattr(sitk, "WriteImage", write)
    out = tmp_path / "out"
    image = images["test"] / "images" / "test_000.nii.gz"
    with pytest.raises(OutputError, match=r"test_000_uncertainty\.nii\.gz: cannot be written.*No space left"):
        predict_files([image], PredictConfig(model_path=str(model_2d), out_dir=str(out), num_threads=1))
    assert not [p for p in (out / "test_000").iterdir()]  # neither final nor temporary files


@pytest.mark.parametrize("command", ["train", "predict", "evaluate", "rank"])
def test_an_unwritable_output_folder_is_a_clear_error_before_any_work(
    tmp_path, model_2d, images, command, capsys
):
    blocker = tmp_path / "a_file"
    blocker.write_text("a regular file: nothing can be created under it, not even by root")
    out = blocker / "out"
    test = images["test"]
    argv = {
        "train": ["train", "--method", "supervised", "--labeled", str(test), "--iterations", "2", *SMALL],
        "predict": ["predict", str(test), "--model", str(model_2d), "--num-threads", "1"],
        "evaluate": ["evaluate", "--pred", str(test / "labels"), "--truth", str(test / "labels")],
        "rank": ["rank", str(test), "--model", str(model_2d), "--num-threads", "1"],
    }[command]
    start = time.perf_counter()
    code = main([*argv, "--out", str(out), "--progress", "jsonl"])
    events = _events(capsys.readouterr().out)
    assert code == 2
    error = next(e for e in events if e["event"] == "error")
    assert (  # the file in the way is named, and what it is in the way of
        error["kind"] == "OutputError"
        and error["path"] == str(blocker)
        and f"is a file, but it must be a folder (to hold {out})" in error["message"]
    )
    assert not any(e["event"] == "case" for e in events)  # refused before the first case
    assert time.perf_counter() - start < 30


# --------------------------------------------------------------------------------------
# Out of memory


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: out of memory"),
    ],
    ids=["OutOfMemoryError", "RuntimeError"],
)
def test_out_of_memory_in_training_says_what_to_lower_and_keeps_the_checkpoint(
    tiny_dataset, tmp_path, monkeypatch, capsys, error
):
    real_forward = UNet2D.forward
    calls = []

    def forward(self, x):
        if torch.is_grad_enabled():  # a training step (BatchNorm re-estimation runs without grad)
            calls.append(x.shape[0])
        if len(calls) > 5:  # iteration 6 of a supervised run
            raise error
        return real_forward(self, x)

    monkeypatch.setattr(UNet2D, "forward", forward)
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--method",
            "supervised",
            "--labeled",
            str(tiny_dataset["labeled"]),
            "--iterations",
            "20",
            "--checkpoint-interval",
            "4",
            "--out",
            str(out),
            "--progress",
            "jsonl",
            *SMALL,
        ]
    )
    events = _events(capsys.readouterr().out)
    assert code == 3
    message = next(e for e in events if e["event"] == "error")
    assert message["kind"] == "ResourceError"
    assert "out of memory" in message["message"] and "--batch-size 4" in message["message"]
    assert "lower --batch-size (now 4) or --patch-size (now 48 x 48)" in message["hint"]
    assert read_checkpoint(out / "last.pt")["training_state"]["iteration"] == 4


def test_out_of_memory_in_prediction_retries_with_fewer_windows_then_says_what_to_do(
    tmp_path, monkeypatch, capsys
):
    """3D, with the RuntimeError text older torch raises (test_inference.py checks torch.OutOfMemoryError)."""
    torch.manual_seed(0)
    network = build_network("vnet", in_channels=1, num_classes=2, base_channels=4)
    metadata = {
        "method": "supervised",
        "dimension": "3d",
        "normalization": "zscore",
        "patch_size": [16, 16, 16],
        "network": {"name": "vnet", "in_channels": 1, "num_classes": 2, "base_channels": 4, "dropout": True},
        "classes": [
            {"index": 0, "name": "background", "label_value": 0},
            {"index": 1, "name": "x", "label_value": 1},
        ],
    }
    path = tmp_path / "model.pt"
    save_checkpoint(path, weights=network.state_dict(), metadata=metadata)
    folder = write_dataset(tmp_path / "d", labeled=0, unlabeled=0, test=1, shape_zyx=(20, 30, 30))["test"]
    image = folder / "images" / "test_000.nii.gz"
    config = PredictConfig(model_path=str(path), out_dir=str(tmp_path / "a"), sw_batch_size=4, num_threads=1)
    model = load_model(path)
    expected = predict_case(model, read_image(image), config)
    real_forward = VNet.forward
    batches = []

    def forward(self, x):
        batches.append(x.shape[0])
        if x.shape[0] > 1:
            raise RuntimeError(
                "CUDA out of memory. Tried to allocate 1.50 GiB (GPU 0; 7.79 GiB total capacity)"
            )
        return real_forward(self, x)

    monkeypatch.setattr(VNet, "forward", forward)
    warnings = []
    retried = predict_case(model, read_image(image), config, warn=warnings.append)
    assert batches[:3] == [4, 2, 1] and set(batches[3:]) == {1}  # halved once per failure, then kept
    assert np.array_equal(retried.labels, expected.labels)
    assert any("retrying with 2" in w for w in warnings) and any("retrying with 1" in w for w in warnings)

    monkeypatch.setattr(
        VNet, "forward", lambda self, x: (_ for _ in ()).throw(RuntimeError("CUDA out of memory"))
    )
    code = main(
        [
            "predict",
            str(image),
            "--model",
            str(path),
            "--out",
            str(tmp_path / "b"),
            "--progress",
            "jsonl",
            "--num-threads",
            "1",
        ]
    )
    events = _events(capsys.readouterr().out)
    assert code == 3
    error = next(e for e in events if e["event"] == "error")
    assert error["kind"] == "ResourceError" and "even with one window per forward pass" in error["message"]
    assert "--device cpu" in error["hint"] and "--patch-size" in error["hint"]
    assert not (tmp_path / "b" / "test_000").exists()


# --------------------------------------------------------------------------------------
# Two trainings into one folder


def test_a_second_training_into_the_same_folder_refuses_while_the_first_runs(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    args = [
        "--method",
        "supervised",
        "--labeled",
        str(tiny_dataset["labeled"]),
        "--iterations",
        "400",
        "--out",
        str(out),
        "--patch-size",
        "128",
        "128",
        "--batch-size",
        "4",
        "--num-threads",
        "1",
    ]
    first = subprocess.Popen(
        _worker("train", *args), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV
    )
    try:
        while json.loads(first.stdout.readline())["event"] != "started":
            pass
        for extra in ([], ["--overwrite"]):  # the lock is checked before the previous outputs
            second = subprocess.run(
                _worker("train", *args, *extra), capture_output=True, text=True, timeout=120, env=ENV
            )
            assert second.returncode == 2, second.stderr[-2000:]
            error = next(e for e in _events(second.stdout) if e["event"] == "error")
            assert error["kind"] == "OutputError"
            assert f"another training (process {first.pid}) is writing to this folder" in error["message"]
        assert first.poll() is None  # the first one runs on, untouched
        assert (out / "train.lock").read_text().splitlines()[0] == str(first.pid)
    finally:
        first.send_signal(signal.SIGTERM)
        rest, _ = first.communicate(timeout=60)
    assert first.returncode == 130 and _events(rest)[-1]["status"] == "cancelled"
    assert not (out / "train.lock").exists()


# --------------------------------------------------------------------------------------
# Inputs only read; outputs never replaced without --overwrite


@pytest.mark.slow
def test_inputs_are_never_modified_by_train_predict_evaluate_and_rank(dataset_copy, tmp_path, capsys):
    data_root = dataset_copy["labeled"].parent
    before = _tree_hashes(data_root)
    runs = tmp_path / "outputs"
    assert (
        main(
            [
                "train",
                "--method",
                "bcp",
                "--labeled",
                str(dataset_copy["labeled"]),
                "--unlabeled",
                str(dataset_copy["unlabeled"]),
                "--validation",
                str(dataset_copy["test"]),
                "--iterations",
                "2",
                "--pretrain-iterations",
                "2",
                "--validation-interval",
                "2",
                "--out",
                str(runs / "train"),
                "--progress",
                "none",
                *SMALL,
            ]
        )
        == 0
    )
    model = str(runs / "train" / "model.pt")
    assert (
        main(
            [
                "predict",
                str(dataset_copy["test"]),
                "--model",
                model,
                "--out",
                str(runs / "pred"),
                "--progress",
                "none",
                "--num-threads",
                "1",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "evaluate",
                "--pred",
                str(runs / "pred"),
                "--truth",
                str(dataset_copy["test"]),
                "--out",
                str(runs / "eval"),
                "--progress",
                "none",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "rank",
                str(dataset_copy["unlabeled"]),
                "--model",
                model,
                "--out",
                str(runs / "rank"),
                "--progress",
                "none",
                "--num-threads",
                "1",
                "--save-predictions",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert _tree_hashes(data_root) == before  # same files, same bytes, same modification times


@pytest.mark.parametrize("command", ["evaluate", "rank"])
def test_evaluate_and_rank_never_replace_their_outputs_without_overwrite(
    tmp_path, model_2d, images, command, capsys
):
    """(train, predict and demo: test_train.py, test_predict_cli.py, test_demo.py.)"""
    out = tmp_path / "out"
    test = images["test"]
    argv = {
        "evaluate": ["evaluate", "--pred", str(test / "labels"), "--truth", str(test / "labels")],
        "rank": ["rank", str(test), "--model", str(model_2d), "--num-threads", "1", "--save-predictions"],
    }[command] + ["--out", str(out), "--progress", "jsonl"]
    assert main(argv) == 0
    before = _tree_hashes(out)
    assert main(argv) == 2
    error = next(e for e in _events(capsys.readouterr().out) if e["event"] == "error")
    assert (
        error["kind"] == "OutputError"
        and "exists already" in error["message"]
        and "--overwrite" in error["hint"]
    )
    assert _tree_hashes(out) == before
    assert main([*argv, "--overwrite"]) == 0
    after = _tree_hashes(out)
    assert after.keys() == before.keys() and all(after[k][1] >= before[k][1] for k in after)


def test_train_api_converts_out_of_memory_for_every_caller(tiny_dataset, tmp_path, monkeypatch):
    """The training function itself (not only the command line) turns out-of-memory into a ResourceError."""
    monkeypatch.setattr(UNet2D, "forward", lambda self, x: (_ for _ in ()).throw(MemoryError()))
    config = TrainConfig()
    config.method.name, config.data.labeled, config.out_dir = (
        "supervised",
        str(tiny_dataset["labeled"]),
        str(tmp_path),
    )
    config.model.patch_size, config.optim.iterations, config.optim.batch_size = [48, 48], 2, 4
    with pytest.raises(ResourceError, match="out of memory on cpu while training with --batch-size 4"):
        train(config)
