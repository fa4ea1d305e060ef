"""The quality benchmark's protocol: the verdict rule, paired differences, fair schedules, resuming.

The verdict rule is what turns runs into claims: each test below fails with a looser rule
("mean above zero", "ahead in every seed" with one seed) or a stricter one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import threading
import time
from pathlib import Path

import pytest

from benchmarks import quality as quality_benchmark

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quality():
    return quality_benchmark


def _args(**extra) -> argparse.Namespace:
    values = {
        "data_root": Path("/data/ACDC"),
        "threads": 1,
        "device": "cpu",
        "set": [],
        "reuse_only": False,
        "score_every": 0,
    }
    values.update(extra)
    return argparse.Namespace(**values)


@pytest.mark.parametrize(
    ("differences", "expected"),
    [
        ([0.5, 0.2, 0.1], "better"),  # ahead in every seed, however little
        ([0.1, 0.1, 3.0], "better"),  # ahead in every seed though the mean (1.07) is below 2 SE (1.93)
        ([2.0, 2.1, 1.9, 2.0, -0.1], "better"),  # behind once, but mean 1.58 > 2 SE (0.84)
        ([1.0, -0.5, 0.8], "not separable"),  # mean 0.43 > 0, but below 2 SE (0.94)
        ([3.0, 2.5, -0.1], "not separable"),  # mean 1.8, 2 SE 1.92
        ([-0.5, -0.2, -0.1], "worse"),
        ([0.0, 0.0, 0.0], "not separable"),
        ([1.0, 1.0], "too few seeds"),  # two seeds: no claim, even when ahead in both
        ([5.0], "too few seeds"),
    ],
)
def test_verdict_rule(quality, differences, expected):
    assert quality.verdict(differences) == expected


def test_verdict_for_a_lower_is_better_metric(quality):
    assert quality.verdict([-1.0, -2.0, -0.5], higher_is_better=False) == "better"
    assert quality.verdict([1.0, 2.0, 0.5], higher_is_better=False) == "worse"


def test_mean_and_standard_error(quality):
    mean, se = quality.mean_and_standard_error([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0) and se == pytest.approx(1 / math.sqrt(3))
    assert math.isnan(quality.mean_and_standard_error([4.0])[1])


def _row(method: str, seed: int, dice: float, hd95: float = 5.0) -> dict:
    return {
        "method": method,
        "seed": seed,
        "last_dice": dice,
        "best_dice": dice - 0.01,
        "last_hd95_voxels": hd95,
        "best_hd95_voxels": hd95,
        "train_seconds": 600.0,
        "last_zero_dice_structures": 0,
    }


def test_differences_are_paired_by_seed(quality):
    rows = [
        _row("bcp", 2, 0.70),
        _row("bcp", 1, 0.75),
        _row("bcp", 3, 0.80),
        _row("ours", 1, 0.76),
        _row("ours", 3, 0.83),
        _row("ours", 2, 0.71),
        _row("ours", 4, 0.99),  # no BCP run with seed 4: not paired
    ]
    differences = quality.paired_differences(rows, "ours", "bcp", "last_dice")
    assert list(differences) == [2, 1, 3]  # the seeds' order in the rows: the order they were asked for
    assert [round(v, 6) for v in differences.values()] == [0.01, 0.01, 0.03]


def test_summary_reports_spread_per_seed_differences_and_verdicts(quality):
    rows = [_row("bcp", s, d, hd95=6.0) for s, d in ((1, 0.70), (2, 0.78), (3, 0.74))]
    rows += [_row("ours", s, d, hd95=4.0) for s, d in ((1, 0.72), (2, 0.79), (3, 0.75))]
    rows += [_row("noisy", s, d) for s, d in ((1, 0.75), (2, 0.72), (3, 0.80))]
    lines = {line["configuration"]: line for line in quality.summary_rows(rows, ["bcp"])}
    assert lines["bcp"]["Dice last"] == "74.00 ± 4.00"
    assert lines["bcp"]["vs bcp"] == "(reference)"
    assert lines["ours"]["per seed"] == "1: +2.00 / 2: +1.00 / 3: +1.00"
    assert lines["ours"]["vs bcp"].startswith("better: +1.33")
    assert lines["ours"]["HD95 Δ"].startswith("better")  # 2 voxels lower in every seed
    assert lines["noisy"]["vs bcp"].startswith("not separable")  # +5 / -6 / +6
    assert lines["ours"]["minutes"] == "10.00 ± 0.00"


def test_a_seed_without_a_finite_value_is_counted_out_in_the_cell(quality):
    assert quality.spread([0.70, float("nan"), 0.78], 100) == "74.00 ± 5.66 (2 of 3 seeds)"
    assert quality.spread([0.70, 0.78], 100) == "74.00 ± 5.66"
    assert quality.spread([float("inf"), 5.0]) == "5.00 (1 of 2 seeds)"


def _rule_rows(dice_by_key: dict[str, tuple[float, float, float]]) -> list[dict]:
    return [
        _row(key, seed, d)
        for key, dice in dice_by_key.items()
        for seed, d in zip((1, 2, 3), dice, strict=True)
    ]


def test_the_default_stays_unless_a_candidate_is_better_than_it(quality):
    # 'high' has the highest mean, but +9 / -1 / +1 against the default is not separable
    rows = _rule_rows({"high": (0.90, 0.70, 0.76), "default": (0.81, 0.71, 0.75)})
    choice = quality.choose_default(rows, ["high", "default"], "default")
    assert choice["pick"] == "default"
    assert choice["eligible"] == ["high", "default"]


def test_a_beaten_default_gives_way_to_the_best_eligible_mean(quality):
    rows = _rule_rows(
        {
            "steady": (0.78, 0.79, 0.78),  # ahead of the default in every seed
            "lucky": (0.95, 0.60, 0.70),  # better than nobody, beaten by nobody (+17 / -19 / -8 vs steady)
            "default": (0.74, 0.76, 0.75),
        }
    )
    choice = quality.choose_default(rows, ["steady", "lucky", "default"], "default")
    assert choice["verdicts"][("steady", "default")] == "better"
    assert "default" not in choice["eligible"]
    # both are eligible; 'steady' has the higher mean (78.3 against 75.0)
    assert choice["eligible"] == ["steady", "lucky"]
    assert choice["pick"] == "steady"


def test_the_rule_is_not_applied_before_every_pair_has_three_seeds(quality):
    rows = _rule_rows({"url": (0.80, 0.81, 0.82), "default": (0.70, 0.71, 0.72)})
    rows = [r for r in rows if not (r["method"] == "default" and r["seed"] == 3)]
    choice = quality.choose_default(rows, ["url", "default"], "default")
    assert choice["pick"] is None
    report = "\n".join(quality.default_rule_report(rows, ["url", "default"], "default"))
    assert "Not applied yet" in report


def test_the_report_shows_the_rule_and_its_pick(quality):
    rows = _rule_rows({"url": (0.80, 0.81, 0.82), "default": (0.70, 0.71, 0.72)})
    report = quality.default_rule_report(rows, ["url", "default"], "default")
    assert "| url | 3 | 81.00 | - | better | yes |" in report
    assert "| default | 3 | 71.00 | worse | - | no |" in report
    assert report[-1].startswith("Pick: **url**")


def test_variants_and_controls_are_configurations(quality):
    preset = quality.PRESETS[("acdc", "cpu")]
    config = quality.base_config(preset, _args(), "ours-crl-foreground-constant", 1, Path("x"))
    assert (config.crl.weighting, config.crl.shrink_iterations, config.url.enabled) == ("foreground", 0, True)
    config = quality.base_config(preset, _args(), "ours-url-random", 1, Path("x"))
    assert config.url.selection == "random" and not config.crl.enabled
    assert quality.base_config(
        preset, _args(), "ours-crl-after-cleanup", 1, Path("x")
    ).crl.uncertainty_after_cleanup
    assert "ours" not in quality.PROTOCOL and {"cp-pretrain-only", "ours-url-random"} <= set(quality.PROTOCOL)
    assert quality._is_default("ours-url-only", preset, _args())  # the default: URL alone
    assert not quality._is_default("ours-crl-concentration", preset, _args())


class FakeTrain:
    """Stands in for the training: records how it was called and leaves the files a run leaves."""

    def __init__(self):
        self.calls = []

    def __call__(self, config, *, events, resume, overwrite, data):
        out = Path(config.out_dir)
        self.calls.append({"config": config, "resume": resume, "overwrite": overwrite})
        out.mkdir(parents=True, exist_ok=True)
        from buseg.config import to_dict

        (out / "config.json").write_text(json.dumps(to_dict(config)))
        for name in ("last.pt", "final.pt", "model.pt", "best.pt"):
            (out / name).write_bytes(f"{config.seed} {config.optim.iterations}".encode())
        (out / "history.json").write_text(json.dumps({"validation": [{"iteration": 1, "dice": 0.5}]}))
        return argparse.Namespace(
            model_path=out / "model.pt",
            best_path=out / "best.pt",
            best_iteration=1,
            best_metric=0.5,
            history={"validation": [{"iteration": 1, "dice": 0.5}]},
        )


@pytest.fixture()
def fake_train(quality, monkeypatch):
    fake = FakeTrain()
    monkeypatch.setattr(quality, "train", fake)
    # FakeTrain's model files are bytes, not checkpoints: their weights are the bytes.
    monkeypatch.setattr(quality, "weights_sha256", quality._file_sha256)
    return fake


def test_supervised_has_the_same_schedule_as_the_copy_paste_methods(quality, fake_train, tmp_path):
    preset = quality.PRESETS[("acdc", "cpu")]
    args = _args()
    starts = {
        kind: quality.run_first_stage(kind, preset, args, 1, tmp_path, data=None)
        for kind in ("copy-paste", "supervised")
    }
    first = {call["config"].method.name: call["config"] for call in fake_train.calls}
    for name in ("bcp", "supervised"):  # stage 1: pretrain_iterations at lr, the student kept
        c = first[name]
        assert c.optim.lr == preset.lr
        assert c.optim.pretrain_iterations + c.optim.iterations == preset.pretrain_iterations
        assert c.method.model_weights == "student" or name == "bcp"
    second = {
        key: quality.second_stage_config(key, preset, args, 1, tmp_path / key, starts)
        for key in ("supervised", "bcp", "mean-teacher")
    }
    for _key, (
        config,
        offset,
    ) in second.items():  # stage 2: iterations at self_training_lr, EMA teacher scored
        assert (config.optim.lr, config.optim.iterations, offset) == (
            preset.self_training_lr,
            preset.iterations,
            preset.pretrain_iterations,
        )
        assert config.method.model_weights == "teacher"
    assert second["supervised"][0].init_weights == str(starts["supervised"])
    assert (
        second["bcp"][0].init_weights == second["mean-teacher"][0].init_weights == str(starts["copy-paste"])
    )


def test_runs_are_reused_resumed_or_started(quality, fake_train, tmp_path):
    preset = quality.PRESETS[("acdc", "cpu")]
    args = _args()
    out = tmp_path / "bcp_seed1"
    start = tmp_path / "start.pt"
    start.write_bytes(b"pre-trained weights")
    config, _ = quality.second_stage_config("bcp", preset, args, 1, out, {"copy-paste": start})
    quality.train_or_resume(config, out, "bcp", args, data=None)
    assert fake_train.calls[-1]["resume"] is False and fake_train.calls[-1]["overwrite"] is True
    assert quality._reusable(out, config)
    # Interrupted (last.pt, no final.pt): the same configuration resumes ...
    (out / "final.pt").unlink()
    quality.train_or_resume(config, out, "bcp", args, data=None)
    assert fake_train.calls[-1]["resume"] is True and fake_train.calls[-1]["overwrite"] is False
    # ... another one starts afresh.
    (out / "final.pt").unlink()
    other, _ = quality.second_stage_config(
        "bcp", preset, _args(set=["method.mask_ratio=0.5"]), 1, out, {"copy-paste": start}
    )
    quality.train_or_resume(other, out, "bcp", args, data=None)
    assert fake_train.calls[-1]["resume"] is False
    # The first stage trained again (same path, new weights): runs from the old one are stale.
    assert quality._reusable(out, other)
    start.write_bytes(b"other pre-trained weights")
    assert not quality._reusable(out, other)
    with pytest.raises(quality.UnfinishedRunError, match="reuse-only"):
        quality.train_or_resume(other, out, "bcp", _args(reuse_only=True), data=None)


def test_how_often_a_run_checkpoints_does_not_distinguish_runs(quality, tmp_path):
    preset = quality.PRESETS[("acdc", "cpu")]
    made = quality.base_config(preset, _args(), "bcp", 1, tmp_path)
    made.checkpoint_interval, made.num_threads = 10**9, 2
    (tmp_path / "config.json").write_text(json.dumps(quality.to_dict(made)))
    assert quality._same_config(tmp_path, quality.base_config(preset, _args(), "bcp", 1, tmp_path))


def test_mean_teacher_settings_distinguish_only_mean_teacher_runs(quality, tmp_path):
    preset = quality.PRESETS[("acdc", "cpu")]
    for method, same in (("bcp", True), ("mean-teacher", False)):
        made = quality.base_config(preset, _args(), method, 1, tmp_path)
        made.method.consistency_rampup_iterations = 12000  # the value before the ramp followed the run
        (tmp_path / "config.json").write_text(json.dumps(quality.to_dict(made)))
        assert (
            quality._same_config(tmp_path, quality.base_config(preset, _args(), method, 1, tmp_path)) is same
        )


def test_runs_made_before_the_crl_variants_are_the_discard_variant(quality, tmp_path):
    preset = quality.PRESETS[("acdc", "cpu")]
    made = quality.to_dict(quality.base_config(preset, _args(), "ours-crl-discard", 1, tmp_path))
    for name in (
        "weighting",
        "extra_weight",
        "shrink_iterations",
        "negative_threshold",
        "uncertainty_after_cleanup",
    ):
        del made["crl"][name]
    del made["url"]["selection"]
    (tmp_path / "config.json").write_text(json.dumps(made))
    assert quality._same_config(
        tmp_path, quality.base_config(preset, _args(), "ours-crl-discard", 1, tmp_path)
    )
    assert not quality._same_config(
        tmp_path, quality.base_config(preset, _args(), "ours-crl-concentration", 1, tmp_path)
    )


def test_ours_is_whatever_the_engine_defaults_are(quality, crl_default, tmp_path):
    preset = quality.PRESETS[("acdc", "cpu")]
    for crl_on in (False, True):  # today's default (URL only), then CRL switched on by default
        crl_default(quality, crl_on)
        ours = quality.base_config(preset, _args(), "ours", 1, tmp_path)
        assert (ours.url.enabled, ours.crl.enabled) == (True, crl_on)
        assert quality._is_default("ours-url-only", preset, _args()) is not crl_on
        assert quality._is_default("ours-crl-concentration", preset, _args()) is crl_on


def test_crl_settings_distinguish_only_runs_with_crl(quality, tmp_path):
    preset = quality.PRESETS[("acdc", "cpu")]
    for key, weighting_matters in (("ours-url-only", False), ("ours-url-random", False), ("ours", True)):
        config = quality.base_config(preset, _args(), key, 1, tmp_path)
        config.crl.enabled = key == "ours"
        (tmp_path / "config.json").write_text(json.dumps(quality.to_dict(config)))
        config.crl.weighting = "negative" if config.crl.weighting != "negative" else "discard"
        config.crl.quantile = 0.5
        assert quality._same_config(tmp_path, config) is not weighting_matters, key
        config.crl.loss = "ce"  # read with CRL off too: the pseudo-label Dice is weighted or not
        assert not quality._same_config(tmp_path, config), key
    url_only = quality.base_config(preset, _args(), "ours-url-only", 1, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(quality.to_dict(url_only)))
    url_only.crl.enabled = True  # a run with CRL never matches one without
    assert not quality._same_config(tmp_path, url_only)


def test_a_saved_row_is_reused_only_for_the_same_protocol_and_weights(
    quality, fake_train, tmp_path, monkeypatch
):
    preset = quality.PRESETS[("acdc", "cpu")]
    args = _args(review_budget=0.01)
    monkeypatch.setattr(
        quality,
        "evaluate_model",
        lambda path, cases, *rest: {"summary": {"dice": len(cases) / 100}, "cases": []},
    )
    volumes = quality.Volumes(everything=list(range(20)), evaluation=list(range(10)))
    data = argparse.Namespace(num_classes=4)
    config, _ = quality.second_stage_config("bcp", preset, args, 1, tmp_path / "bcp_seed1", {})
    row, _ = quality.run_method("bcp", preset, args, 1, tmp_path, data, {}, volumes)
    assert (row["last_dice"], row["best_dice"]) == (0.2, 0.1)  # last on all 20 volumes, selected on 10
    calls = len(fake_train.calls)
    assert quality.run_method("bcp", preset, args, 1, tmp_path, data, {}, volumes)[0] == row
    assert len(fake_train.calls) == calls  # reused, not trained again
    saved = json.loads((tmp_path / "bcp_seed1" / "row.json").read_text())
    saved["row"]["protocol"] = 1  # scored by the old protocol: re-scored from the finished run
    (tmp_path / "bcp_seed1" / "row.json").write_text(json.dumps(saved))
    assert quality._saved_row(tmp_path / "bcp_seed1", config) is None
    assert quality.run_method("bcp", preset, args, 1, tmp_path, data, {}, volumes)[0]["protocol"] == (
        quality.PROTOCOL_VERSION
    )
    assert len(fake_train.calls) == calls


def test_the_example_figure_of_a_working_resolution_model_shows_the_labels_grid(
    quality, tmp_path, monkeypatch
):
    """An LA model at 1.25 mm sees a 44-slice image while its labels have 88 slices: the figure used to
    index the image with a label slice (IndexError after every LA benchmark)."""
    import numpy as np

    from buseg.data.resample import Grid
    from buseg.data.training_data import ValidationCase

    identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    label_grid = Grid((16, 12, 12), (0.625, 0.625, 0.625), (0.0, 0.0, 0.0), identity)
    image_grid = Grid((8, 6, 6), (1.25, 1.25, 1.25), (0.3125, 0.3125, 0.3125), identity)
    labels = np.zeros(label_grid.shape, dtype=np.uint8)
    labels[12:15, 3:9, 3:9] = 1  # the most structure beyond the image's 8 slices
    case = ValidationCase(
        "case",
        np.random.default_rng(0).random(image_grid.shape, dtype=np.float32),
        labels,
        label_grid.spacing_mm,
        image_grid=image_grid,
        label_grid=label_grid,
    )
    uncertainty = np.zeros(labels.shape, dtype=np.float32)
    monkeypatch.setattr(quality, "predict_case", lambda *args: (labels, uncertainty))
    path = tmp_path / "example.png"
    quality.plot_example({"bcp": tmp_path / "model.pt"}, case, path, "cpu", 0.01)
    assert path.stat().st_size > 0


def test_la_scoring_keeps_the_largest_component_as_the_published_test(quality, monkeypatch):
    """LA's presets score every method after the largest-connected-component step (BCP's LA test does);
    ACDC's do not. A stray blob far from the structure then costs no HD95."""
    import numpy as np

    from buseg.data.training_data import ValidationCase

    assert (
        quality.PRESETS[("la", "cpu")].largest_component
        and quality.PRESETS[("la", "paper")].largest_component
    )
    assert not quality.PRESETS[("acdc", "cpu")].largest_component
    labels = np.zeros((24, 24, 24), dtype=np.uint8)
    labels[8:16, 8:16, 8:16] = 1
    prediction = labels.copy()
    prediction[18:22, 18:22, 0:4] = 1  # a stray blob in a corner
    monkeypatch.setattr(quality, "predict_case", lambda *a: (prediction, np.zeros(labels.shape, np.float32)))
    case = ValidationCase("case", np.zeros(labels.shape, np.float32), labels, (1.0, 1.0, 1.0))
    plain = quality.evaluate_model(Path("m.pt"), [case], 2, "cpu", 0.01)["summary"]
    kept = quality.evaluate_model(Path("m.pt"), [case], 2, "cpu", 0.01, largest_component=True)["summary"]
    assert plain["dice"] < 1.0 and plain["hd95_voxels"] > 0
    assert kept["dice"] == 1.0 and kept["hd95_voxels"] == 0.0


