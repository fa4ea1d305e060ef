"""The annotation-loop benchmark (benchmarks/annotation_loop.py, issue 34) on tiny synthetic volumes.

The simulated person must correct only what the tool points at and count what it changed; the pool's
truth must reach nothing but the annotator; the rounds must resume and be recorded as they finish;
the report must apply the project's verdict rule and evaluate the targets.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import annotation_loop
from buseg.data.synthetic import make_case
from buseg.data.training_data import TrainingData, ValidationCase

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def loop():
    return annotation_loop


# --------------------------------------------------------------------------------------
# The simulated person and the cost of its work


def _prediction_and_truth(shape=(4, 6, 8)):
    rng = np.random.default_rng(0)
    return np.zeros(shape, dtype=np.uint8), rng.integers(1, 4, size=shape).astype(np.uint8)


def test_regions_paste_the_truth_only_inside_the_first_k_boxes(loop):
    prediction, truth = _prediction_and_truth()
    # ITK order (i = x, j = y, k = z), both ends included: x 1..2, y 0..3 on slice 1; x 5..7, y 4..5 on
    # slices 2..3; a third box that k = 2 leaves out.
    boxes = [([1, 0, 1], [2, 3, 1]), ([5, 4, 2], [7, 5, 3]), ([0, 0, 0], [7, 5, 0])]
    done = loop.annotators.annotate_regions(prediction, truth, boxes, k=2)
    inside = np.zeros(prediction.shape, dtype=bool)
    inside[1, 0:4, 1:3] = True
    inside[2:4, 4:6, 5:8] = True
    assert (done.labels[inside] == truth[inside]).all()
    assert (done.labels[~inside] == prediction[~inside]).all()
    assert done.slices_shown == 3  # slices 1, 2 and 3
    cost = loop.annotators.edit_cost(prediction, done.labels)
    assert cost == {"slices_edited": 3, "voxels_changed": int(inside.sum())}
    fewer = loop.annotators.annotate_regions(prediction, truth, boxes[:1], k=5)  # the tool flagged fewer
    assert int((fewer.labels != prediction).sum()) == 8


def test_slices_take_the_truth_only_on_the_first_slices_of_the_review_order(loop):
    prediction, truth = _prediction_and_truth()
    done = loop.annotators.annotate_slices(prediction, truth, [3, 1, 0], count=2)
    assert (done.labels[[1, 3]] == truth[[1, 3]]).all()
    assert (done.labels[[0, 2]] == prediction[[0, 2]]).all()
    assert done.slices_shown == 2
    along_x = loop.annotators.annotate_slices(prediction, truth, [5], count=2, slice_axis=2)
    assert (along_x.labels[..., 5] == truth[..., 5]).all() and (along_x.labels[..., :5] == 0).all()


def test_edit_cost_counts_what_changed_against_the_prediction(loop):
    prediction, truth = _prediction_and_truth()
    annotation = prediction.copy()
    annotation[0, 0, 0] = 2
    annotation[2, 1:3, 1] = 1
    assert loop.annotators.edit_cost(prediction, annotation) == {"slices_edited": 2, "voxels_changed": 3}
    assert loop.annotators.edit_cost(prediction, annotation, slice_axis=2) == {
        "slices_edited": 2,
        "voxels_changed": 3,
    }
    full = loop.annotators.annotate_full(prediction, truth)
    assert (full.labels == truth).all() and full.slices_shown == 4
    assert loop.annotators.add_costs([{"slices_edited": 2}, {"slices_edited": 3, "voxels_changed": 1}]) == {
        "slices_edited": 5,
        "voxels_changed": 1,
    }


def test_patients_come_in_the_order_of_their_highest_ranked_frame(loop):
    scores = {
        "patient002_frame01": 0.2,
        "patient002_frame02": 0.9,
        "patient001_frame01": 0.5,
        "patient003_frame01": 0.9,
    }
    assert loop.annotators.rank_patients(scores) == ["patient002", "patient003", "patient001"]
    remaining = ["patient004", "patient001", "patient007"]
    drawn = loop.annotators.random_patient(remaining, 1337, 1)
    assert drawn in remaining and drawn == loop.annotators.random_patient(list(reversed(remaining)), 1337, 1)


def test_arms_name_their_chooser_and_annotation(loop):
    assert loop.parse_arm("rank+regions10") == loop.Arm("rank+regions10", "rank", "regions", 10)
    assert loop.parse_arm("random+regions").k == loop.DEFAULT_REGIONS_K
    shown = loop.parse_arm("rank+regions-shown")
    assert (shown.k, shown.labeled_slices) == (loop.DEFAULT_REGIONS_K, "shown")
    assert loop.parse_arm("rank+slices").labeled_slices == "whole"
    # Records made before the option (always the whole frame) keep their settings.
    assert "labeled_slices" not in loop.parse_arm("rank+slices").settings()
    assert shown.settings()["labeled_slices"] == "shown"
    assert loop.parse_arm("random+none-shown").annotation == "none"
    for bad in ("rank+full3", "best+full", "rank+boxes", "rank+full-shown", "random+none"):
        with pytest.raises(ValueError, match=bad.replace("+", r"\+")):
            loop.parse_arm(bad)


def test_the_fine_tuning_is_the_panels_default_schedule(loop, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "BidirUncertaintySeg"))  # the panel library, not installed
    from BidirUncertaintySegLib.parameters import PARAMETERS

    panel = {p.name: p.default for p in PARAMETERS}
    args = loop.parse_arguments([])
    assert (args.fine_tune_iterations, args.fine_tune_lr) == (
        panel["fineTuneIterations"],
        panel["learningRate"],
    )
    config = loop.fine_tune_config(loop.protocol_preset(args), args, 2, Path("out"), Path("current.pt"))
    assert config.init_weights == "current.pt" and config.optim.pretrain_iterations == 0
    assert (config.optim.iterations, config.optim.lr, config.validation_interval) == (
        panel["fineTuneIterations"],
        panel["learningRate"],
        0,
    )


# --------------------------------------------------------------------------------------
# Rounds on tiny synthetic data: real prediction, regions, ranking, fine-tuning, scoring


CLASSES = [{"index": 0, "name": "background", "label_value": 0, "color": [0.0, 0.0, 0.0]}] + [
    {"index": i, "name": n, "label_value": i, "color": [0.5, 0.5, 0.5]}
    for i, n in enumerate(("shell", "core", "satellite"), start=1)
]


def _volume(seed: int):
    case = make_case(
        np.random.default_rng(seed), (3, 32, 32), spacing_mm=(1.0, 1.0, 1.0), structure_scale=0.8
    )
    return case.image.array.astype(np.float32), case.label.array.astype(np.uint8)


class SpyTruth:
    """The pool's truth that records every frame read and can refuse to be read at all."""

    def __init__(self, labels: dict[str, np.ndarray]):
        self.labels_by_frame = labels
        self.refuse = False

    def reader(self, frame: str) -> np.ndarray:
        if self.refuse:
            raise AssertionError(f"the truth of {frame} was read")
        return self.labels_by_frame[frame]


