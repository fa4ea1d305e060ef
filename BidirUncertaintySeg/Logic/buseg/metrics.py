"""Segmentation metrics of two label arrays: Dice (the one Dice of the engine), Jaccard, HD95, ASD.

Definitions follow the published ACDC/LA protocol (medpy's ``dc``, ``jc``, ``hd95``, ``asd``),
computed with MONAI's surface functions (``monai.metrics.utils.get_mask_edges`` for the
surface voxels, ``get_surface_distance`` for exact Euclidean distances with spacing):

* surface = the object's voxels that touch the background (object XOR its erosion with a
  6-neighbourhood cross), as medpy;
* **HD95** = 95th percentile of the *pooled* distances prediction->truth and truth->prediction
  (medpy's ``hd95``; MONAI's ``compute_hausdorff_distance`` takes the larger of the two directed
  percentiles instead, which is never smaller);
* **ASD** = mean distance from the prediction's surface voxels to the truth's surface
  (medpy's ``asd``, directed, as the published tables).

Distances are given in millimetres (voxel spacing) and in voxels (spacing 1, what the
published tables report). Empty masks (docs/inference.md):

* class missing from the prediction, present in the truth: 0 on all four metrics - the
  published protocol's rule (its distances of 0 flatter a mean; the ``empty`` column says so);
* class present in the prediction, missing from the truth: Dice 0, Jaccard 0, distances
  undefined (NaN, left out of the means; the protocol never meets this case);
* class missing from both: nothing to segment; every metric NaN, left out of the means.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

METRICS = ("dice", "jaccard", "hd95_mm", "asd_mm", "hd95_voxels", "asd_voxels")


def _surface_distances(
    pred: np.ndarray, truth: np.ndarray, spacing_zyx: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances pred-surface -> truth-surface and truth-surface -> pred-surface (both non-empty)."""
    from monai.metrics.utils import get_mask_edges, get_surface_distance

    edges_pred, edges_truth = get_mask_edges(pred, truth, crop=True)
    forward = get_surface_distance(edges_pred, edges_truth, distance_metric="euclidean", spacing=spacing_zyx)
    backward = get_surface_distance(edges_truth, edges_pred, distance_metric="euclidean", spacing=spacing_zyx)
    return np.asarray(forward, dtype=np.float64), np.asarray(backward, dtype=np.float64)


def dice(prediction: np.ndarray, truth: np.ndarray, *, both_empty: float = 1.0) -> float:
    """Dice coefficient 2|P & T| / (|P| + |T|) of two masks (boolean, or anything ``!= 0`` marks).

    ``both_empty``: the score when neither mask has a voxel - 1.0 (nothing to find, nothing
    found) as training's validation, the review figures and the demo's report count it;
    :func:`binary_metrics` reports NaN there before asking. The engine's one Dice formula.
    """
    prediction = np.asarray(prediction, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    denominator = int(prediction.sum()) + int(truth.sum())
    if denominator == 0:
        return both_empty
    return 2.0 * int(np.logical_and(prediction, truth).sum()) / denominator


def dice_per_class(prediction: np.ndarray, truth: np.ndarray, class_values: Iterable[int]) -> list[float]:
    """:func:`dice` of each label value in ``class_values`` (1.0 where a class is absent from both)."""
    return [dice(prediction == value, truth == value) for value in class_values]


def binary_metrics(pred: np.ndarray, truth: np.ndarray, spacing_zyx: Sequence[float]) -> dict[str, Any]:
    """Dice, Jaccard, HD95 and ASD (mm and voxels) of two boolean masks, with the empty-mask rules above.

    ``spacing_zyx`` is in numpy axis order (z, y, x), i.e. the image's spacing reversed.
    """
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {truth.shape}")
    n_pred, n_truth = int(pred.sum()), int(truth.sum())
    result: dict[str, Any] = {"prediction_voxels": n_pred, "truth_voxels": n_truth}
    nan = float("nan")
    if n_pred == 0 and n_truth == 0:
        return {**result, "empty": "both", **dict.fromkeys(METRICS, nan)}
    if n_pred == 0:
        return {**result, "empty": "prediction", **dict.fromkeys(METRICS, 0.0)}
    intersection = int(np.logical_and(pred, truth).sum())
    dice_score = dice(pred, truth)
    jaccard = intersection / (n_pred + n_truth - intersection)
    if n_truth == 0:
        return {
            **result,
            "empty": "truth",
            "dice": 0.0,
            "jaccard": 0.0,
            "hd95_mm": nan,
            "asd_mm": nan,
            "hd95_voxels": nan,
            "asd_voxels": nan,
        }
    out = {**result, "empty": "none", "dice": dice_score, "jaccard": jaccard}
    for unit, spacing in (("mm", [float(s) for s in spacing_zyx]), ("voxels", None)):
        forward, backward = _surface_distances(pred, truth, spacing)
        out[f"hd95_{unit}"] = float(np.percentile(np.concatenate([forward, backward]), 95))
        out[f"asd_{unit}"] = float(forward.mean())
    return out


@dataclass
class ClassResult:
    case: str
    class_name: str
    label_value: int
    dice: float
    jaccard: float
    hd95_mm: float
    asd_mm: float
    hd95_voxels: float
    asd_voxels: float
    prediction_voxels: int
    truth_voxels: int
    empty: str


def evaluate_arrays(
    case: str,
    pred: np.ndarray,
    truth: np.ndarray,
    spacing_xyz: Sequence[float],
    classes: Sequence[tuple[int, str]],
) -> list[ClassResult]:
    """One row per (label value, name) in ``classes`` for label maps ``pred`` and ``truth`` (same grid)."""
    rows = []
    spacing_zyx = list(spacing_xyz)[::-1]
    for value, name in classes:
        m = binary_metrics(pred == value, truth == value, spacing_zyx)
        rows.append(
            ClassResult(
                case=case,
                class_name=name,
                label_value=int(value),
                **{k: m[k] for k in (*METRICS, "prediction_voxels", "truth_voxels", "empty")},
            )
        )
    return rows


def summarize(rows: Sequence[ClassResult]) -> dict[str, Any]:
    """Per class: mean/std over cases (NaN left out) and how many cases were empty; overall: mean over classes."""
    per_class: dict[str, Any] = {}
    names = list(dict.fromkeys(r.class_name for r in rows))
    for name in names:
        mine = [r for r in rows if r.class_name == name]
        entry: dict[str, Any] = {"label_value": mine[0].label_value, "cases": len(mine)}
        for metric in METRICS:
            values = np.array([getattr(r, metric) for r in mine], dtype=float)
            finite = values[np.isfinite(values)]
            entry[metric] = float(finite.mean()) if finite.size else float("nan")
            entry[f"{metric}_std"] = float(finite.std()) if finite.size else float("nan")
            entry[f"{metric}_n"] = int(finite.size)
        for kind in ("prediction", "truth", "both"):
            entry[f"empty_{kind}"] = sum(r.empty == kind for r in mine)
        per_class[name] = entry
    overall = {}
    for metric in METRICS:
        values = [per_class[n][metric] for n in names if math.isfinite(per_class[n][metric])]
        overall[metric] = float(np.mean(values)) if values else float("nan")
    return {"classes": per_class, "mean": overall, "cases": len({r.case for r in rows})}


# --------------------------------------------------------------------------------------
# Files: finding label maps, matching cases by name, writing results