def test_supervised_seconds_per_iteration_counts_the_iterations_of_its_own_first_stage(
    quality, fake_train, tmp_path, monkeypatch
):
    """Supervised's time includes its own first stage, so its s/it divides by both stages' iterations
    (it divided by the second stage's alone: 1.06 s/it reported for a 0.71 s/it run)."""
    preset = quality.PRESETS[("acdc", "cpu")]
    args = _args(review_budget=0.01)
    monkeypatch.setattr(quality, "evaluate_model", lambda *a, **k: {"summary": {"dice": 0.5}, "cases": []})
    starts = {"supervised": quality.run_first_stage("supervised", preset, args, 1, tmp_path, data=None)}
    (starts["supervised"].parent / "seconds.json").write_text(json.dumps({"seconds": 2000.0}))
    volumes = quality.Volumes(everything=list(range(2)), evaluation=list(range(1)))
    data = argparse.Namespace(num_classes=4)
    row, _ = quality.run_method("supervised", preset, args, 1, tmp_path, data, starts, volumes)
    total = preset.pretrain_iterations + preset.iterations
    assert row["train_seconds"] >= 2000.0  # the first stage's time is in it
    assert row["seconds_per_iteration"] == pytest.approx(row["train_seconds"] / total, abs=1e-4)


def test_a_single_paired_seed_shows_no_nan_error(quality):
    rows = [
        {"method": method, "seed": 1, "last_dice": dice, "last_hd95_voxels": 5.0}
        for method, dice in (("bcp", 0.75), ("ours", 0.78))
    ]
    line = {line["configuration"]: line for line in quality.summary_rows(rows, ["bcp"])}["ours"]
    assert line["vs bcp"] == "too few seeds: +3.00 (one seed, no error estimate)"
    assert "nan" not in " ".join(str(value) for value in line.values())