@pytest.fixture(scope="module")
def start_model(loop, tmp_path_factory):
    """``start_model(base, args, preset)``: the start model, trained for 2 iterations once per module."""
    made: list[Path] = []

    def make(base: TrainingData, args, preset) -> Path:
        if not made:
            out = tmp_path_factory.mktemp("start")
            config = loop.quality.base_config(preset, args, loop.METHOD, 3, out)
            config.optim.pretrain_iterations, config.optim.iterations = 0, 2
            config.validation_interval = 0
            loop.quality.train_or_resume(config, out, "start", args, base)
            made.append(out / "final.pt")
        return made[0]

    return make


@pytest.fixture()
def tiny_loop(loop, tmp_path, monkeypatch, start_model):
    """A Loop of 1 labeled patient, a pool of 3 patients (2 frames each), 2 held-out volumes, and a start
    model trained for 2 iterations; ``train_calls`` lists the data of every training."""
    labeled_image, labeled_labels = _volume(1)
    frames, truths, unlabeled, indices = {}, {}, [], {}
    for p in range(2, 5):
        for f in (1, 2):
            name = f"patient00{p}_frame0{f}"
            frames[name], truths[name] = _volume(10 * p + f)
            indices[name] = list(range(len(unlabeled), len(unlabeled) + 3))
            unlabeled += list(frames[name])
    unlabeled += list(_volume(9)[0])  # outside the pool (as beyond --pool-patients): never all labeled
    base = TrainingData(
        dimension="2d",
        labeled_images=list(labeled_image),
        labeled_labels=list(labeled_labels),
        unlabeled_images=unlabeled,
        validation=[],
        classes=CLASSES,
        normalization="minmax",
        spacing_mm=[1.0, 1.0, 1.0],
        labeled_case_names=["patient001"],
        unlabeled_case_names=["patient002", "patient003", "patient004"],
    )
    volumes = [ValidationCase("held", *_volume(100), (1.0, 1.0, 1.0))]
    args = argparse.Namespace(
        data_root=tmp_path / "data",
        threads=1,
        device="cpu",
        set=["model.base_channels=4"],
        reuse_only=False,
        review_budget=0.01,
        fine_tune_iterations=2,
        fine_tune_lr=0.01,
        rounds=2,
    )
    preset = copy.deepcopy(loop.quality.PRESETS[("acdc", "cpu")])
    preset.patch_size, preset.batch_size, preset.labeled_count = [32, 32], 4, 1
    calls = []
    real_train = loop.quality.train

    def counted_train(config, **kwargs):
        calls.append(kwargs["data"])
        return real_train(config, **kwargs)

    monkeypatch.setattr(loop.quality, "train", counted_train)
    spy = SpyTruth(truths)
    state = loop.Loop(
        args,
        preset,
        3,
        base,
        loop.Pool(frames, indices),
        loop.PoolTruth(spy.reader),
        volumes,
        tmp_path / "work",
        loop.ToolPredictor("cpu"),
    )
    state.spy, state.train_calls, state.start = spy, calls, start_model(base, args, preset)
    calls.clear()  # the start model's training, when this test made it, is not a round's
    return state


