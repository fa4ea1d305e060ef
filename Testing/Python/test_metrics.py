"""Evaluation metrics on shapes with known answers, the empty-mask rules, and evaluate_files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from buseg.errors import InputError, OutputError
from buseg.evaluation.evaluate import evaluate_files, format_summary
from buseg.files.images import Volume, write_image
from buseg.metrics import binary_metrics, summarize

R_MM, D_MM, EXTENT_MM = 10.0, 4.0, 36.0
SPACING = (0.4, 0.5, 0.75)  # x, y, z (anisotropic: mm and voxel distances differ by axis)


def _spheres(spacing_xyz=SPACING) -> tuple[np.ndarray, np.ndarray]:
    """Two balls of radius R_MM whose centres are D_MM apart along x, sampled on a (z, y, x) grid."""
    sx, sy, sz = spacing_xyz
    axes = [np.arange(int(EXTENT_MM / s)) * s for s in (sz, sy, sx)]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    c = EXTENT_MM / 2
    truth = (x - c) ** 2 + (y - c) ** 2 + (z - c) ** 2 <= R_MM**2
    pred = (x - c - D_MM) ** 2 + (y - c) ** 2 + (z - c) ** 2 <= R_MM**2
    return pred, truth


def _analytic() -> dict[str, float]:
    """Exact values for two balls: lens volume; surface distance |sqrt(r^2+d^2-2rd cos t) - r|, cos t ~ U(-1, 1)."""
    lens = math.pi * (4 * R_MM + D_MM) * (2 * R_MM - D_MM) ** 2 / 12
    ball = 4 / 3 * math.pi * R_MM**3
    c = np.linspace(-1, 1, 400001)
    distance = np.abs(np.sqrt(R_MM**2 + D_MM**2 - 2 * R_MM * D_MM * c) - R_MM)
    return {
        "dice": lens / ball,
        "jaccard": lens / (2 * ball - lens),
        "asd": float(distance.mean()),
        "hd95": float(np.percentile(distance, 95)),
    }


def test_two_offset_spheres_match_the_analytic_values_in_mm():
    pred, truth = _spheres()
    exact = _analytic()
    m = binary_metrics(pred, truth, SPACING[::-1])
    assert m["empty"] == "none"
    assert m["dice"] == pytest.approx(exact["dice"], abs=0.01)  # 0.704
    assert m["jaccard"] == pytest.approx(exact["jaccard"], abs=0.01)
    # Voxelised surfaces sit up to half a voxel inside the true sphere: tolerance of about one voxel.
    assert m["hd95_mm"] == pytest.approx(exact["hd95"], abs=0.5)  # 3.8 mm
    assert m["asd_mm"] == pytest.approx(exact["asd"], abs=0.35)  # 2.0 mm
    # In voxels the anisotropic spacing makes the numbers clearly different (the x shift is 10 voxels).
    assert m["hd95_voxels"] > 1.8 * m["hd95_mm"]


def test_distances_follow_the_medpy_definitions():
    """Pooled 95th percentile (hd95) and directed mean (asd), checked against a plain scipy implementation."""
    truth = np.zeros((20, 30, 40), dtype=bool)
    truth[5:15, 5:25, 5:30] = True
    pred = np.zeros_like(truth)
    pred[6:15, 8:25, 5:36] = True  # asymmetric: protrudes in x, shrunk in y and z
    spacing_zyx = (2.0, 1.0, 0.5)

    def surface(mask):
        return mask ^ ndimage.binary_erosion(mask)

    def directed(a, b):
        return ndimage.distance_transform_edt(~surface(b), sampling=spacing_zyx)[surface(a)]

    m = binary_metrics(pred, truth, spacing_zyx)
    forward, backward = directed(pred, truth), directed(truth, pred)
    assert m["hd95_mm"] == pytest.approx(np.percentile(np.concatenate([forward, backward]), 95), rel=1e-6)
    assert m["asd_mm"] == pytest.approx(forward.mean(), rel=1e-6)
    assert m["dice"] == pytest.approx(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))
    # Identical masks: perfect scores.
    same = binary_metrics(truth, truth, spacing_zyx)
    assert (same["dice"], same["jaccard"], same["hd95_mm"], same["asd_mm"]) == (1.0, 1.0, 0.0, 0.0)


def test_empty_masks_follow_the_protocol_rules():
    full = np.zeros((8, 8, 8), dtype=bool)
    full[2:6, 2:6, 2:6] = True
    empty = np.zeros_like(full)
    missed = binary_metrics(empty, full, (1, 1, 1))  # class missing from the prediction: 0 on all four
    assert missed["empty"] == "prediction"
    assert [missed[k] for k in ("dice", "jaccard", "hd95_mm", "asd_mm", "hd95_voxels", "asd_voxels")] == [
        0.0
    ] * 6
    invented = binary_metrics(full, empty, (1, 1, 1))  # nothing to find, something predicted
    assert invented["empty"] == "truth" and invented["dice"] == 0.0 and math.isnan(invented["hd95_mm"])
    nothing = binary_metrics(empty, empty, (1, 1, 1))
    assert nothing["empty"] == "both" and math.isnan(nothing["dice"])


def _copied_dice(p: np.ndarray, t: np.ndarray) -> float:
    """The formula each of the four former copies (metrics, train, review, report) computed."""
    denominator = int(p.sum()) + int(t.sum())
    return 1.0 if denominator == 0 else 2.0 * int((p & t).sum()) / denominator


def test_one_dice_function_keeps_every_former_copys_values_and_empty_mask_rules():
    from buseg.metrics import dice, dice_per_class

    truth = np.zeros((6, 7), dtype=np.int64)
    truth[1:4, 1:5] = 1
    truth[4:6, 2:3] = 2  # class 3 absent from both
    prediction = np.zeros_like(truth)
    prediction[2:5, 1:6] = 1
    prediction[0, 0] = 3  # class 3 only predicted: 0, not 1
    scores = dice_per_class(prediction, truth, range(1, 5))
    expected = [_copied_dice(prediction == c, truth == c) for c in range(1, 5)]
    assert scores == expected and scores[1:] == [0.0, 0.0, 1.0]  # exact, not approximate
    assert scores[0] == 2 * 8 / (12 + 15)
    empty = np.zeros((3, 3), dtype=bool)
    assert dice(empty, empty) == 1.0 and math.isnan(dice(empty, empty, both_empty=math.nan))
    assert dice(empty, ~empty) == 0.0 and dice(~empty, empty) == 0.0


def test_review_and_report_score_with_the_metrics_dice(monkeypatch):
    import buseg.metrics
    from buseg.evaluation import report
    from buseg.evaluation import simulated_review as review

    calls = []
    real = buseg.metrics.dice
    monkeypatch.setattr(buseg.metrics, "dice", lambda p, t, **kw: calls.append(1) or real(p, t, **kw))
    truth = np.array([[0, 1, 1], [2, 2, 0]])
    prediction = np.array([[0, 1, 0], [2, 0, 0]])
    assert review.mean_foreground_dice(prediction, truth, 4) == pytest.approx((2 / 3 + 2 / 3 + 1.0) / 3)
    assert report._dice(prediction, truth, [1, 2]) == pytest.approx(2 / 3)
    assert len(calls) == 5  # three foreground classes, then two values


def test_summary_averages_over_cases_then_classes_and_leaves_out_undefined_values():
    from buseg.metrics import ClassResult

    nan = float("nan")
    rows = [
        ClassResult("a", "rv", 1, 0.8, 0.7, 2.0, 1.0, 2.0, 1.0, 10, 10, "none"),
        ClassResult("b", "rv", 1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 10, "prediction"),
        ClassResult("a", "lv", 3, 0.9, 0.8, 1.0, 0.5, 1.0, 0.5, 10, 10, "none"),
        ClassResult("b", "lv", 3, 0.0, 0.0, nan, nan, nan, nan, 5, 0, "truth"),
    ]
    summary = summarize(rows)
    assert summary["classes"]["rv"]["dice"] == pytest.approx(0.4)  # the missed class counts as 0
    assert summary["classes"]["lv"]["hd95_mm"] == pytest.approx(1.0)  # undefined distance left out
    assert summary["classes"]["lv"]["hd95_mm_n"] == 1 and summary["classes"]["lv"]["empty_truth"] == 1
    assert summary["mean"]["dice"] == pytest.approx((0.4 + 0.45) / 2)
    assert "rv" in format_summary(summary)


def _volume(array: np.ndarray, spacing=(1.0, 1.0, 2.0)) -> Volume:
    return Volume(array.astype(np.uint8), spacing, (5.0, -3.0, 2.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))


def test_evaluate_files_matches_cases_by_name_and_writes_csv_and_json(tmp_path):
    truth_dir, pred_dir = tmp_path / "truth" / "labels", tmp_path / "pred"
    shape = (6, 12, 14)
    for index, case in enumerate(("p01", "p02")):
        truth = np.zeros(shape, dtype=np.uint8)
        truth[1:5, 2:8, 2:9] = 1
        truth[2:4, 9:11, 10:12] = 2
        pred = truth.copy()
        if index == 1:
            pred[pred == 2] = 0  # case p02 misses class 2
        write_image(_volume(truth), truth_dir / f"{case}.nii.gz")
        write_image(_volume(pred), pred_dir / f"{case}_pred.nii.gz")
    write_image(_volume(np.zeros(shape)), pred_dir / "extra_pred.nii.gz")  # no truth: skipped with a warning
    result = evaluate_files([pred_dir], [tmp_path / "truth"], tmp_path / "out")
    assert result.unmatched_predictions == ["extra"]
    by_key = {(r.case, r.label_value): r for r in result.rows}
    assert len(by_key) == 4
    assert by_key[("p01", 1)].dice == 1.0 and by_key[("p01", 2)].hd95_mm == 0.0
    assert by_key[("p02", 2)].empty == "prediction" and by_key[("p02", 2)].dice == 0.0
    assert result.summary["classes"]["label_2"]["dice"] == pytest.approx(0.5)
    lines = result.csv_path.read_text().splitlines()
    assert lines[0].startswith("case,class_name,label_value,dice,jaccard,hd95_mm")
    assert len(lines) == 5
    document = json.loads(result.json_path.read_text())
    assert document["summary"]["mean"]["dice"] == pytest.approx(0.75)
    with pytest.raises(OutputError):
        evaluate_files([pred_dir], [tmp_path / "truth"], tmp_path / "out")


def test_evaluate_files_refuses_grid_mismatch_and_unmatched_names(tmp_path):
    mask = np.zeros((4, 6, 6), dtype=np.uint8)
    mask[1:3, 1:4, 1:4] = 1
    write_image(_volume(mask), tmp_path / "t" / "c1.nii.gz")
    write_image(_volume(mask, spacing=(1.0, 1.0, 3.0)), tmp_path / "p" / "c1_label.nii.gz")
    with pytest.raises(InputError, match="voxel grid") as info:
        evaluate_files([tmp_path / "p"], [tmp_path / "t"], tmp_path / "out")
    assert "c1_label.nii.gz" in str(info.value)
    write_image(_volume(mask), tmp_path / "q" / "other.nii.gz")
    with pytest.raises(InputError, match="no case names match"):
        evaluate_files([tmp_path / "q"], [tmp_path / "t"], tmp_path / "out")


def test_case_sub_folders_are_found_as_predict_and_rank_write_them(tmp_path):
    mask = np.zeros((4, 6, 6), dtype=np.uint8)
    mask[1:3, 1:4, 1:4] = 1
    write_image(_volume(mask), tmp_path / "t" / "c1.nii.gz")
    write_image(_volume(mask), tmp_path / "p" / "c1" / "c1_label.nii.gz")
    write_image(_volume(mask.astype(np.float32) / 2), tmp_path / "p" / "c1" / "c1_uncertainty.nii.gz")
    result = evaluate_files([tmp_path / "p"], [tmp_path / "t"], tmp_path / "out")
    assert [(r.case, r.dice) for r in result.rows] == [("c1", 1.0)]