def test_reuse_only_assembles_the_finished_runs_and_lists_the_rest(
    quality, fake_train, tmp_path, monkeypatch
):
    """Seeds finish one after another over days: the tables must show what has finished (and say what
    has not) without training anything."""
    monkeypatch.setattr(quality, "evaluate_model", lambda *a, **k: {"summary": {"dice": 0.5}, "cases": []})
    monkeypatch.setattr(
        quality, "load_splits", lambda *a: (argparse.Namespace(validation=[0, 1], num_classes=4), [2])
    )
    plotted = []
    monkeypatch.setattr(quality, "plot_example", lambda models, *a, **k: plotted.append(sorted(models)))
    args = _assembly_args(tmp_path, methods=["cp-pretrain-only", "bcp", "ours-url-only"])
    quality.run_benchmark(args, 7)  # seed 1 trained
    (args.work / "t" / "ours-url-only_seed1" / "final.pt").unlink()  # and this run interrupted
    (args.out / "runs" / "t" / "ours-url-only_seed1.json").unlink()  # (so not recorded)
    trained = len(fake_train.calls)
    args.reuse_only, args.seeds = True, [1, 2]
    quality.run_benchmark(args, 7)
    assert len(fake_train.calls) == trained  # nothing trained or resumed
    rows = (args.out / "quality_t.csv").read_text().splitlines()[1:]
    assert sorted(r.split(",")[:2] for r in rows) == [["bcp", "1"], ["cp-pretrain-only", "1"]]
    assert plotted[-1] == ["bcp", "cp-pretrain-only"]  # not the interrupted run's checkpoint
    report = (args.out / "quality_t.md").read_text()
    for left_out in ("ours-url-only (seed 1)", "cp-pretrain-only (seed 2)", "bcp (seed 2)"):
        assert left_out in report.split("No finished run")[1]
    # Nothing finished (a mistyped work folder, no records): an error, and the tables stay as they were.
    args.work, args.out = tmp_path / "typo", tmp_path / "results without records"
    args.out.mkdir()
    (args.out / "quality_t.md").write_text(report)
    with pytest.raises(SystemExit, match="no finished run"):
        quality.run_benchmark(args, 7)
    assert (args.out / "quality_t.md").read_text() == report