def _settings(loop, state, arm):
    return loop.arm_settings(
        arm,
        state.preset,
        state.args,
        state.seed,
        state.root,
        state.pool.patients(),
        [c.name for c in state.volumes],
    )


def _run(loop, state, arm, record_path):
    return loop.run_arm(
        state, arm, state.start, {"dice": 0.1, "hd95_voxels": 9.0}, record_path, _settings(loop, state, arm)
    )


def test_pool_truth_reaches_only_the_annotator(loop, tiny_loop):
    arm = loop.parse_arm("rank+regions1")
    tiny_loop.spy.refuse = True  # choosing the next patient never reads the truth
    choice = loop.choose_patient(tiny_loop, arm, tiny_loop.start, tiny_loop.pool.patients(), 1)
    assert choice["patient"] in tiny_loop.pool.patients() and len(choice["rank_scores"]) == 2
    tiny_loop.spy.refuse = False
    annotations, shown, cost = loop.annotate_patient(tiny_loop, arm, tiny_loop.start, choice["patient"])
    assert tiny_loop.truth.read == tiny_loop.pool.frames_of(choice["patient"])  # its own frames, once each
    data = loop.round_training_data(tiny_loop.base, tiny_loop.pool, annotations)
    added = [label for frame in sorted(annotations) for label in annotations[frame]]
    assert len(data.labeled_labels) == len(tiny_loop.base.labeled_labels) + len(added)
    for trained, annotated in zip(data.labeled_labels[-len(added) :], added, strict=True):
        assert (trained == annotated).all()  # the annotation is trained on, not the truth behind it
    truth = np.concatenate([tiny_loop.spy.labels_by_frame[f] for f in sorted(annotations)])
    assert (np.stack(added) != truth).any(), "one region leaves errors: the test must tell the two apart"
    assert len(data.unlabeled_images) == len(tiny_loop.base.unlabeled_images) - len(added)
    assert data.validation == [] and cost["slices_shown"] <= 2
    assert (
        0
        < cost["voxels_changed"]
        < cost["error_voxels"]
        == (np.stack(added) != truth).sum() + cost["voxels_changed"]
    )
    assert cost["slices_shown"] == sum(len(indices) for indices in shown.values())


