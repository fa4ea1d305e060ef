"""Review guidance end to end: ``buseg predict`` writes the slice order and the regions' reasons
(the contract the Slicer panel reads), the summary lists the slices to check first, and a bad
anatomy rule stops the job before any output."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from model_files import model_metadata, write_untrained_model

from buseg.cli import main
from buseg.data.synthetic import write_dataset
from buseg.prediction.shape_flags import REASONS

NAMES = ["background", "wall", "cavity", "satellite"]


def _model(folder: Path, slice_axis: int) -> Path:
    metadata = model_metadata(
        NAMES, colors=[[0.2 * i, 0.5, 0.3] for i in range(len(NAMES))], slice_axis=slice_axis
    )
    return write_untrained_model(folder / f"model_axis{slice_axis}.pt", metadata, zero_head_bias=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(
        tmp_path_factory.mktemp("data"), labeled=0, unlabeled=0, test=1, shape_zyx=(8, 40, 36)
    )


def _predict(tmp_path: Path, model: Path, images: Path, *extra: str) -> int:
    argv = ["predict", str(images), "--model", str(model), "--out", str(tmp_path / "out")]
    return main([*argv, "--progress", "none", "--num-threads", "1", *extra])


@pytest.mark.parametrize("slice_axis", [2, 0])
def test_predict_writes_the_slice_order_and_reasons_along_the_models_slice_axis(
    tmp_path, data, slice_axis, caplog
):
    caplog.set_level(logging.INFO, logger="buseg")
    model = _model(tmp_path, slice_axis)
    extra = ["--nesting", "cavity:wall", "--region-threshold", "0.2", "--min-region-mm3", "0"]
    assert _predict(tmp_path, model, data["test"], *extra) == 0
    document = json.loads((tmp_path / "out" / "test_000" / "regions.json").read_text())
    review = document["slice_review"]
    size = document["geometry"]["size_ijk"][slice_axis]
    assert review["axis_ijk"] == slice_axis and review["slices"]
    errors = [s["expected_error_voxels"] for s in review["slices"]]
    assert errors == sorted(errors, reverse=True) and all(e > 0 for e in errors)
    assert sorted(s["index"] for s in review["slices"]) == list(
        range(size)
    )  # every slice: nothing is certain
    assert all(len(s["center_ras"]) == 3 for s in review["slices"])
    assert document["regions"], "an untrained model is unsure somewhere"
    for region in document["regions"]:
        assert region["reason"] in ("uncertainty", *REASONS)
        assert region["bbox_ijk_min"][slice_axis] == region["bbox_ijk_max"][slice_axis]  # one slice each
        assert {"id", "voxel_count", "mean_uncertainty", "review_value", "centroid_ras"} <= set(region)
    assert document["settings"]["slice_axis_ijk"] == slice_axis
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    case = summary["cases"][0]
    assert case["slice_axis_ijk"] == slice_axis and case["slices_to_check"] == review["slices"][:3]
    assert summary["config"]["nesting"] == ["cavity:wall"]
    first = review["slices"][0]
    assert f"test_000: slices to check first along IJK axis {slice_axis}" in caplog.text
    assert f": {first['index']} ({first['expected_error_voxels']:.0f})" in caplog.text


def test_a_bad_nesting_rule_stops_before_any_output(tmp_path, data, caplog):
    model = _model(tmp_path, 2)
    assert _predict(tmp_path, model, data["test"], "--nesting", "cavity:liver") != 0
    assert "--nesting rule 'cavity:liver'" in caplog.text
    assert not (tmp_path / "out" / "test_000").exists() and not (tmp_path / "out" / "summary.json").exists()


def test_the_simulated_reviewer_fixes_what_it_is_pointed_to():
    from benchmarks import review_benchmark as bench

    truth = np.zeros((4, 6, 6), dtype=np.uint8)
    truth[:, 1:5, 1:5] = 1
    labels = truth.copy()
    labels[2, 1:5, 1:5] = 0  # slice 2 missed entirely: 16 wrong voxels
    labels[0, 1, 1] = 0  # one wrong voxel on slice 0
    regions = [
        {"bbox_ijk_min": [1, 1, 2], "bbox_ijk_max": [4, 4, 2], "reason": "missing-on-slice"},
        {"bbox_ijk_min": [0, 0, 0], "bbox_ijk_max": [0, 0, 0], "reason": "uncertainty"},
    ]
    maps = bench.CaseMaps(
        "c",
        truth,
        labels,
        np.zeros(truth.shape),
        np.zeros(truth.shape),
        np.zeros(truth.shape, np.uint8),
        regions,
        [0, 2],
        0,
    )
    assert bench.fixed_dice(maps, bench.slice_mask(maps, [2]), 2) == pytest.approx(2 * 63 / 127)
    slices = bench.slice_figures(maps, 2, np.random.default_rng(0), 5)
    assert slices["slices1_perfect"] > slices["slices1_tool"]  # the tool put slice 0 first
    assert slices["slices2_tool"] == slices["slices2_perfect"] == 1.0 and slices["slices2_share"] == 0.5
    figures = bench.region_figures(maps, 2, np.random.default_rng(0), 5)
    assert figures["regions1_tool"] == pytest.approx(2 * 63 / 127) and figures[
        "regions1_recall"
    ] == pytest.approx(16 / 17)
    assert figures["regions1_share"] == pytest.approx(16 / truth.size) and figures["region1_slices"] == 1