def test_a_report_with_no_finished_run_still_lists_what_is_missing(quality):
    args = _args(references=["bcp"], device="cpu", dataset="acdc")
    lines = quality.markdown_report([], quality.PRESETS[("acdc", "cpu")], args, "t", ["bcp (seed 1)"])
    assert "bcp (seed 1)" in lines[-1] and not any(line.startswith("|") for line in lines)


def test_a_default_candidate_that_is_not_run_is_an_error(quality, capsys):
    with pytest.raises(SystemExit) as stop:
        quality.parse_arguments(
            ["--methods", "bcp", "ours-url-only", "--default-candidates", "ours-url-only", "ours-crl-discard"]
        )
    assert stop.value.code == 2
    assert "--default-candidates ours-crl-discard: not among --methods" in capsys.readouterr().err
    args = quality.parse_arguments(
        ["--methods", "bcp", "ours-url-only", "--default-candidates", "ours-url-only"]
    )
    assert args.default_candidates == ["ours-url-only"]


def test_the_report_lists_every_seed_and_the_differences_against_every_reference(quality):
    rows = [_row("bcp", s, d, hd95=6.0) for s, d in ((1, 0.70), (2, 0.78), (3, 0.74))]
    rows += [_row("ours-url-only", s, d, hd95=4.0) for s, d in ((1, 0.72), (2, 0.79), (3, 0.75))]
    rows += [_row("ours-crl-concentration", s, d) for s, d in ((1, 0.71), (3, 0.77))]  # seed 2 unfinished
    rows[-1]["last_zero_dice_structures"] = 2
    table = quality.per_seed_table(rows, ["bcp", "ours-url-only"])
    assert next(line for line in table if line.startswith("| configuration")) == (
        "| configuration | seed 1: Dice / HD95 | seed 2: Dice / HD95 | seed 3: Dice / HD95 "
        "| − bcp, per seed | − ours-url-only, per seed |"
    )
    assert (
        "| ours-url-only | 72.00 / 4.00 | 79.00 / 4.00 | 75.00 / 4.00 | 1: +2.00 / 2: +1.00 / 3: +1.00 | - |"
        in table
    )
    assert (
        "| ours-crl-concentration | 71.00 / 5.00 | - | 77.00 / 5.00 (2 at Dice 0) | 1: +1.00 / 3: +3.00 | 1: -1.00 / 3: +2.00 |"
        in table
    )
    report = quality.markdown_report(
        rows, quality.PRESETS[("acdc", "cpu")], _args(references=["bcp", "ours-url-only"]), "t"
    )
    assert "## Per seed (last checkpoint, all held-out volumes)" in report


