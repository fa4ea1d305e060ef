"""What the review step is worth: a simulated reviewer who corrects only what is flagged.

Given a prediction, the ground truth and an uncertainty map, flag a budget of voxels (by
default the 1% most uncertain of the volume, as the regions a reviewer would be shown),
let a perfect reviewer correct exactly those voxels, and measure:

* ``review_error_recall`` - fraction of the wrong voxels inside the flagged voxels;
* ``review_flagged_fraction`` - fraction of the volume flagged;
* ``review_dice_before`` / ``review_dice_after`` - mean foreground Dice before and after
  the correction, and ``review_dice_gain`` (after - before);
* ``error_auroc`` - area under the ROC curve of voxel uncertainty as a detector of wrong
  voxels over the whole volume (uninformative on its own: background dominates).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from buseg.metrics import dice_per_class


def mean_foreground_dice(prediction: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    """Mean Dice over foreground classes (a class absent from both counts as 1)."""
    return float(np.mean(dice_per_class(prediction, truth, range(1, num_classes))))


def error_auroc(uncertainty: np.ndarray, errors: np.ndarray) -> float:
    """AUROC of ``uncertainty`` for separating wrong (True) from right voxels (rank statistic)."""
    from scipy.stats import rankdata

    positives = int(errors.sum())
    negatives = errors.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(uncertainty.ravel())
    rank_sum = ranks[errors.ravel()].sum()
    return float((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))


def flag_budget(uncertainty: np.ndarray, budget_fraction: float) -> np.ndarray:
    """The ``budget_fraction`` most uncertain voxels (ties broken by position, exact count)."""
    count = round(budget_fraction * uncertainty.size)
    flagged = np.zeros(uncertainty.size, dtype=bool)
    if count > 0:
        flagged[np.argpartition(-uncertainty.ravel(), count - 1)[:count]] = True
    return flagged.reshape(uncertainty.shape)


def simulate_review(
    prediction: np.ndarray,
    truth: np.ndarray,
    uncertainty: np.ndarray,
    num_classes: int,
    *,
    budget_fraction: float = 0.01,
    flagged: np.ndarray | None = None,
    spacing_mm: Sequence[float] | None = None,
) -> dict[str, float]:
    """Review figures for one volume (see the module docstring).

    ``flagged`` may be given (e.g. the voxels of the regions :mod:`buseg.prediction.regions` reports);
    by default the ``budget_fraction`` most uncertain voxels are flagged.
    """
    del spacing_mm  # voxel counts are what the budget is about
    if flagged is None:
        flagged = flag_budget(uncertainty, budget_fraction)
    errors = prediction != truth
    corrected = np.where(flagged, truth, prediction)
    before = mean_foreground_dice(prediction, truth, num_classes)
    after = mean_foreground_dice(corrected, truth, num_classes)
    total_errors = int(errors.sum())
    return {
        "review_error_recall": float((errors & flagged).sum() / total_errors) if total_errors else 1.0,
        "review_flagged_fraction": float(flagged.mean()),
        "review_dice_before": before,
        "review_dice_after": after,
        "review_dice_gain": after - before,
        "error_auroc": error_auroc(uncertainty, errors),
        "error_fraction": float(errors.mean()),
    }