def test_a_shown_arm_labels_only_the_slices_the_person_was_shown(loop, tiny_loop):
    frames = tiny_loop.pool.frames_of(tiny_loop.pool.patients()[0])
    annotations = {frame: tiny_loop.spy.labels_by_frame[frame] for frame in frames}
    shown = {frames[0]: [0, 2], frames[1]: []}
    data = loop.round_training_data(tiny_loop.base, tiny_loop.pool, annotations, shown)
    assert len(data.labeled_labels) == len(tiny_loop.base.labeled_labels) + 2
    for trained, index in zip(data.labeled_labels[-2:], [0, 2], strict=True):
        assert (trained == annotations[frames[0]][index]).all()
    for image, index in zip(data.labeled_images[-2:], [0, 2], strict=True):
        assert (image == tiny_loop.pool.frames[frames[0]][index]).all()
    # The slices nobody was shown stay in the unlabeled set; the shown ones leave it.
    positions = tiny_loop.pool.unlabeled_indices[frames[0]]
    left = [
        image
        for i, image in enumerate(tiny_loop.base.unlabeled_images)
        if i not in (positions[0], positions[2])
    ]
    assert len(data.unlabeled_images) == len(left)
    assert all(a is b for a, b in zip(data.unlabeled_images, left, strict=True))
    whole = loop.round_training_data(tiny_loop.base, tiny_loop.pool, annotations)
    assert len(whole.labeled_labels) == len(tiny_loop.base.labeled_labels) + sum(
        len(a) for a in annotations.values()
    )


def test_rounds_are_recorded_as_they_finish_and_resumed(loop, tiny_loop, tmp_path, monkeypatch):
    arm = loop.parse_arm("random+full")  # no ranking: a faster round
    # Scoring is the quality benchmark's (tested there); here only that each round records its score.
    monkeypatch.setattr(loop, "score_model", lambda state, model: {"dice": len(str(model)) / 1000})
    record_path = tmp_path / "records" / "random+full_seed3.json"
    record = _run(loop, tiny_loop, arm, record_path)
    assert [r["round"] for r in record["rounds"]] == [1, 2] and len(tiny_loop.train_calls) == 2
    assert json.loads(record_path.read_text())["rounds"] == json.loads(json.dumps(record["rounds"]))
    chosen = [r["patient"] for r in record["rounds"]]
    assert len(set(chosen)) == 2  # a patient is added once
    # Round 2 trained on both added patients, fully labeled: their truth is the annotation here.
    assert len(tiny_loop.train_calls[1].labeled_labels) == len(tiny_loop.base.labeled_labels) + 12
    # Asked again: everything is recorded, nothing is trained.
    _run(loop, tiny_loop, arm, record_path)
    assert len(tiny_loop.train_calls) == 2
    # One more round, interrupted while it trains: it resumes from its saved choice and annotation.
    tiny_loop.args.rounds = 3
    real = loop.quality.train_or_resume

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop.quality, "train_or_resume", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(loop, tiny_loop, arm, record_path)
    assert len(json.loads(record_path.read_text())["rounds"]) == 2
    monkeypatch.setattr(loop.quality, "train_or_resume", real)
    tiny_loop.spy.refuse = True  # the saved annotation is used: no truth is read again
    record = _run(loop, tiny_loop, arm, record_path)
    assert [r["patient"] for r in record["rounds"]][:2] == chosen and len(tiny_loop.train_calls) == 3
    assert {r["patient"] for r in record["rounds"]} == set(tiny_loop.pool.patients())
    tiny_loop.args.rounds = 4
    with pytest.raises(SystemExit, match="every pool patient is labeled already"):
        _run(loop, tiny_loop, arm, record_path)


def test_a_shown_arm_trains_on_the_review_slices_only(loop, tiny_loop, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "score_model", lambda state, model: {"dice": 0.5})
    arm = loop.parse_arm("random+slices-shown")
    tiny_loop.args.rounds = 1
    record = _run(loop, tiny_loop, arm, tmp_path / "records" / "random+slices-shown_seed3.json")
    shown = record["rounds"][0]["shown_slices"]
    assert sorted(shown) == record["rounds"][0]["frames"]
    assert all(len(indices) == loop.SLICES_PER_FRAME for indices in shown.values())
    trained = tiny_loop.train_calls[0]
    assert len(trained.labeled_labels) == len(tiny_loop.base.labeled_labels) + 2 * loop.SLICES_PER_FRAME
    assert len(trained.unlabeled_images) == len(tiny_loop.base.unlabeled_images) - 2 * loop.SLICES_PER_FRAME