def test_structures_at_dice_0_are_counted_for_new_and_earlier_scored_runs(quality, tmp_path, monkeypatch):
    evaluation = {
        "cases": [
            {"case": "a", "dice": 0.5, "dice_class1": 0.0, "dice_class2": 0.9, "dice_class3": 0.8},
            {"case": "b", "dice": 0.6, "dice_class1": 0.7, "dice_class2": 0.0, "dice_class3": 0.0},
            {"case": "c", "dice": 0.9, "dice_class1": 0.9, "dice_class2": 0.9, "dice_class3": float("nan")},
        ]
    }
    assert quality.zero_dice_structures(evaluation) == 3
    # a row scored before the count existed gets it from the evaluation stored beside it
    (tmp_path / "evaluation_last.json").write_text(json.dumps(evaluation))
    row = {"method": "bcp", "seed": 1, "protocol": quality.PROTOCOL_VERSION, "final_sha256": None}
    (tmp_path / "row.json").write_text(json.dumps({"row": row, "curve": []}))
    monkeypatch.setattr(quality, "_reusable", lambda out, config: True)
    saved, _ = quality._saved_row(tmp_path, config=None)
    assert saved["last_zero_dice_structures"] == 3
    # without its stored evaluation the count is unknown, and the table must not read as "none"
    (tmp_path / "evaluation_last.json").unlink()
    saved, _ = quality._saved_row(tmp_path, config=None)
    assert saved["last_zero_dice_structures"] is None
    table = quality.per_seed_table([{**_row("bcp", 1, 0.7), **saved}], [])
    assert "(Dice-0 count unknown)" in "\n".join(table)


