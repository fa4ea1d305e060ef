"""``--score-every``: the quality benchmark scores a long run's EMA teacher as it trains.

The curve is the evidence for "does the result depend on where training stopped"; scoring the
student (what last.pt's top-level weights are) instead of the teacher (what model files ship), or
losing the scores of a run cut short, would each make that evidence say something else.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from model_files import model_metadata, untrained_network

from benchmarks import quality as quality_benchmark
from benchmarks import teacher_curve as teacher_curve_report
from buseg.model.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def quality():
    return quality_benchmark


@pytest.fixture()
def scored(quality, monkeypatch):
    """evaluate_model replaced by one that 'scores' a model file by the first weight of its head, so a
    test can tell which network was scored."""
    calls = []

    def fake_evaluate(path, cases, num_classes, device, budget, largest_component=False):
        weights = torch.load(path, map_location="cpu", weights_only=True)["weights"]
        marker = float(weights["head.bias"][0])
        calls.append(marker)
        summary = {"dice": marker, "hd95_voxels": 3.0, "dice_class1": marker}
        return {"summary": summary, "cases": [{"case": "a", "dice": marker, "dice_class1": marker}]}

    monkeypatch.setattr(quality, "evaluate_model", fake_evaluate)
    return calls


def _last_checkpoint(
    folder: Path,
    iteration: int,
    teacher_marker: float,
    student_marker: float,
    shipped_marker: float | None = None,
) -> Path:
    metadata = model_metadata(["background", "a"])
    student, teacher, shipped = (untrained_network(metadata) for _ in range(3))
    with torch.no_grad():
        student.head.bias.fill_(student_marker)
        teacher.head.bias.fill_(teacher_marker)
        shipped.head.bias.fill_(shipped_marker if shipped_marker is not None else 0.0)
    path = folder / "last.pt"
    save_checkpoint(
        path,
        weights=student.state_dict(),
        metadata=metadata,
        training_state={
            "student": student.state_dict(),
            "teacher": teacher.state_dict(),
            "shipped": shipped.state_dict() if shipped_marker is not None else None,
            "iteration": iteration,
        },
    )
    return path


def _sink(quality, mirror: Path, about: dict | None = None):
    volumes = quality.Volumes(everything=["v1", "v2"], evaluation=["v2"])
    args = SimpleNamespace(device="cpu", review_budget=0.01)
    about = about or {"configuration": "ours-url-only", "seed": 1, "every": 1000, "config": {"lr": 0.005}}
    return quality.TeacherScores(mirror, 1000, volumes, 2, args, about)


def _checkpoint(sink, path: Path, iteration: int) -> None:
    sink.handle({"event": "checkpoint", "kind": "last", "iteration": iteration, "path": str(path)})


def test_the_teacher_is_scored_every_n_iterations_and_kept_as_it_comes(quality, scored, tmp_path):
    mirror = tmp_path / "results" / "ours-url-only_seed1.teacher.json"
    sink = _sink(quality, mirror)
    for iteration in (250, 500, 750, 1000, 1250, 2000):
        _checkpoint(sink, _last_checkpoint(tmp_path, iteration, iteration / 10000, -1.0), iteration)
        sink.handle({"event": "checkpoint", "kind": "best", "iteration": iteration, "path": "x"})
    assert scored == pytest.approx([0.1, 0.2])  # the teacher at 1000 and 2000; never the student (-1)
    record = json.loads(mirror.read_text())  # written before the run ends: a run cut short keeps them
    assert record["finished"] is False and record["machine"]
    assert [s["iteration"] for s in record["scores"]] == [1000, 2000]
    assert record["scores"][0]["dice"] == pytest.approx(0.1)
    assert not (tmp_path / "teacher_snapshot.pt").exists()  # the scored snapshot is not left behind


def test_a_resumed_run_skips_what_is_scored_and_another_configuration_starts_again(quality, scored, tmp_path):
    mirror = tmp_path / "teacher.json"
    first = _sink(quality, mirror)
    _checkpoint(first, _last_checkpoint(tmp_path, 1000, 0.1, -1.0), 1000)
    resumed = _sink(quality, mirror)
    _checkpoint(resumed, _last_checkpoint(tmp_path, 1000, 0.5, -1.0), 1000)
    _checkpoint(resumed, _last_checkpoint(tmp_path, 2000, 0.2, -1.0), 2000)
    assert scored == pytest.approx([0.1, 0.2])
    resumed.save(finished=True)
    assert json.loads(mirror.read_text())["finished"] is True
    other = {"configuration": "ours-url-only", "seed": 1, "every": 1000, "config": {"lr": 0.01}}
    assert _sink(quality, mirror, other).scores == []


def test_a_damaged_teacher_record_is_an_error_that_names_it(quality, tmp_path):
    mirror = tmp_path / "teacher.json"
    mirror.write_text('{"scores": [')
    with pytest.raises(SystemExit, match=r"teacher\.json"):
        _sink(quality, mirror)


def test_score_every_must_be_a_multiple_of_the_checkpoint_interval(quality, tmp_path):
    args = quality.parse_arguments(
        [
            "--score-every",
            "300",
            "--work",
            str(tmp_path),
            "--out",
            str(tmp_path),
            "--data-root",
            str(tmp_path),
        ]
    )
    with pytest.raises(SystemExit, match="not a multiple of the checkpoint interval"):
        quality.run_benchmark(args, 7)


# -- the long-run report (benchmarks/teacher_curve.py) --------------------------------------------


@pytest.fixture(scope="module")
def teacher_curve():
    return teacher_curve_report


def _teacher_record(folder: Path, key: str, seed: int, dice_by_iteration: dict[int, float], finished=True):
    scores = [{"iteration": i, "dice": d, "hd95_voxels": 4.0} for i, d in dice_by_iteration.items()]
    record = {"configuration": key, "seed": seed, "every": 1000, "finished": finished, "scores": scores}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{key}_seed{seed}.teacher.json").write_text(json.dumps(record))


def _long_runs(folder: Path) -> None:
    base = {1000: 0.70, 2000: 0.74, 3000: 0.76, 4000: 0.78, 5000: 0.77, 6000: 0.79}
    for seed, gain in ((1337, 0.010), (2, 0.020), (3, 0.005)):
        _teacher_record(folder, "ours-url-only", seed, base)
        crl = {i: d + (gain if i >= 4000 else -gain) for i, d in base.items()}
        _teacher_record(folder, "ours-crl-concentration", seed, crl)


def test_the_long_run_report_compares_seed_by_seed_at_each_iteration(teacher_curve, tmp_path):
    records = tmp_path / "runs" / "long"
    _long_runs(records)
    _teacher_record(records, "bcp", 1337, {1000: 0.6, 2000: 0.62}, finished=False)
    args = teacher_curve.parse_arguments(["--tag", "long", "--at", "2000", "4000", "--out", str(tmp_path)])
    lines = teacher_curve.report(teacher_curve.read_runs(records), args, records)
    row = next(line for line in lines if line.startswith("| ours-crl-concentration |"))
    # behind in every seed at 2000, ahead in every seed at 4000: the rule says so, with the seeds' differences
    assert "worse: -1.17" in row and "better: +1.17" in row and "2: +2.00" in row
    assert "| bcp | 1 | 62.00 | - |" in "\n".join(lines)
    assert "Not finished (shown up to their last score): bcp (seed 1337)." in lines


def test_the_spread_of_the_last_checkpoints_is_that_of_a_finished_run_only(teacher_curve):
    run = {
        "finished": True,
        "scores": [{"iteration": i, "dice": d} for i, d in enumerate([0.5, 0.7, 0.72, 0.74])],
    }
    spread = teacher_curve.last_scores_spread(run, 3)
    assert (
        spread["range"] == pytest.approx(4.0) and spread["sd"] == pytest.approx(2.0) and spread["from"] == 1
    )
    assert np.isnan(teacher_curve.last_scores_spread({**run, "finished": False}, 3)["sd"])
    assert np.isnan(teacher_curve.last_scores_spread(run, 5)["sd"])


def test_the_long_runs_are_checked_against_the_shorter_table(teacher_curve, tmp_path):
    records = tmp_path / "runs" / "long"
    _long_runs(records)
    short = tmp_path / "runs" / "short"
    short.mkdir(parents=True)
    row = {"last_dice": 0.7790, "train_seconds": 100.0}
    record = {"row": row, "configs": {"training": {"optim": {"iterations": 4000}}}}
    (short / "ours-url-only_seed2.json").write_text(json.dumps(record))
    args = teacher_curve.parse_arguments(["--tag", "long", "--short-tag", "short", "--out", str(tmp_path)])
    text = "\n".join(teacher_curve.report(teacher_curve.read_runs(records), args, records))
    assert "| ours-url-only | 2 | 4000 | 77.90 | 78.00 | +0.10 |" in text
    assert teacher_curve.main(["--tag", "long", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "teacher_curve_long.png").stat().st_size > 0


def test_no_teacher_records_is_an_error_that_names_the_folder(teacher_curve, tmp_path):
    with pytest.raises(SystemExit, match="no teacher-score records"):
        teacher_curve.read_runs(tmp_path)


def test_what_is_scored_is_what_a_model_file_would_hold(quality, scored, tmp_path):
    # The engine keeps the teacher with clean BatchNorm statistics in last.pt ("shipped"): that
    # is scored; a last.pt without it (--batchnorm-statistics running) gives the teacher itself.
    sink = _sink(quality, tmp_path / "teacher.json")
    _checkpoint(sink, _last_checkpoint(tmp_path, 1000, 0.1, -1.0, shipped_marker=0.3), 1000)
    _checkpoint(sink, _last_checkpoint(tmp_path, 2000, 0.2, -1.0), 2000)
    assert scored == pytest.approx([0.3, 0.2])


# -- the teacher-averaging screen (benchmarks/teacher_average.py) ----------------------------------


def test_teacher_weights_are_averaged_parameter_by_parameter():
    from benchmarks.teacher_average import average_state

    states = [
        {"w": torch.tensor([1.0, 3.0]), "bn.num_batches_tracked": torch.tensor(5)},
        {"w": torch.tensor([3.0, 5.0]), "bn.num_batches_tracked": torch.tensor(9)},
    ]
    averaged = average_state(states)
    assert torch.equal(averaged["w"], torch.tensor([2.0, 4.0]))
    assert averaged["bn.num_batches_tracked"].item() == 9  # a counter is not averaged: the last one's
    with pytest.raises(ValueError, match="nothing to average"):
        average_state([])


def test_the_averaged_model_of_one_copy_is_that_copys_teacher(tmp_path):
    """One copy averaged is the copy's teacher (BatchNorm statistics re-estimated), in a model file of
    the run's own format: what the screen scores is the model a run with averaging would ship."""
    from benchmarks.teacher_average import averaged_model

    metadata = model_metadata(["background", "structure"])
    network = untrained_network(metadata)
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "best.pt", weights=network.state_dict(), metadata=metadata)
    teacher = {k: v + 0.5 if torch.is_floating_point(v) else v for k, v in network.state_dict().items()}
    batches = [torch.randn(2, 1, 32, 32) for _ in range(3)]
    path = averaged_model(run, teacher, iter(batches), tmp_path / "averaged.pt")
    from buseg.model.checkpoint import load_model

    loaded = load_model(path).network.state_dict()
    convolution = next(k for k, v in teacher.items() if v.ndim == 4)
    assert torch.allclose(loaded[convolution], teacher[convolution])
    running = next(k for k in loaded if k.endswith("running_mean"))
    assert not torch.allclose(loaded[running], teacher[running])  # re-estimated on the batches


def test_the_averaging_screen_refuses_stops_that_give_no_spread():
    from benchmarks.teacher_average import parse_arguments

    base = [
        "--snapshots",
        "s",
        "--seeds",
        "3",
        "--tag",
        "t",
        "--configurations",
        "c",
        "--iterations",
        "12000",
    ]
    assert parse_arguments(base).stops == [10000, 10500, 11000, 11500, 12000]
    for stops in (["12000"], ["1000", "12000"]):  # one stop; a window reaching before the run
        with pytest.raises(SystemExit):
            parse_arguments([*base, "--stops", *stops])