def test_the_control_arm_fine_tunes_on_the_unchanged_data(loop, tiny_loop, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "score_model", lambda state, model: {"dice": 0.5})
    arm = loop.parse_arm("random+none-shown")
    tiny_loop.args.rounds = 1
    record = _run(loop, tiny_loop, arm, tmp_path / "records" / "random+none-shown_seed3.json")
    assert record["rounds"][0]["cost"]["slices_edited"] == 0 and len(tiny_loop.train_calls) == 1
    trained = tiny_loop.train_calls[0]
    assert len(trained.labeled_labels) == len(tiny_loop.base.labeled_labels)
    assert len(trained.unlabeled_images) == len(tiny_loop.base.unlabeled_images)


def test_a_record_counts_only_for_its_settings_and_start_weights(loop, tiny_loop, tmp_path):
    arm = loop.parse_arm("random+slices")
    record_path = tmp_path / "records" / "random+slices_seed3.json"
    tiny_loop.args.rounds = 1
    _run(loop, tiny_loop, arm, record_path)
    settings = _settings(loop, tiny_loop, arm)
    identity = loop.quality.weights_sha256(tiny_loop.start)
    assert loop.read_loop_record(record_path, settings, identity) is not None
    assert loop.read_loop_record(record_path, settings, "other weights") is None
    tiny_loop.args.fine_tune_iterations = 3
    assert loop.read_loop_record(record_path, _settings(loop, tiny_loop, arm), None) is None
    record_path.write_text("{not json")
    with pytest.raises(SystemExit, match="not a readable loop record"):
        loop.read_loop_record(record_path, settings, None)


# --------------------------------------------------------------------------------------
# The report: curves, paired differences, verdicts and the targets


def _record(arm: str, seed: int, dice: list[float], slices: int) -> dict:
    rounds = [
        {
            "round": i,
            "patient": f"patient0{i}",
            "cost": {"slices_edited": slices, "voxels_changed": 100 * slices, "slices_shown": slices},
            "scores": {"dice": d, "hd95_voxels": 10.0 - 10 * d},
            "seconds": {"choice": 60.0, "annotation": 2.0, "fine_tune": 200.0, "scoring": 30.0},
        }
        for i, d in enumerate(dice[1:], start=1)
    ]
    return {
        "arm": arm,
        "seed": seed,
        "start": {
            "model_weights_sha256": f"start of seed {seed}",
            "scores": {"dice": dice[0], "hd95_voxels": 9.0},
        },
        "rounds": rounds,
    }


def _records(regions_gain: float, random_offsets=(0.01, 0.02, 0.015)) -> list[dict]:
    records = []
    for seed, offset in zip((1337, 2, 3), random_offsets, strict=True):
        start = 0.70 + 0.01 * (seed % 3)
        records.append(_record("rank+full", seed, [start + g for g in (0, 0.02, 0.04, 0.06, 0.08)], 20))
        records.append(
            _record("random+full", seed, [start + g - offset for g in (0, 0.02, 0.04, 0.06, 0.08)], 20)
        )
        records.append(
            _record("rank+regions", seed, [start + regions_gain * g for g in (0, 0.02, 0.04, 0.06, 0.08)], 4)
        )
        records.append(
            _record(
                "random+regions",
                seed,
                [start + regions_gain * g - offset for g in (0, 0.02, 0.04, 0.06, 0.08)],
                4,
            )
        )
    return records