def test_two_processes_sharing_a_work_folder_train_a_first_stage_once(
    quality, fake_train, tmp_path, monkeypatch
):
    """Two queues of runs (say, one per seed range) start the same seed's pre-training at once: the
    second waits for the first and reuses its model instead of training the folder a second time."""

    def train_slowly(config, **kwargs):
        time.sleep(0.5)  # long enough for the other thread to find no model.pt without the lock
        return fake_train(config, **kwargs)

    monkeypatch.setattr(quality, "train", train_slowly)
    preset = quality.PRESETS[("acdc", "cpu")]
    starts = []
    threads = [
        threading.Thread(
            target=lambda: starts.append(
                quality.run_first_stage("copy-paste", preset, _args(), 1, tmp_path, None)
            )
        )
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(fake_train.calls) == 1
    assert starts == [tmp_path / "pretrain_seed1" / "model.pt"] * 2


def test_assembling_takes_no_lock_so_it_never_waits_for_a_run_in_progress(quality, tmp_path):
    out = tmp_path / "bcp_seed1"

    def assemble():
        with quality.run_lock(out, _args(reuse_only=True)):
            pass

    with quality.run_lock(out, _args()):  # a training process holds the folder
        assembler = threading.Thread(target=assemble)
        assembler.start()
        assembler.join(timeout=10)
        assert not assembler.is_alive()


def test_a_reused_row_takes_the_name_it_is_asked_for(quality, fake_train, tmp_path, monkeypatch):
    """Runs made under 'ours' when the default was URL + CRL discard, linked in as ours-crl-discard
    (what they trained), must be tabled as ours-crl-discard, not under the old name."""
    monkeypatch.setattr(quality, "evaluate_model", lambda *a, **k: {"summary": {"dice": 0.5}, "cases": []})
    preset = quality.PRESETS[("acdc", "cpu")]
    args = _args(review_budget=0.01)
    volumes = quality.Volumes(everything=list(range(2)), evaluation=list(range(1)))
    data = argparse.Namespace(num_classes=4)
    quality.run_method("ours-crl-discard", preset, args, 1, tmp_path, data, {}, volumes)
    row = json.loads((tmp_path / "ours-crl-discard_seed1" / "row.json").read_text())
    row["row"]["method"] = "ours"  # as scored under the old name
    (tmp_path / "ours-crl-discard_seed1" / "row.json").write_text(json.dumps(row))
    reused, _ = quality.run_method("ours-crl-discard", preset, args, 1, tmp_path, data, {}, volumes)
    assert reused["method"] == "ours-crl-discard"


def _assembly_args(tmp_path: Path, **extra) -> argparse.Namespace:
    values = dict(
        dataset="acdc",
        preset="cpu",
        iterations=None,
        pretrain_iterations=None,
        tag="t",
        labeled=[7],
        work=tmp_path / "work",
        out=tmp_path / "out",
        methods=["cp-pretrain-only", "bcp", "supervised"],
        references=["bcp"],
        seeds=[1],
        review_budget=0.01,
    )
    values.update(extra)
    args = _args(**values)
    args.out.mkdir(exist_ok=True)
    return args


@pytest.fixture()
def fake_scoring(quality, monkeypatch):
    cases = [{"name": "a", "dice_class1": 0.0, "dice_class2": 0.8}]
    monkeypatch.setattr(quality, "evaluate_model", lambda *a, **k: {"summary": {"dice": 0.5}, "cases": cases})
    monkeypatch.setattr(
        quality, "load_splits", lambda *a: (argparse.Namespace(validation=[0, 1], num_classes=4), [2])
    )
    monkeypatch.setattr(quality, "plot_example", lambda *a, **k: None)


def test_a_table_is_assembled_from_run_records_when_the_run_folders_are_gone(
    quality, fake_train, fake_scoring, tmp_path
):
    """Runs of one table are made over days on machines that do not keep their work folders: each
    finished run leaves a record beside the results, and the tables come back from the records alone -
    nothing trained again, not even the first stages."""
    import shutil

    args = _assembly_args(tmp_path)
    quality.run_benchmark(args, 7)
    first = (args.out / "quality_t.csv").read_text()
    record = json.loads((args.out / "runs" / "t" / "bcp_seed1.json").read_text())
    assert record["configs"]["training"]["init_weights"] == "pretrain_seed1/model.pt"  # machine-independent
    assert record["configs"]["first stage"]["optim"]["pretrain_iterations"] == 2000
    assert record["evaluation_last"][0]["dice_class1"] == 0.0
    start = quality.weights_sha256(args.work / "t" / "pretrain_seed1" / "model.pt")
    assert record["row"]["start_weights_sha256"] == start
    shutil.rmtree(args.work)
    trained = len(fake_train.calls)
    for reuse_only in (True, False):
        args.reuse_only = reuse_only
        quality.run_benchmark(args, 7)
        assert len(fake_train.calls) == trained
        assert (args.out / "quality_t.csv").read_text() == first
        report = (args.out / "quality_t.md").read_text()
        assert "From run records" in report and "every row" in report.split("From run records")[1]


@pytest.mark.parametrize(
    ("change", "method"),
    [
        (["--set", "method.mask_ratio=0.5"], "bcp"),  # its own training
        (["--pretrain-iterations", "100"], "bcp"),  # only the first stage it starts from
        (["--pretrain-iterations", "100"], "supervised"),  # its own first stage
        (["--iterations", "100"], "cp-pretrain-only"),  # not read by the pre-training: still used
    ],
)
def test_a_record_counts_only_for_the_configuration_it_recorded(
    quality, fake_train, fake_scoring, tmp_path, change, method
):
    import shutil

    args = _assembly_args(tmp_path, methods=[method])
    quality.run_benchmark(args, 7)
    shutil.rmtree(args.work)
    option, value = change
    if option == "--set":
        args.set = [value]
    else:
        setattr(args, option[2:].replace("-", "_"), int(value))
    args.reuse_only = True
    if method == "cp-pretrain-only":
        quality.run_benchmark(args, 7)
        assert "From run records" in (args.out / "quality_t.md").read_text()
    else:
        with pytest.raises(SystemExit, match="no finished run"):
            quality.run_benchmark(args, 7)


def test_a_seed_whose_runs_started_from_different_pretrainings_is_named(quality):
    rows = [
        {**_row("bcp", 1, 0.7), "start_weights_sha256": "aaaaaaaa11"},
        {**_row("ours-url-only", 1, 0.8), "start_weights_sha256": "bbbbbbbb22"},
        {**_row("bcp", 2, 0.7), "start_weights_sha256": "cccccccc33"},
        {**_row("ours-url-only", 2, 0.8), "start_weights_sha256": "cccccccc33"},
        {**_row("supervised", 2, 0.6), "start_weights_sha256": "dddddddd44"},  # its own first stage
    ]
    assert quality.start_weight_mismatches(rows) == ["seed 1: bcp from aaaaaaaa; ours-url-only from bbbbbbbb"]


def test_the_identity_of_start_weights_is_the_weights_not_the_file(quality, tmp_path):
    """Training is deterministic, but a model file also holds its creation time and folder: the same
    pre-training trained again must count as the same start, other weights as another."""
    import torch
    from model_files import model_metadata

    from buseg.model.checkpoint import save_checkpoint

    metadata = model_metadata(["background", "a"], method="bcp")
    weights = {"b": torch.tensor([1.0, 2.0], dtype=torch.bfloat16), "a": torch.arange(3)}
    paths = [tmp_path / f"{name}.pt" for name in ("first", "again", "other")]
    save_checkpoint(paths[0], weights=weights, metadata={**metadata, "created_unix_seconds": 1.0})
    save_checkpoint(paths[1], weights=weights, metadata={**metadata, "created_unix_seconds": 2.0})
    save_checkpoint(paths[2], weights={**weights, "a": torch.arange(3) + 1}, metadata=metadata)
    assert quality._file_sha256(paths[0]) != quality._file_sha256(paths[1])
    identities = [quality.weights_sha256(path) for path in paths]
    assert identities[0] == identities[1] != identities[2]


def test_a_damaged_record_is_an_error_that_names_it(quality, fake_train, fake_scoring, tmp_path):
    args = _assembly_args(tmp_path, methods=["bcp"])
    quality.run_benchmark(args, 7)
    record = args.out / "runs" / "t" / "bcp_seed1.json"
    record.write_text(record.read_text()[:100])  # truncated
    args.reuse_only = True
    with pytest.raises(SystemExit, match=r"bcp_seed1\.json: not a readable run record"):
        quality.run_benchmark(args, 7)


def test_every_configuration_gets_its_own_curve_style(quality):
    for count in (3, 13, 45):  # tab10, tab20, and more configurations than colours
        methods = [f"m{i}" for i in range(count)]
        styles = quality.curve_styles(methods)
        assert len({(tuple(s["color"]), s["linestyle"]) for s in styles.values()}) == count


def test_the_curves_figure_has_a_panel_per_seed(quality, tmp_path):
    import matplotlib.image

    curve = [{"iteration": 250, "dice": 0.5}, {"iteration": 500, "dice": 0.6}]
    curves = {
        ("bcp", 1337): curve,
        ("ours-url-only", 1337): curve,
        ("bcp", 2): curve,
        ("mean-teacher", 2): [],
    }
    path = tmp_path / "curves.png"
    quality.plot_curves(curves, path, "t")
    height, width = matplotlib.image.imread(path).shape[:2]
    one_seed = tmp_path / "one_seed.png"
    quality.plot_curves({("bcp", 1337): curve}, one_seed, "t")
    assert width > 1.5 * matplotlib.image.imread(one_seed).shape[1]  # two panels side by side
    assert height == matplotlib.image.imread(one_seed).shape[0]
    quality.plot_curves({("bcp", 3): []}, tmp_path / "none.png", "t")
    assert not (tmp_path / "none.png").exists()  # no finished curve: no empty figure


def test_score_every_follows_each_self_training_run_and_marks_its_curve_finished(
    quality, fake_train, fake_scoring, tmp_path, monkeypatch
):
    """With --score-every the training of every self-training run (not its first stage) also feeds the
    teacher scorer, whose record says the run finished once it is scored."""
    seen = []

    def recording(config, *, events, **kw):
        scorers = [s for s in getattr(events, "sinks", [events]) if isinstance(s, quality.TeacherScores)]
        seen.append((config.optim.iterations, len(scorers)))
        return fake_train(config, events=events, **kw)

    monkeypatch.setattr(quality, "train", recording)
    args = _assembly_args(tmp_path, score_every=1000, methods=["bcp"])
    quality.run_benchmark(args, 7)
    assert seen == [(0, 0), (4000, 1)]  # the first stage has no teacher to score; the run has one scorer
    record = json.loads((args.out / "runs" / "t" / "bcp_seed1.teacher.json").read_text())
    assert record["finished"] is True and record["every"] == 1000 and record["configuration"] == "bcp"


def test_the_configurations_name_methods_of_the_engines_catalog(monkeypatch, quality):
    from buseg.catalogs import methods as catalog

    assert {method for method, *_ in quality.METHODS.values()} <= set(catalog.method_names())
    semi_supervised = set(quality.METHODS) - {"supervised"}
    assert semi_supervised == quality.SHARED_PRETRAINING
    # The catalog's order is the panel's and the help's: restored as it was, not with bcp moved last
    # (monkeypatch.delitem would put it back at the end, and later tests read the order).
    original = dict(catalog.CATALOG)
    del catalog.CATALOG["bcp"]  # a method the catalog no longer has
    spec = importlib.util.spec_from_file_location("quality_without_bcp", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    try:
        with pytest.raises(
            ValueError, match=r"quality\.METHODS names bcp, which the engine's method catalog"
        ):
            spec.loader.exec_module(module)
    finally:
        catalog.CATALOG.clear()
        catalog.CATALOG.update(original)