def test_the_targets_are_evaluated_by_the_rule(loop):
    rows = loop.report_rows(_records(regions_gain=0.95))
    first = loop.target_regions_vs_full(rows, 4)
    assert (
        first["status"] == "met" and "95% of full's" in first["detail"] and "20% of full's" in first["detail"]
    )
    assert loop.target_regions_vs_full(loop.report_rows(_records(regions_gain=0.9)), 4)["status"] == "met"
    assert loop.target_regions_vs_full(loop.report_rows(_records(regions_gain=0.8)), 4)["status"] == "not met"
    assert loop.target_rank_beats_random(rows, 4)["status"] == "met"
    mixed = loop.report_rows(_records(0.95, random_offsets=(0.02, -0.03, 0.001)))
    assert loop.target_rank_beats_random(mixed, 4)["status"] == "not met"
    seven = {1337: 0.78, 2: 0.79, 3: 0.78}
    assert loop.target_seven_labeled(rows, 4, seven, "rank+full")["status"] == "met"
    assert (
        loop.target_seven_labeled(rows, 4, {s: d + 0.1 for s, d in seven.items()}, "rank+full")["status"]
        == "not met"
    )
    shown = [{**r, "method": "rank+regions-shown"} for r in rows if r["method"] == "rank+regions"]
    assert loop.target_regions_vs_full(rows + shown, 4, "rank+regions-shown")["status"] == "met"
    two_seeds = [r for r in rows if r["seed"] != 3]
    assert loop.target_regions_vs_full(two_seeds, 4)["status"] == "not evaluable yet"
    assert loop.target_rank_beats_random(two_seeds, 4)["status"] == "not evaluable yet"


def test_costs_accumulate_over_rounds_and_the_report_is_written(loop, tmp_path):
    rows = loop.report_rows(_records(regions_gain=0.95))
    regions_1337 = [r for r in rows if r["method"] == "rank+regions" and r["seed"] == 1337]
    assert [r["cumulative_slices_edited"] for r in regions_1337] == [0, 4, 8, 12, 16]
    assert [r["cumulative_voxels_changed"] for r in regions_1337] == [0, 400, 800, 1200, 1600]
    difference = loop.compare(rows, "rank+full", "random+full", 4)
    assert difference["per_seed"] == pytest.approx({1337: 1.0, 2: 2.0, 3: 1.5})
    assert difference["verdict"] == "better"
    loop.write_report(rows, tmp_path, "lr0.001", 4, {}, [])  # a tag with a dot keeps its whole name
    assert {p.name for p in tmp_path.iterdir()} == {
        f"annotation_loop_lr0.001.{x}" for x in ("md", "csv", "png")
    }
    loop.write_report(rows, tmp_path, "test", 4, {1337: 0.78, 2: 0.79, 3: 0.78}, ["rank+slices (seed 3)"])
    report = (tmp_path / "annotation_loop_test.md").read_text()
    assert "| rank+full | random+full | 1337: +1.00 / 2: +2.00 / 3: +1.50 |" in report
    assert "| rank+regions | 4 | 3 |" in report and "rank+slices (seed 3)" in report
    assert "| rank+full | 12 | 60 | 2 | 200 | 30 | 292 |" in report
    assert (tmp_path / "annotation_loop_test.png").stat().st_size > 0
    assert "| rank+full | 4 | 3 |" in report and report.count("| - |") >= 4  # no error voxels recorded
    for record in _records(regions_gain=0.95)[:1]:
        for entry in record["rounds"]:
            entry["cost"]["error_voxels"] = 4 * entry["cost"]["voxels_changed"]
        assert loop.errors_fixed_text(loop.at_round(loop.report_rows([record]), 4)) == "25%"
    assert len((tmp_path / "annotation_loop_test.csv").read_text().splitlines()) == 1 + len(rows)


def _lists(root: Path) -> None:
    """The list files of an ACDC-like folder (no image): 3 labeled patients and a pool of 2."""
    root.mkdir(parents=True, exist_ok=True)
    slices = [f"patient00{p}_frame0{f}_slice_{s}" for p in range(1, 6) for f in (1, 2) for s in (1, 2)]
    (root / "train_slices.list").write_text("\n".join(slices) + "\n")
    (root / "val.list").write_text(
        "\n".join(f"patient01{p}_frame0{f}" for p in (0, 1) for f in (1, 2)) + "\n"
    )


def test_reuse_only_assembles_the_report_from_records_without_training(loop, tmp_path, monkeypatch):
    _lists(tmp_path / "ACDC")
    out = tmp_path / "results"
    argv = [
        "--reuse-only",
        "--data-root",
        str(tmp_path / "ACDC"),
        "--out",
        str(out),
        "--work",
        str(tmp_path / "w"),
    ]
    argv += ["--arms", "rank+full", "random+full", "--seeds", "1337", "2", "3", "--rounds", "1"]
    monkeypatch.setattr(loop, "prepare_seed", lambda *a: pytest.fail("--reuse-only loaded data"))
    with pytest.raises(SystemExit, match=r"train_slices\.list"):  # a data folder without its lists
        loop.main([*argv[:2], str(tmp_path), *argv[3:]])
    with pytest.raises(SystemExit, match="no loop record"):
        loop.main(argv)
    assert not out.exists() or not list(out.glob("annotation_loop_*"))
    args = loop.parse_arguments(argv)
    pool, volumes = loop.listed_names(args)
    assert pool == ["patient004", "patient005"] and len(volumes) == 4
    quality_work = args.work / loop.quality_tag(args)
    for record in _records(regions_gain=0.9):
        arm = loop.parse_arm(record["arm"])
        if arm.name not in args.arms:
            continue
        record["rounds"] = record["rounds"][:1]
        record.update(
            format=loop.RECORD_FORMAT,
            settings=loop.arm_settings(
                arm, loop.protocol_preset(args), args, record["seed"], quality_work, pool, volumes
            ),
        )
        if arm.name == "random+full" and record["seed"] == 3:
            record["settings"]["fine_tune"]["optim"]["iterations"] += 1  # made with other settings
        loop.write_loop_record(
            out / "runs" / "annotation_loop_acdc_cpu" / f"{arm.name}_seed{record['seed']}.json", record
        )
    loop.main(argv)
    report = (out / "annotation_loop_acdc_cpu.md").read_text()
    assert (
        "| random+full | 1 | 2 |" in report and "random+full (seed 3)" in report.split("Not recorded yet")[1]
    )
    assert "| rank+full | random+full | 1337: +1.00 / 2: +2.00 | +1.50 ± 0.50 | too few seeds |" in report
    loop.main([*argv[:-1], "2"])  # one more round asked for than recorded
    assert "rank+full (seed 1337) round 2," in (out / "annotation_loop_acdc_cpu.md").read_text()
    loop.main(argv)
    # A record of a seed made from another start model (trained again) is not paired with the others.
    path = out / "runs" / "annotation_loop_acdc_cpu" / "rank+full_seed2.json"
    record = json.loads(path.read_text())
    record["start"]["model_weights_sha256"] = "a start trained again"
    loop.write_loop_record(path, record)
    report_before = (out / "annotation_loop_acdc_cpu.md").read_text()
    with pytest.raises(SystemExit, match="records of seed 2 start from different models"):
        loop.main(argv)
    assert (out / "annotation_loop_acdc_cpu.md").read_text() == report_before


def test_the_start_model_is_the_quality_protocols_run_trained_once(loop, tmp_path, monkeypatch):
    trained = []

    def fake_train(config, *, events, resume, overwrite, data):
        from buseg.config import to_dict

        out = Path(config.out_dir)
        trained.append((out.name, config.init_weights, config.optim.iterations))
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(config)))
        for name in ("last.pt", "final.pt", "model.pt"):
            (out / name).write_bytes(f"{out.name} {config.seed}".encode())
        (out / "history.json").write_text(json.dumps({"validation": []}))
        return argparse.Namespace(model_path=out / "model.pt", best_path=None, history={"validation": []})

    monkeypatch.setattr(loop.quality, "train", fake_train)
    args = loop.parse_arguments(["--data-root", str(tmp_path / "ACDC"), "--seeds", "2"])
    preset, work = loop.protocol_preset(args), tmp_path / "quality" / loop.quality_tag(args)
    start = loop.start_model(preset, args, 2, work, data=None)
    assert start == work / "ours-url-only_seed2" / "final.pt"
    assert trained == [
        ("pretrain_seed2", None, 0),  # the copy-paste first stage (its pre-training iterations)
        ("ours-url-only_seed2", str(work / "pretrain_seed2" / "model.pt"), preset.iterations),
    ]
    assert loop.start_model(preset, args, 2, work, data=None) == start and len(trained) == 2  # reused
    (work / "pretrain_seed2" / "model.pt").write_bytes(b"a first stage trained again, other weights")
    loop.start_model(preset, args, 2, work, data=None)
    assert trained[-1][0] == "ours-url-only_seed2" and len(trained) == 3  # its second stage is stale
    args.reuse_only = True
    with pytest.raises(loop.quality.UnfinishedRunError):
        loop.start_model(preset, args, 3, work, data=None)
